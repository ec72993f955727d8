// exp of float32 scores <= 0 for the paged-attention kernels. NO include guard on purpose: the kernel file
// includes this once per namespace it compiles (the row-dot baseline and each per-target tile section), so that
// every copy is compiled with its section's target flags.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// exp for float32 scores (inputs <= 0 after subtracting the row max): Cephes' expf polynomial (no libm call),
// relative error ~1 ulp; exp_neg_v runs it on whole GCC vectors (a plain loop of exp_neg under `omp simd` stayed
// scalar in some target copies: GCC turned the clamp into a branch). float64 keeps std::exp: the fp64 path
// exists to compare against the naive loop, where accuracy is the point.
inline float exp_clamped(float x);
inline float exp_neg(float x) { return exp_clamped(std::max(x, -87.0f)); }
// exp of any float32 (SiLU's exp(-g)), saturating at e^-87 and e^88 (libm: ~0 and inf there).
inline float exp_f32(float x) { return exp_clamped(std::min(std::max(x, -87.0f), 88.0f)); }

// The polynomial, for x in [-87, 88] (2^n stays a normal float). F: float or a GCC vector of floats, I: int32_t or
// the int32 vector of the same width; the scalar and the vector loops (paged_attention.cpp's exp_row) share it.
template <typename F, typename I>
__attribute__((always_inline)) inline F exp_poly(F x) {
  const float magic = 12582912.0f;                 // 1.5 * 2^23: adding it rounds to an integer
  const F t = x * 1.44269504088896341f + magic;
  const F n = t - magic;
  I ti;
  int32_t mi;
  std::memcpy(&ti, &t, sizeof ti);
  std::memcpy(&mi, &magic, 4);
  const F r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I bits = (ti - mi + 127) << 23;            // 2^n
  F scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
inline float exp_clamped(float x) { return exp_poly<float, int32_t>(x); }
// exp_neg lane-wise: V a GCC vector of floats, I the int32 vector of the same width.
template <typename V, typename I>
__attribute__((always_inline)) inline V exp_neg_v(V x) { return exp_poly<V, I>(x < -87.0f ? V{} - 87.0f : x); }
inline double exp_neg(double x) { return std::exp(x); }
