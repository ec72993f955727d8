// Shared host/device math of the fused crop -> resize -> normalize -> patchify kernels.
//
// Compiled by the CPU kernel (csrc/cpu/crop_resize_patchify.cpp) and by nvcc
// (csrc/cuda/crop_resize_patchify.cu), so the CPU tests check the GPU's arithmetic too.
//
// The resize is exact emulation of two resamplers the model's data went through:
//   kPil   Pillow's Image.resize(BICUBIC) on uint8 RGB (libImaging/Resample.c): separable (pass order in
//          vertical_first below), double weights normalised per output pixel, then fixed point with 22 fraction bits,
//          accumulator starts at 1/2, result = clamp(acc >> 22, 0, 255) (uint8 between the passes).
//   kTorch ATen's _upsample_bicubic2d_aa on uint8 (what torchvision's resize(antialias=True) runs on CPU;
//          UpSampleKernel.cpp _compute_index_ranges_int16_weights, derived from Pillow-SIMD): the same bounds,
//          the cubic written as ATen writes it, int16 weights whose precision depends on the largest
//          weight of the axis, same rounding and clamping.
// Both use Keys' cubic with a = -0.5 and support 2 * max(scale, 1) (antialias when downscaling).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define VCF_HD __host__ __device__ inline
#else
#define VCF_HD inline
#endif

namespace vcf {

enum ResampleMode : int { kPil = 0, kTorch = 1 };

constexpr int kPatch = 14;     // ViT patch side
constexpr int kMerge = 2;      // 2x2 patches -> one LLM token
constexpr int kTemporal = 2;   // frames per temporal patch
constexpr int kWindow = kPatch * kMerge;                   // 28 pixel rows per merge-window row
constexpr int kPatchDim = 3 * kTemporal * kPatch * kPatch;  // 1176 values per pixel_values row
constexpr int kPilPrecision = 22;                           // PRECISION_BITS = 32 - 8 - 2

// --- cubic filters (a = -0.5), each written with the operation order of its library -----------------------
VCF_HD double pil_bicubic(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

VCF_HD double torch_bicubic(double x) {
  const double a = -0.5;
  x = x < 0 ? -x : x;
  if (x < 1.0) return ((a + 2) * x - (a + 3)) * x * x + 1;             // cubic_convolution1
  if (x < 2.0) return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a;        // cubic_convolution2
  return 0.0;
}

// --- per-axis plan ------------------------------------------------------------------------------------------
// Most taps an output index can have along an axis of `in` -> `out` samples (PIL's ksize, ATen's
// max_interp_size): ceil(support) * 2 + 1 with support = 2 * max(in / out, 1).
VCF_HD int axis_max_taps(int in, int out) {
  double scale = (double)in / out;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  return (int)ceil(2.0 * filterscale) * 2 + 1;
}

// Bounds and normalised double weights of output index i: w[0..*size) apply to inputs *first + k.
// Returns the largest weight (ATen keeps the axis maximum to choose its int16 precision).
VCF_HD double axis_weights(int mode, int in, int out, int i, int max_taps, int* first, int* size, double* w) {
  double scale = (double)in / out;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  double support = 2.0 * filterscale;
  double center = (i + 0.5) * scale;
  double inv = 1.0 / filterscale;
  int lo = (int)(center - support + 0.5);
  if (lo < 0) lo = 0;
  int hi = (int)(center + support + 0.5);
  if (hi > in) hi = in;
  int n = hi - lo;
  if (n > max_taps) n = max_taps;  // ATen clamps a rare off-by-one from rounding; PIL never reaches it
  if (n < 0) n = 0;
  double total = 0.0;
  for (int k = 0; k < n; ++k) {
    double x = (k + lo - center + 0.5) * inv;
    double v = mode == kPil ? pil_bicubic(x) : torch_bicubic(x);
    w[k] = v;
    total += v;
  }
  double wmax = 0.0;
  if (total != 0.0) {
    for (int k = 0; k < n; ++k) {
      w[k] /= total;
      if (w[k] > wmax) wmax = w[k];
    }
  }
  for (int k = n; k < max_taps; ++k) w[k] = 0.0;
  *first = lo;
  *size = n;
  return wmax;
}

// ATen's int16 precision for an axis whose largest normalised weight is wmax: the most fraction bits
// (< 22) such that the largest weight still fits in int16 after rounding.
VCF_HD int torch_precision(double wmax) {
  int p = 0;
  for (p = 0; p < 22; ++p) {
    int next = (int)(0.5 + wmax * (double)(1 << (p + 1)));
    if (next >= (1 << 15)) break;
  }
  return p;
}

// Both libraries round a weight half away from zero into fixed point.
VCF_HD int32_t to_fixed(double w, int precision) {
  double v = w * (double)(1 << precision);
  return v < 0 ? (int32_t)(-0.5 + v) : (int32_t)(0.5 + v);
}

// Accumulators start at one half (so the shift rounds to nearest); the shift floors; then clamp to uint8.
VCF_HD int32_t fixed_half(int precision) { return (int32_t)1 << (precision - 1); }

VCF_HD uint8_t clip8(int32_t acc, int precision) {
  int32_t v = acc >> precision;  // arithmetic shift: floor, as PIL's lookup and ATen's srai do
  return (uint8_t)(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Pass order. ATen always runs horizontal then vertical. Pillow >= 13 runs the vertical pass first when the
// height shrinks by more than twice as many pixels as the width does (ImagingResampleInner); older Pillow was
// always horizontal first. The order matters for exactness because of the uint8 rounding between passes.
VCF_HD bool vertical_first(int mode, int in_h, int in_w, int out_h, int out_w) {
  return mode == kPil && (in_h - out_h) > 0 && (in_h - out_h) > (in_w - out_w) * 2;
}

// --- merge-window layout ------------------------------------------------------------------------------------
// A pixel_values row is one 14x14 patch; rows of a temporal slice go window by window:
//   row = ((wy * (gw/2) + wx) * 2 + my) * 2 + mx        (patch (py, px) = (2 wy + my, 2 wx + mx))
// and inside a row the 1176 values are (channel, t, y, x) with t the frame inside the temporal patch:
//   col = ((c * 2 + t) * 14 + y) * 14 + x
VCF_HD int64_t patch_row(int wy, int wx, int my, int mx, int gw) {
  return (((int64_t)wy * (gw / kMerge) + wx) * kMerge + my) * kMerge + mx;
}

VCF_HD int patch_col(int c, int t, int y, int x) { return ((c * kTemporal + t) * kPatch + y) * kPatch + x; }

// Source frame of temporal slot t of temporal patch p: images repeat their single frame; videos pad an odd
// tail with the last frame (what Qwen2VLVideoProcessor.patchify does).
VCF_HD int source_frame(int p, int t, int num_frames) {
  int f = p * kTemporal + t;
  return f < num_frames ? f : num_frames - 1;
}

// --- host-side plan and entry points (csrc/cpu/crop_resize_patchify.cpp) -----------------------------------
// Fixed-point taps of one axis: output index i reads inputs first[i] .. first[i] + size[i] - 1 with
// weights w[i * taps + k] (zero past size[i]); precision = fraction bits. identity: in == out, and both
// libraries then skip this pass.
struct AxisPlan {
  int in = 0, out = 0, taps = 0, precision = 0;
  bool identity = false;
  std::vector<int32_t> first, size, w;
};

AxisPlan make_axis_plan(int mode, int in, int out);

// One image or video. src points at the crop's top-left pixel of frame 0; strides in bytes; a pixel is 3
// contiguous bytes (RGB). Its pixel_values rows start at row_offset.
struct MediaItem {
  const uint8_t* src = nullptr;
  int64_t frame_stride = 0, row_stride = 0;
  int num_frames = 1, in_h = 0, in_w = 0, out_h = 0, out_w = 0, mode = kPil;
  int64_t row_offset = 0;
};

// pixel_values rows of an item: temporal patches * (out_h / 14) * (out_w / 14).
inline int64_t item_rows(const MediaItem& it) {
  return (int64_t)((it.num_frames + kTemporal - 1) / kTemporal) * (it.out_h / kPatch) * (it.out_w / kPatch);
}

// Optional closed form of the lookup table, so SIMD loops can compute 16 values at once instead of looking
// each one up. The table stays the reference: the kernel recomputes all 768 entries with its SIMD code and
// uses the formula only if every one equals the table bit for bit (float32, or bf16 / fp16 rounded to nearest
// even), else it looks up. kind 0: none; float32 arithmetic in this order (no fused multiply-add):
//   kind 1: (float(v) - mean[c]) / std[c]                   torchvision processors (rescale folded into mean/std)
//   kind 2: (float(double(v) * scale) - mean[c]) / std[c]   PIL processor (rescale in double, then normalize)
struct NormFormula {
  int kind = 0;
  double scale = 1.0;
  float mean[3] = {0.f, 0.f, 0.f}, std[3] = {1.f, 1.f, 1.f};
};

// lut: 3 x 256 output values (the normalised value of each uint8 level per channel) in the output element
// type; out: rows x 1176 of that type; elem_size 4 (float32) or 2 (bf16 / fp16 bit patterns).
void crop_resize_patchify_cpu(const std::vector<MediaItem>& items, const void* lut, void* out, int elem_size,
                              const NormFormula* formula = nullptr);

// Hand-written SIMD loops on (default: AVX-512 when the CPU has AVX-512BW, else AVX2; the computed store needs
// VBMI) or off (the portable loops, which the compiler vectorises): returns the previous setting. Tests run
// both; outputs are equal.
bool set_cpu_simd(bool enabled);
const char* cpu_simd_isa();  // "avx512_vbmi", "avx512", "avx2" or "portable": what the next call will run
// How the next call would store values for this table and formula: "f32" / "bf16" / "f16" (computed, SIMD) or
// "table" (looked up: no formula, no VBMI, SIMD off, or the formula does not reproduce the table).
const char* cpu_store_kind(const void* lut, int elem_size, const NormFormula* formula);

// The resize alone (tests, diagnostics): (in_h, in_w, 3) uint8 with a row stride in bytes -> (out_h, out_w, 3).
void resize_uint8_cpu(const uint8_t* src, int64_t row_stride, int in_h, int in_w, int out_h, int out_w,
                      int mode, uint8_t* dst);

// The CUDA kernel (csrc/cuda/crop_resize_patchify.cu, built when CMake builds CUDA): items[i].src, lut and out
// are device pointers; stream is a cudaStream_t (void* keeps this header free of CUDA includes).
void crop_resize_patchify_cuda(const std::vector<MediaItem>& items, const void* lut, void* out, int64_t rows,
                               int elem_size, void* stream);

}  // namespace vcf
