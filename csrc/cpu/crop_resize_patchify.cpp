// CPU fused crop -> resize -> normalize -> patchify for Qwen2.5-VL pixel_values.
//
// What is fused: the crop is a pointer offset (no copy); the resize runs both separable passes on one
// merge-window row band (28 output rows) at a time in thread-local buffers that stay in L1/L2; the
// normalisation is a 3 x 256 lookup table in the output dtype; the values are written straight into
// merge-window order, both temporal slots of a patch at once (an image's frame is written twice, read once).
// Bytes moved per output pixel (3 channels): read the source once (+ the vertical filter's overlap between
// bands), write 2 * 3 * sizeof(out). The unfused processors write and re-read the resized uint8 image, a
// float32 normalised copy (12 B/pixel), a permuted copy (12 B) and, for images, the temporal expansion
// (24 B): about 5x the bytes, in 4 passes over memory. Measured (bench/bench_crop_resize_patchify.py, 1 thread,
// AVX-512): 32 frames 640x360 -> 54 MB fp32 in ~16 ms of CPU (resize 10: horizontal 5.6, vertical 6; table
// + layout 6) plus ~4 ms of first-touch page faults; before the SIMD horizontal pass and huge pages it was
// 33 + 26 ms. The table + layout step is bound by the per-value table lookups, not by memory traffic
// (non-temporal stores did not change it); the next gains are a register-blocked vertical pass and a
// vectorised lookup.
// SIMD: the horizontal pass transposes 16-row blocks in 16x16 byte tiles (SSE2) so each tap is one 16-lane
// integer multiply-add (hand-written AVX-512 loop when the CPU has AVX-512BW, chosen at run time; else the
// portable loop, compiled by target_clones for AVX2 / baseline; set_cpu_simd(false) forces it for tests);
// the vertical pass is contiguous over the row and left to the compiler.
// Page faults: the output buffer's interior is madvise(MADV_HUGEPAGE)d before it is first written (see
// advise_huge_pages): a fresh 54 MB buffer costs ~26 ms of faults with 4 KiB pages on this VM, ~4 ms with 2 MiB.
// Exactness: the arithmetic is PIL's / ATen's own (csrc/include/crop_resize_patchify.h): uint8 results
// between the two passes, integer fixed point, so outputs equal the oracles bit for bit.
// Parallelism: OpenMP over tasks (item, temporal patch, window rows), dynamic schedule; a task is a whole
// temporal slice when there are enough of them (videos), else one 28-row window row (a few images). Threads
// come from omp_get_max_threads() (torch.set_num_threads sets it too). On a machine loaded beyond its core
// count, libgomp's spin-waiting threads make 2 threads slower than 1 for the small image batches.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

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
// Horizontal, 16 rows at a time: the block is transposed (16x16 byte tiles, SSE2) so that the 16 rows' values
// of one input column sit side by side; each tap is then one multiply-add over 16 int32 lanes (one AVX-512
// instruction) with one weight for all lanes, instead of 16 scalar ones; the 16-lane results are transposed
// back the same way. Integer arithmetic, same sums in any order (no overflow: sum |w| * 255 < 2^31): bit-identical.
constexpr int kRows = 16;

// Runtime ISA choice for the hand-written AVX-512 loop; set_cpu_simd(false) forces the portable loop (tests).
static std::atomic<bool> g_simd{true};

static bool have_avx512() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return ok;
#else
  return false;
#endif
}

bool set_cpu_simd(bool enabled) {
  return g_simd.exchange(enabled);
}

const char* cpu_simd_isa() { return g_simd && have_avx512() ? "avx512" : "portable"; }

// dst[c][r] = src[r][c] for a 16 x 16 byte tile; src rows by pointer (a short block repeats its last row).
static inline void transpose16(const uint8_t* const* src, int64_t src_off, uint8_t* dst, int64_t dst_stride) {
#if defined(__SSE2__)
  __m128i a[16], b[16];
  for (int r = 0; r < 16; ++r) a[r] = _mm_loadu_si128((const __m128i*)(src[r] + src_off));
  for (int g = 0; g < 8; ++g) {  // rows 2g, 2g+1: columns 0-7 | 8-15, interleaved by byte
    b[2 * g] = _mm_unpacklo_epi8(a[2 * g], a[2 * g + 1]);
    b[2 * g + 1] = _mm_unpackhi_epi8(a[2 * g], a[2 * g + 1]);
  }
  for (int q = 0; q < 4; ++q)  // rows 4q..4q+3: a[4q + k] holds columns 4k..4k+3
    for (int h = 0; h < 2; ++h) {
      a[4 * q + 2 * h] = _mm_unpacklo_epi16(b[4 * q + h], b[4 * q + 2 + h]);
      a[4 * q + 2 * h + 1] = _mm_unpackhi_epi16(b[4 * q + h], b[4 * q + 2 + h]);
    }
  for (int o = 0; o < 2; ++o)  // rows 8o..8o+7: b[8o + m] holds columns 2m, 2m+1
    for (int k = 0; k < 4; ++k) {
      b[8 * o + 2 * k] = _mm_unpacklo_epi32(a[8 * o + k], a[8 * o + 4 + k]);
      b[8 * o + 2 * k + 1] = _mm_unpackhi_epi32(a[8 * o + k], a[8 * o + 4 + k]);
    }
  for (int m = 0; m < 8; ++m) {
    _mm_storeu_si128((__m128i*)(dst + (2 * m) * dst_stride), _mm_unpacklo_epi64(b[m], b[8 + m]));
    _mm_storeu_si128((__m128i*)(dst + (2 * m + 1) * dst_stride), _mm_unpackhi_epi64(b[m], b[8 + m]));
  }
#else
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) dst[c * dst_stride + r] = src[r][src_off + c];
#endif
}

// tin: input columns x 16 rows (bytes) -> tout: output columns x 16 rows, portable loop (vectorised by the
// compiler over the 16 rows).
VCF_CLONES static void hpass_mac(const uint8_t* tin, const AxisPlan& p, uint8_t* tout) {
  const int32_t half = fixed_half(p.precision);
  for (int ox = 0; ox < p.out; ++ox) {
    const int32_t* k = p.w.data() + (size_t)ox * p.taps;
    const int n = p.size[ox];
    for (int c = 0; c < 3; ++c) {
      int32_t a[kRows];
      for (int r = 0; r < kRows; ++r) a[r] = half;
      const uint8_t* col = tin + (size_t)(3 * p.first[ox] + c) * kRows;
      for (int j = 0; j < n; ++j) {
        const int32_t w = k[j];
        const uint8_t* v = col + (size_t)j * 3 * kRows;
        for (int r = 0; r < kRows; ++r) a[r] += w * v[r];
      }
      uint8_t* d = tout + (size_t)(3 * ox + c) * kRows;
      for (int r = 0; r < kRows; ++r) d[r] = clip8(a[r], p.precision);
    }
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
// Same loop by hand: the 3 channels of a tap are 48 contiguous bytes -> 3 accumulators, one broadcast weight.
__attribute__((target("avx512f,avx512bw"))) static void hpass_mac_avx512(const uint8_t* tin, const AxisPlan& p,
                                                                          uint8_t* tout) {
  const __m512i half = _mm512_set1_epi32(fixed_half(p.precision)), lo = _mm512_setzero_si512(),
                hi = _mm512_set1_epi32(255);
  const __m128i shift = _mm_cvtsi32_si128(p.precision);
  for (int ox = 0; ox < p.out; ++ox) {
    const int32_t* k = p.w.data() + (size_t)ox * p.taps;
    const int n = p.size[ox];
    const uint8_t* v = tin + (size_t)3 * p.first[ox] * kRows;
    __m512i a0 = half, a1 = half, a2 = half;
    for (int j = 0; j < n; ++j, v += 3 * kRows) {
      const __m512i w = _mm512_set1_epi32(k[j]);
      a0 = _mm512_add_epi32(a0, _mm512_mullo_epi32(w, _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)v))));
      a1 = _mm512_add_epi32(a1, _mm512_mullo_epi32(w, _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(v + 16)))));
      a2 = _mm512_add_epi32(a2, _mm512_mullo_epi32(w, _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(v + 32)))));
    }
    uint8_t* d = tout + (size_t)3 * ox * kRows;  // arithmetic shift = floor, then clamp: clip8 per lane
    _mm_storeu_si128((__m128i*)d, _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(_mm512_sra_epi32(a0, shift), lo), hi)));
    _mm_storeu_si128((__m128i*)(d + 16), _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(_mm512_sra_epi32(a1, shift), lo), hi)));
    _mm_storeu_si128((__m128i*)(d + 32), _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(_mm512_sra_epi32(a2, shift), lo), hi)));
  }
}
#endif

// rows [0, nrows) of `src` (row stride in bytes, in RGB pixels each) -> dst rows (out pixels each).
static void hpass_rows(const uint8_t* src, int64_t stride, int nrows, const AxisPlan& p, uint8_t* dst,
                       int64_t dst_stride, std::vector<uint8_t>& tin, std::vector<uint8_t>& tout) {
  const int in_bytes = 3 * p.in, out_bytes = 3 * p.out;
  tin.resize((size_t)in_bytes * kRows);
  tout.resize((size_t)out_bytes * kRows);
#if defined(__GNUC__) && defined(__x86_64__)
  const bool simd = g_simd && have_avx512();
#endif
  for (int r0 = 0; r0 < nrows; r0 += kRows) {
    const int m = std::min(kRows, nrows - r0);
    const uint8_t* rows[kRows];
    for (int r = 0; r < kRows; ++r) rows[r] = src + (int64_t)(r0 + std::min(r, m - 1)) * stride;  // short block:
    int x = 0;                                                           // repeat the last row (not stored)
    for (; x + 16 <= in_bytes; x += 16) transpose16(rows, x, tin.data() + (size_t)x * kRows, kRows);
    for (; x < in_bytes; ++x)
      for (int r = 0; r < kRows; ++r) tin[(size_t)x * kRows + r] = rows[r][x];
#if defined(__GNUC__) && defined(__x86_64__)
    if (simd) hpass_mac_avx512(tin.data(), p, tout.data());
    else
#endif
      hpass_mac(tin.data(), p, tout.data());
    uint8_t* drow[kRows];
    uint8_t tile[16 * 16];
    for (int r = 0; r < kRows; ++r) drow[r] = dst + (int64_t)(r0 + r) * dst_stride;
    const uint8_t* trow[kRows];
    int ox = 0;
    for (; ox + 16 <= out_bytes; ox += 16) {
      if (m == kRows) {
        for (int r = 0; r < kRows; ++r) trow[r] = tout.data() + (size_t)(ox + r) * kRows;
        // transpose16 reads rows of the source by pointer: here source row = output column ox + r
        uint8_t* d0 = drow[0] + ox;
        transpose16(trow, 0, d0, dst_stride);
      } else {
        for (int r = 0; r < kRows; ++r) trow[r] = tout.data() + (size_t)(ox + r) * kRows;
        transpose16(trow, 0, tile, 16);
        for (int r = 0; r < m; ++r) std::memcpy(drow[r] + ox, tile + r * 16, 16);
      }
    }
    for (; ox < out_bytes; ++ox)
      for (int r = 0; r < m; ++r) drow[r][ox] = tout[(size_t)ox * kRows + r];
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
  std::vector<uint8_t> hrows, band[2], tin, tout;
  std::vector<int32_t> acc;
  std::vector<uint32_t> planes32;  // normalised window row, channel-planar (float32 bits)
  std::vector<uint16_t> planes16;  // same for bf16 / fp16
  template <typename T>
  std::vector<T>& planes() {
    if constexpr (sizeof(T) == 4) return planes32; else return planes16;
  }
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
    hpass_rows(s.hrows.data(), in_width, n, ph, band, width, s.tin, s.tout);
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
    hpass_rows(src + (int64_t)lo * it.row_stride, it.row_stride, hi - lo, ph, s.hrows.data(), width, s.tin, s.tout);
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

// Normalise one window row (28 resized rows) of both temporal slots into channel-planar tables (one
// sequential pass, table lookups in L1), then copy 14-value runs into merge-window order: the scatter is
// contiguous copies instead of a stride-3 gather per value.
template <typename T>
void write_window_row(const uint8_t* band0, const uint8_t* band1, int out_w, int wy, const T* lut, T* out,
                      std::vector<T>& planes) {
  const int gw = out_w / kPatch;
  const size_t plane = (size_t)kWindow * out_w;
  const int slots = band1 == band0 ? 1 : kTemporal;  // an image's frame fills both slots from one table
  planes.resize(slots * 3 * plane);
  for (int t = 0; t < slots; ++t) {
    const uint8_t* b = t ? band1 : band0;
    T* p0 = planes.data() + (t * 3 + 0) * plane;
    T* p1 = p0 + plane;
    T* p2 = p1 + plane;
    for (size_t i = 0; i < plane; ++i) {
      p0[i] = lut[b[3 * i + 0]];
      p1[i] = lut[256 + b[3 * i + 1]];
      p2[i] = lut[512 + b[3 * i + 2]];
    }
  }
  for (int wx = 0; wx < gw / kMerge; ++wx)
    for (int my = 0; my < kMerge; ++my)
      for (int mx = 0; mx < kMerge; ++mx) {
        T* row = out + patch_row(wy, wx, my, mx, gw) * kPatchDim;
        const size_t x0 = (size_t)wx * kWindow + mx * kPatch;
        for (int c = 0; c < 3; ++c)
          for (int t = 0; t < kTemporal; ++t) {
            const T* src = planes.data() + ((t % slots) * 3 + c) * plane + (size_t)my * kPatch * out_w + x0;
            T* d = row + patch_col(c, t, 0, 0);
            for (int y = 0; y < kPatch; ++y) std::memcpy(d + y * kPatch, src + (size_t)y * out_w, kPatch * sizeof(T));
          }
      }
}

template <typename T>
void run(const std::vector<MediaItem>& items, const T* lut, T* out) {
  std::vector<AxisPlan> ph(items.size()), pv(items.size());
  int64_t num_slices = 0;  // (item, temporal patch) pairs
  bool all_videos = true;
  for (size_t i = 0; i < items.size(); ++i) {
    all_videos = all_videos && items[i].num_frames > 1;
    ph[i] = make_axis_plan(items[i].mode, items[i].in_w, items[i].out_w);
    pv[i] = make_axis_plan(items[i].mode, items[i].in_h, items[i].out_h);
    num_slices += (items[i].num_frames + kTemporal - 1) / kTemporal;
  }
#ifdef _OPENMP
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  // Task = window rows [wy0, wy1) of one temporal patch. Videos with enough slices to keep every thread busy
  // take a whole slice per task (equal sizes, no vertical-filter overlap recomputed between bands); images
  // (crops of very different sizes) take one window row per task, which balances the threads.
  const bool whole = all_videos && num_slices >= 4 * threads;
  struct Task { int item, p, wy0, wy1; };
  std::vector<Task> tasks;
  for (size_t i = 0; i < items.size(); ++i) {
    const int num_p = (items[i].num_frames + kTemporal - 1) / kTemporal, num_wy = items[i].out_h / kWindow;
    for (int p = 0; p < num_p; ++p) {
      if (whole) tasks.push_back({(int)i, p, 0, num_wy});
      else
        for (int wy = 0; wy < num_wy; ++wy) tasks.push_back({(int)i, p, wy, wy + 1});
    }
  }
  const int64_t num_tasks = (int64_t)tasks.size();
#pragma omp parallel
  {
    Scratch s;
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < num_tasks; ++k) {
      const Task& task = tasks[k];
      const MediaItem& it = items[task.item];
      const int width = it.out_w * 3, y0 = task.wy0 * kWindow, n = (task.wy1 - task.wy0) * kWindow;
      const int gh = it.out_h / kPatch, gw = it.out_w / kPatch;
      s.band[0].resize((size_t)n * width);
      s.band[1].resize((size_t)n * width);
      const int f0 = source_frame(task.p, 0, it.num_frames), f1 = source_frame(task.p, 1, it.num_frames);
      resize_band(it, ph[task.item], pv[task.item], f0, y0, n, s, s.band[0].data());
      const uint8_t* b1 = s.band[0].data();
      if (f1 != f0) {
        resize_band(it, ph[task.item], pv[task.item], f1, y0, n, s, s.band[1].data());
        b1 = s.band[1].data();
      }
      T* slice = out + (it.row_offset + (int64_t)task.p * gh * gw) * kPatchDim;
      for (int wy = task.wy0; wy < task.wy1; ++wy) {
        const size_t at = (size_t)(wy - task.wy0) * kWindow * width;
        const uint8_t* w1 = b1 == s.band[0].data() ? s.band[0].data() + at : b1 + at;
        write_window_row<T>(s.band[0].data() + at, w1, it.out_w, wy, lut, slice, s.planes<T>());
      }
    }
  }
}

}  // namespace

// The output is usually a fresh allocation, so each first touch of a 4 KiB page is a page fault: about 2 us
// each on this machine, 25 ms of CPU for a 54 MB video output (more than its whole resize). Asking for
// transparent huge pages on the buffer's 2 MiB-aligned interior makes that 4 ms (512x fewer faults; the
// kernel still zeroes the pages). Harmless when the pages already exist; c10's THP_MEM_ALLOC_ENABLE does the
// same for its own allocations.
static void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = (uintptr_t)2 << 20;
  const uintptr_t lo = ((uintptr_t)p + huge - 1) & ~(huge - 1), hi = ((uintptr_t)p + bytes) & ~(huge - 1);
  if (hi > lo) madvise((void*)lo, hi - lo, MADV_HUGEPAGE);
#else
  (void)p, (void)bytes;
#endif
}

void crop_resize_patchify_cpu(const std::vector<MediaItem>& items, const void* lut, void* out, int elem_size) {
  int64_t rows = 0;
  for (const MediaItem& it : items) rows += item_rows(it);
  advise_huge_pages(out, (size_t)rows * kPatchDim * elem_size);
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
