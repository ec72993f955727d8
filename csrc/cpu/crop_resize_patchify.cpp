// CPU fused crop -> resize -> normalize -> patchify for Qwen2.5-VL pixel_values.
//
// What is fused: the crop is a pointer offset (no copy); the resize runs both separable passes on one
// merge-window row band (28 output rows) at a time in thread-local buffers that stay in L1/L2; the
// normalisation is a 3 x 256 lookup table in the output dtype; the values are written straight into
// merge-window order, both temporal slots of a patch at once (an image's frame is written twice, read once).
// Bytes moved per output pixel (3 channels): read the source once (+ the vertical filter's overlap between
// bands), write 2 * 3 * sizeof(out). The unfused processors write and re-read the resized uint8 image, a
// float32 normalised copy (12 B/pixel), a permuted copy (12 B) and, for images, the temporal expansion
// (24 B): about 5x the bytes, in 4 passes over memory.
// Exactness: the arithmetic is PIL's / ATen's own (csrc/include/crop_resize_patchify.h): uint8 results
// between the two passes, integer fixed point, so outputs equal the oracles bit for bit.
// Parallelism: OpenMP over (item, temporal patch, window row) tasks, dynamic schedule.
#include <algorithm>
#include <cstring>
#include <vector>

#include "crop_resize_patchify.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// One binary for every x86-64: the loader picks the widest ISA this CPU has for the hot loops.
#define VCF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VCF_CLONES
#endif

namespace vcf {

AxisPlan make_axis_plan(int mode, int in, int out) {
  AxisPlan p;
  p.in = in;
  p.out = out;
  p.identity = in == out;
  p.taps = axis_max_taps(in, out);
  p.first.resize(out);
  p.size.resize(out);
  std::vector<double> wd((size_t)out * p.taps);
  double wmax = 0.0;
  for (int i = 0; i < out; ++i) {
    int first = 0, size = 0;
    wmax = std::max(wmax, axis_weights(mode, in, out, i, p.taps, &first, &size, &wd[(size_t)i * p.taps]));
    p.first[i] = first;
    p.size[i] = size;
  }
  p.precision = mode == kPil ? kPilPrecision : torch_precision(wmax);
  p.w.resize(wd.size());
  for (size_t j = 0; j < wd.size(); ++j) p.w[j] = to_fixed(wd[j], p.precision);
  return p;
}

// --- the two passes -------------------------------------------------------------------------------------
// Horizontal: one source row (in RGB pixels) -> one row of out pixels. A pixel's three channels ride in one
// 4 x int32 vector (the 4th lane reads the next pixel's first byte and is discarded), so one multiply-add per
// tap serves all channels; output pixels whose last tap touches the row's last pixel take the scalar path
// (the 4-byte load would read past the row).
typedef int32_t v4i __attribute__((vector_size(16)));
typedef uint8_t v4u8 __attribute__((vector_size(4)));

VCF_CLONES static void hpass_row(const uint8_t* src, const int32_t* first, const int32_t* size,
                                 const int32_t* w, int taps, int in, int out, int precision, uint8_t* dst) {
  const int32_t half = fixed_half(precision);
  for (int ox = 0; ox < out; ++ox) {
    const uint8_t* s = src + 3 * first[ox];
    const int32_t* k = w + (size_t)ox * taps;
    const int n = size[ox];
    if (first[ox] + n < in) {
      v4i acc = {half, half, half, half};
      for (int j = 0; j < n; ++j) {
        v4u8 px;
        std::memcpy(&px, s + 3 * j, 4);
        acc += k[j] * __builtin_convertvector(px, v4i);
      }
      dst[3 * ox + 0] = clip8(acc[0], precision);
      dst[3 * ox + 1] = clip8(acc[1], precision);
      dst[3 * ox + 2] = clip8(acc[2], precision);
      continue;
    }
    int32_t a0 = half, a1 = half, a2 = half;
    for (int j = 0; j < n; ++j) {
      a0 += k[j] * s[3 * j + 0];
      a1 += k[j] * s[3 * j + 1];
      a2 += k[j] * s[3 * j + 2];
    }
    dst[3 * ox + 0] = clip8(a0, precision);
    dst[3 * ox + 1] = clip8(a1, precision);
    dst[3 * ox + 2] = clip8(a2, precision);
  }
}

// Vertical: n rows starting at `rows` (row stride in bytes) -> one row of `width` bytes; contiguous over
// the row, so the compiler vectorises it.
VCF_CLONES static void vpass_row(const uint8_t* rows, int64_t stride, const int32_t* w, int n, int width,
                                 int precision, int32_t* acc, uint8_t* dst) {
  const int32_t half = fixed_half(precision);
  for (int i = 0; i < width; ++i) acc[i] = half;
  for (int j = 0; j < n; ++j) {
    const uint8_t* r = rows + j * stride;
    const int32_t wj = w[j];
    for (int i = 0; i < width; ++i) acc[i] += wj * r[i];
  }
  for (int i = 0; i < width; ++i) dst[i] = clip8(acc[i], precision);
}

namespace {

struct Scratch {
  std::vector<uint8_t> hrows, band[2];
  std::vector<int32_t> acc;
};

// Resized rows [y0, y0 + n) of one frame into `band` (n x out_w x 3), passes in the library's order.
void resize_band(const MediaItem& it, const AxisPlan& ph, const AxisPlan& pv, int frame, int y0, int n,
                 Scratch& s, uint8_t* band) {
  const uint8_t* src = it.src + (int64_t)frame * it.frame_stride;
  const int width = it.out_w * 3;
  if (!pv.identity && !ph.identity && vertical_first(it.mode, it.in_h, it.in_w, it.out_h, it.out_w)) {
    // vertical pass over the full input width for the band's n rows, then each row horizontally
    const int in_width = it.in_w * 3;
    s.hrows.resize((size_t)n * in_width);
    s.acc.resize(in_width);
    for (int y = y0; y < y0 + n; ++y)
      vpass_row(src + (int64_t)pv.first[y] * it.row_stride, it.row_stride, &pv.w[(size_t)y * pv.taps],
                pv.size[y], in_width, pv.precision, s.acc.data(), &s.hrows[(size_t)(y - y0) * in_width]);
    for (int y = 0; y < n; ++y)
      hpass_row(&s.hrows[(size_t)y * in_width], ph.first.data(), ph.size.data(), ph.w.data(), ph.taps, ph.in, ph.out,
                ph.precision, band + (size_t)y * width);
    return;
  }
  // horizontal first: the input rows the band's vertical taps need
  int lo = y0, hi = y0 + n;
  if (!pv.identity) {
    lo = pv.first[y0];
    hi = 0;
    for (int y = y0; y < y0 + n; ++y) hi = std::max(hi, pv.first[y] + pv.size[y]);
  }
  const uint8_t* hbase;  // row `lo` after the horizontal pass
  int64_t hstride;
  if (ph.identity) {
    hbase = src + (int64_t)lo * it.row_stride;
    hstride = it.row_stride;
  } else {
    s.hrows.resize((size_t)(hi - lo) * width);
    for (int r = lo; r < hi; ++r)
      hpass_row(src + (int64_t)r * it.row_stride, ph.first.data(), ph.size.data(), ph.w.data(), ph.taps, ph.in,
                ph.out, ph.precision, &s.hrows[(size_t)(r - lo) * width]);
    hbase = s.hrows.data();
    hstride = width;
  }
  if (pv.identity) {
    for (int y = 0; y < n; ++y) std::memcpy(band + (size_t)y * width, hbase + (int64_t)y * hstride, width);
    return;
  }
  s.acc.resize(width);
  for (int y = y0; y < y0 + n; ++y)
    vpass_row(hbase + (int64_t)(pv.first[y] - lo) * hstride, hstride, &pv.w[(size_t)y * pv.taps], pv.size[y],
              width, pv.precision, s.acc.data(), band + (size_t)(y - y0) * width);
}

// Normalise (lookup) and scatter one window row of both temporal slots into merge-window order.
template <typename T>
void write_window_row(const uint8_t* band0, const uint8_t* band1, int out_w, int wy, const T* lut, T* out) {
  const int gw = out_w / kPatch;
  const uint8_t* bands[kTemporal] = {band0, band1};
  for (int wx = 0; wx < gw / kMerge; ++wx)
    for (int my = 0; my < kMerge; ++my)
      for (int mx = 0; mx < kMerge; ++mx) {
        T* row = out + patch_row(wy, wx, my, mx, gw) * kPatchDim;
        const int x0 = wx * kWindow + mx * kPatch;
        for (int c = 0; c < 3; ++c) {
          const T* l = lut + c * 256;
          for (int t = 0; t < kTemporal; ++t)
            for (int y = 0; y < kPatch; ++y) {
              const uint8_t* s = bands[t] + ((size_t)(my * kPatch + y) * out_w + x0) * 3 + c;
              T* d = row + patch_col(c, t, y, 0);
              for (int x = 0; x < kPatch; ++x) d[x] = l[s[3 * x]];
            }
        }
      }
}

template <typename T>
void run(const std::vector<MediaItem>& items, const T* lut, T* out) {
  std::vector<AxisPlan> ph(items.size()), pv(items.size());
  struct Task { int item, p, wy; };
  std::vector<Task> tasks;
  for (size_t i = 0; i < items.size(); ++i) {
    const MediaItem& it = items[i];
    ph[i] = make_axis_plan(it.mode, it.in_w, it.out_w);
    pv[i] = make_axis_plan(it.mode, it.in_h, it.out_h);
    const int num_p = (it.num_frames + kTemporal - 1) / kTemporal;
    for (int p = 0; p < num_p; ++p)
      for (int wy = 0; wy < it.out_h / kWindow; ++wy) tasks.push_back({(int)i, p, wy});
  }
  const int64_t num_tasks = (int64_t)tasks.size();
#pragma omp parallel
  {
    Scratch s;
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < num_tasks; ++k) {
      const Task& task = tasks[k];
      const MediaItem& it = items[task.item];
      const int width = it.out_w * 3;
      const int gh = it.out_h / kPatch, gw = it.out_w / kPatch;
      s.band[0].resize((size_t)kWindow * width);
      s.band[1].resize((size_t)kWindow * width);
      const int f0 = source_frame(task.p, 0, it.num_frames), f1 = source_frame(task.p, 1, it.num_frames);
      resize_band(it, ph[task.item], pv[task.item], f0, task.wy * kWindow, kWindow, s, s.band[0].data());
      const uint8_t* b1 = s.band[0].data();
      if (f1 != f0) {
        resize_band(it, ph[task.item], pv[task.item], f1, task.wy * kWindow, kWindow, s, s.band[1].data());
        b1 = s.band[1].data();
      }
      T* slice = out + (it.row_offset + (int64_t)task.p * gh * gw) * kPatchDim;
      write_window_row<T>(s.band[0].data(), b1, it.out_w, task.wy, lut, slice);
    }
  }
}

}  // namespace

void crop_resize_patchify_cpu(const std::vector<MediaItem>& items, const void* lut, void* out, int elem_size) {
  if (elem_size == 4)
    run<uint32_t>(items, static_cast<const uint32_t*>(lut), static_cast<uint32_t*>(out));  // float32 bits
  else
    run<uint16_t>(items, static_cast<const uint16_t*>(lut), static_cast<uint16_t*>(out));  // bf16 / fp16 bits
}

void resize_uint8_cpu(const uint8_t* src, int64_t row_stride, int in_h, int in_w, int out_h, int out_w,
                      int mode, uint8_t* dst) {
  MediaItem it;
  it.src = src;
  it.row_stride = row_stride;
  it.in_h = in_h;
  it.in_w = in_w;
  it.out_h = out_h;
  it.out_w = out_w;
  it.mode = mode;
  AxisPlan ph = make_axis_plan(mode, in_w, out_w), pv = make_axis_plan(mode, in_h, out_h);
  Scratch s;
  resize_band(it, ph, pv, 0, 0, out_h, s, dst);
}

}  // namespace vcf
