// CUDA fused crop -> resize -> normalize -> patchify (compiled only when CMake builds CUDA; cannot run on the
// CPU-only development machine, where a test compiles it with nvcc -c for sm_80).
//
// One block per pixel_values row (a 14x14 patch), one thread per patch pixel; each thread computes its 3
// channels x 2 temporal slots straight from the uint8 source: both separable resize passes with the uint8
// rounding between them (in the library's pass order), the normalisation lookup (table already in the output
// dtype) and the merge-window store. The arithmetic is csrc/include/crop_resize_patchify.h, the same inline
// functions the CPU kernel runs, so the CPU tests check it. Bytes: the source under the patch's filter
// footprint (cached) and 1176 * sizeof(out) written once, against ~5x that over 4 passes unfused.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "crop_resize_patchify.h"

namespace vcf {

namespace {

struct DeviceAxis {
  const int32_t* first;
  const int32_t* size;
  const int32_t* w;
  int taps, precision;
};

struct DeviceItem {
  const uint8_t* src;
  int64_t frame_stride, row_stride, row_offset;
  int num_frames, out_h, out_w;
  bool vfirst;
  DeviceAxis h, v;
};

__device__ inline uint8_t pass_h(const uint8_t* row, const DeviceAxis& h, int ox, int c) {
  int32_t acc = fixed_half(h.precision);
  const int32_t* k = h.w + (int64_t)ox * h.taps;
  const uint8_t* s = row + 3 * h.first[ox] + c;
  for (int j = 0; j < h.size[ox]; ++j) acc += k[j] * s[3 * j];
  return clip8(acc, h.precision);
}

// Resized value of channel c at (oy, ox) of one frame: out = clip8(sum_v wv * clip8(sum_h wh * src)) for
// horizontal-first, the sums nested the other way for vertical-first.
__device__ inline uint8_t resample(const DeviceItem& it, const uint8_t* frame, int oy, int ox, int c) {
  const DeviceAxis& v = it.v;
  const DeviceAxis& h = it.h;
  if (it.vfirst) {
    int32_t acc = fixed_half(h.precision);
    const int32_t* kh = h.w + (int64_t)ox * h.taps;
    for (int j = 0; j < h.size[ox]; ++j) {
      int32_t inner = fixed_half(v.precision);
      const int32_t* kv = v.w + (int64_t)oy * v.taps;
      const uint8_t* s = frame + (int64_t)v.first[oy] * it.row_stride + 3 * (h.first[ox] + j) + c;
      for (int i = 0; i < v.size[oy]; ++i) inner += kv[i] * s[i * it.row_stride];
      acc += kh[j] * clip8(inner, v.precision);
    }
    return clip8(acc, h.precision);
  }
  int32_t acc = fixed_half(v.precision);
  const int32_t* kv = v.w + (int64_t)oy * v.taps;
  for (int i = 0; i < v.size[oy]; ++i)
    acc += kv[i] * pass_h(frame + (int64_t)(v.first[oy] + i) * it.row_stride, h, ox, c);
  return clip8(acc, v.precision);
}

template <typename T>
__global__ void crop_resize_patchify_kernel(const DeviceItem* items, const int32_t* row_item, const T* lut, T* out) {
  const int64_t row = blockIdx.x;
  const DeviceItem it = items[row_item[row]];
  const int gh = it.out_h / kPatch, gw = it.out_w / kPatch;
  const int64_t rel = row - it.row_offset;
  const int p = (int)(rel / (gh * gw));
  const int r = (int)(rel % (gh * gw));
  const int win = r / 4;
  const int py = 2 * (win / (gw / kMerge)) + (r % 4) / 2, px = 2 * (win % (gw / kMerge)) + r % 2;
  const int y = threadIdx.x / kPatch, x = threadIdx.x % kPatch;
  const int oy = py * kPatch + y, ox = px * kPatch + x;
  T* dst = out + row * kPatchDim;
  for (int t = 0; t < kTemporal; ++t) {
    const uint8_t* frame = it.src + (int64_t)source_frame(p, t, it.num_frames) * it.frame_stride;
    for (int c = 0; c < 3; ++c) dst[patch_col(c, t, y, x)] = lut[c * 256 + resample(it, frame, oy, ox, c)];
  }
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("crop_resize_patchify_cuda: ") + what + ": " +
                                                 cudaGetErrorString(e));
}

}  // namespace

// items[i].src are device pointers; lut and out device buffers; rows = total pixel_values rows.
void crop_resize_patchify_cuda(const std::vector<MediaItem>& items, const void* lut, void* out, int64_t rows,
                               int elem_size, void* stream_handle) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  std::vector<AxisPlan> plans;
  plans.reserve(2 * items.size());
  size_t ints = 0;
  for (const MediaItem& it : items) {
    plans.push_back(make_axis_plan(it.mode, it.in_w, it.out_w));
    plans.push_back(make_axis_plan(it.mode, it.in_h, it.out_h));
    for (int k = 0; k < 2; ++k) ints += 2 * plans[plans.size() - 1 - k].out + plans[plans.size() - 1 - k].w.size();
  }
  // one host staging buffer: [plans' int32 tables | row -> item | items]
  std::vector<int32_t> tables;
  tables.reserve(ints + rows);
  std::vector<size_t> offsets;
  for (const AxisPlan& pl : plans) {
    offsets.push_back(tables.size());
    tables.insert(tables.end(), pl.first.begin(), pl.first.end());
    tables.insert(tables.end(), pl.size.begin(), pl.size.end());
    tables.insert(tables.end(), pl.w.begin(), pl.w.end());
  }
  const size_t row_item_at = tables.size();
  for (size_t i = 0; i < items.size(); ++i) tables.insert(tables.end(), (size_t)item_rows(items[i]), (int32_t)i);
  int32_t* d_tables = nullptr;
  DeviceItem* d_items = nullptr;
  check(cudaMallocAsync((void**)&d_tables, tables.size() * sizeof(int32_t), stream), "malloc tables");
  check(cudaMallocAsync((void**)&d_items, items.size() * sizeof(DeviceItem), stream), "malloc items");
  std::vector<DeviceItem> host(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    const MediaItem& it = items[i];
    auto axis = [&](size_t k) {
      const AxisPlan& pl = plans[k];
      const int32_t* base = d_tables + offsets[k];
      return DeviceAxis{base, base + pl.out, base + 2 * pl.out, pl.taps, pl.precision};
    };
    host[i] = DeviceItem{it.src, it.frame_stride, it.row_stride, it.row_offset, it.num_frames, it.out_h, it.out_w,
                         !plans[2 * i].identity && vertical_first(it.mode, it.in_h, it.in_w, it.out_h, it.out_w),
                         axis(2 * i), axis(2 * i + 1)};
  }
  check(cudaMemcpyAsync(d_tables, tables.data(), tables.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream),
        "copy tables");
  check(cudaMemcpyAsync(d_items, host.data(), host.size() * sizeof(DeviceItem), cudaMemcpyHostToDevice, stream),
        "copy items");
  if (rows > 0) {
    const int32_t* row_item = d_tables + row_item_at;
    if (elem_size == 4)
      crop_resize_patchify_kernel<float><<<(unsigned)rows, kPatch * kPatch, 0, stream>>>(
          d_items, row_item, static_cast<const float*>(lut), static_cast<float*>(out));
    else
      crop_resize_patchify_kernel<uint16_t><<<(unsigned)rows, kPatch * kPatch, 0, stream>>>(
          d_items, row_item, static_cast<const uint16_t*>(lut), static_cast<uint16_t*>(out));
    check(cudaGetLastError(), "launch");
  }
  check(cudaFreeAsync(d_tables, stream), "free tables");
  check(cudaFreeAsync(d_items, stream), "free items");
  // the host staging vectors die here: cudaMemcpyAsync from pageable memory has already copied them
}

}  // namespace vcf
