// The math of the engine step's fused ops, one row at a time, shared by the C++ CPU kernels
// (csrc/cpu/fused_step.cpp) and mirrored op for op by the Triton kernels (kernels/fused_step.py).
//
// Each function reproduces the rounding of the unfused PyTorch code it replaces (transformers' Qwen2 modules,
// videocom_fast/rollout/packed_forward.py's reference layer), so the fused step differs from it only by libm's
// exp against ATen's vectorized one (SiLU) and by the matmuls' blocking over the concatenated weights:
//   add_rms_norm:  x += r (in T); y = w * T(float(x) * rsqrt(mean(float(x)^2) + eps))   -- float32 statistics,
//                  as transformers' Qwen2RMSNorm computes them for every input dtype, summed in ATen's order
//   rotary:        x1' = x1 c - x2 s,  x2' = x2 c + x1 s  (rotate_half; each product rounded in T, then summed)
//   silu_mul:      y = (g / (1 + exp(-g))) * u
// NOTE: these files are compiled without FMA contraction (no -march), so `a * b + c` rounds twice, as ATen's
// separate mul and add kernels do.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define VCF_HD __host__ __device__ inline
#else
#define VCF_HD inline
#endif

namespace vcf {

// ceil(log2(n)) for n >= 1 (0 for n <= 1).
VCF_HD int64_t ceil_log2(int64_t n) {
  int64_t p = 0;
  while (((int64_t)1 << p) < n) ++p;
  return p;
}

// Sum of the float32 squares of one row, added in the order ATen's CPU sum reduces a contiguous row (its
// SumKernel: 8-float vectors, 4 vector accumulators, a 4-level cascade over groups of >= 16 vector quads, the
// scalar tail, then the 8 lanes in order). Same order, same float32 roundings: the statistic, hence the norm,
// is bit-equal to transformers' on this CPU (tests/test_fused_step.py checks it against torch for odd sizes).
template <typename T>
VCF_HD float sum_squares_aten_order(const T* x, int64_t D) {
  constexpr int kW = 8, kIlp = 4, kLevels = 4;
  const int64_t nvec = D / kW, nquad = nvec / kIlp;
  int64_t lp = ceil_log2(nquad) / kLevels;
  if (lp < 4) lp = 4;
  const int64_t step = (int64_t)1 << lp, mask = step - 1;
  float acc[kLevels][kIlp][kW];
  for (int j = 0; j < kLevels; ++j)
    for (int k = 0; k < kIlp; ++k)
      for (int l = 0; l < kW; ++l) acc[j][k][l] = 0.0f;
  auto add_quad = [&](float (&a)[kIlp][kW], int64_t q) {
    for (int k = 0; k < kIlp; ++k)
      for (int l = 0; l < kW; ++l) {
        const float h = (float)x[(q * kIlp + k) * kW + l];
        a[k][l] += h * h;
      }
  };
  int64_t q = 0;
  while (q + step <= nquad) {
    for (int64_t j = 0; j < step; ++j, ++q) add_quad(acc[0], q);
    for (int j = 1; j < kLevels; ++j) {   // carry the finished group up the cascade
      for (int k = 0; k < kIlp; ++k)
        for (int l = 0; l < kW; ++l) acc[j][k][l] += acc[j - 1][k][l], acc[j - 1][k][l] = 0.0f;
      if ((q & (mask << (j * lp))) != 0) break;
    }
  }
  for (; q < nquad; ++q) add_quad(acc[0], q);
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < kIlp; ++k)
      for (int l = 0; l < kW; ++l) acc[0][k][l] += acc[j][k][l];
  for (int64_t v = nquad * kIlp; v < nvec; ++v)   // vectors left over after the quads
    for (int l = 0; l < kW; ++l) {
      const float h = (float)x[v * kW + l];
      acc[0][0][l] += h * h;
    }
  for (int k = 1; k < kIlp; ++k)
    for (int l = 0; l < kW; ++l) acc[0][0][l] += acc[0][k][l];
  float total = 0.0f;
  for (int64_t e = nvec * kW; e < D; ++e) {
    const float h = (float)x[e];
    total += h * h;
  }
  for (int l = 0; l < kW; ++l) total += acc[0][0][l];
  return total;
}

// One row of D values. r == nullptr: no residual add.
template <typename T>
VCF_HD void add_rms_norm_row(T* x, const T* r, const T* w, T* y, int64_t D, float eps) {
  if (r)
    for (int64_t d = 0; d < D; ++d) x[d] = x[d] + r[d];
  const float var = sum_squares_aten_order(x, D) / (float)D;
  const float inv = 1.0f / sqrtf(var + eps);
  for (int64_t d = 0; d < D; ++d) y[d] = w[d] * (T)((float)x[d] * inv);
}

// One head of Dh = 2 * half values, rotated in place with this row's cos/sin (half values each, in T).
template <typename T>
VCF_HD void rotary_head(T* x, const T* c, const T* s, int64_t half) {
  for (int64_t j = 0; j < half; ++j) {
    const T x1 = x[j], x2 = x[j + half];
    const T a1 = x1 * c[j], b1 = -x2 * s[j];
    const T a2 = x2 * c[j], b2 = x1 * s[j];
    x[j] = a1 + b1;
    x[j + half] = a2 + b2;
  }
}

template <typename T>
VCF_HD T silu_mul(T g, T u) {
  const T s = g / ((T)1 + (T)std::exp(-g));   // std::exp: the float overload for float
  return s * u;
}

}  // namespace vcf
