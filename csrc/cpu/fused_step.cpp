// The engine step's fused CPU kernels (issue 16) and their bindings: residual add + RMSNorm, rotary of the
// step's query and key heads in place, SiLU(gate) * up. The math (and its rounding) is csrc/include/fused_step.h;
// the launches here only walk rows. Unfused, each is 3-8 ATen kernels with (L, D) temporaries between them
// (RMSNorm: to/pow/mean/add/rsqrt/mul/to/mul; rotary: chunk/neg/cat/mul/mul/add per tensor, twice); fused,
// each reads and writes its rows once.
//
// Buffers arrive as numpy views of torch tensors (the module is torch-free); rows may be strided (a head slice
// of the fused QKV output), the last dim must be contiguous. float32 and float64.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>   // std::optional

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif

#include "check.h"
#include "cpu_isa.h"
#include "fused_step.h"

namespace py = pybind11;

namespace {

// Rows of a 2-D array: row stride in elements, after the checks that name the argument.
template <typename T>
int64_t row_stride(const py::array& a, const char* name, int64_t rows, int64_t cols) {
  VCF_CHECK(a.ndim() == 2, std::string(name) + ": expected 2 dims, got " + std::to_string(a.ndim()));
  VCF_CHECK(a.dtype().kind() == 'f' && a.itemsize() == (py::ssize_t)sizeof(T),
            std::string(name) + ": dtype differs from x's (float32 or float64)");
  VCF_CHECK(a.shape(0) == rows && a.shape(1) == cols,
            std::string(name) + ": expected (" + std::to_string(rows) + ", " + std::to_string(cols) + "), got (" +
                std::to_string(a.shape(0)) + ", " + std::to_string(a.shape(1)) + ")");
  VCF_CHECK(cols <= 1 || a.strides(1) == (py::ssize_t)sizeof(T), std::string(name) + ": the last dim must be contiguous");
  VCF_CHECK(a.strides(0) >= 0 && a.strides(0) % sizeof(T) == 0, std::string(name) + ": unsupported row stride");
  return a.strides(0) / (int64_t)sizeof(T);
}

bool is_f64(const py::array& x, const char* name) {
  VCF_CHECK(x.dtype().kind() == 'f' && (x.itemsize() == 4 || x.itemsize() == 8),
            std::string(name) + ": expected float32 or float64");
  return x.itemsize() == 8;
}

template <typename T>
void add_rms_norm_typed(py::array& x, const std::optional<py::array>& residual, const py::array& weight, py::array& out,
                        double eps) {
  const int64_t L = x.shape(0), D = x.shape(1);
  const int64_t sx = row_stride<T>(x, "x", L, D), so = row_stride<T>(out, "out", L, D);
  const int64_t sr = residual ? row_stride<T>(*residual, "residual", L, D) : 0;
  VCF_CHECK(weight.ndim() == 1 && weight.shape(0) == D && weight.itemsize() == (py::ssize_t)sizeof(T) &&
                weight.strides(0) == (py::ssize_t)sizeof(T),
            "weight: expected a contiguous (D,) array of x's dtype");
  VCF_CHECK(x.writeable() && out.writeable(), "x/out: must be writable");
  T* xp = static_cast<T*>(x.mutable_data());
  const T* rp = residual ? static_cast<const T*>(residual->data()) : nullptr;
  const T* wp = static_cast<const T*>(weight.data());
  T* op = static_cast<T*>(out.mutable_data());
  const float e = (float)eps;
#pragma omp parallel for if (L * D >= (1 << 18))
  for (int64_t i = 0; i < L; ++i) vcf::add_rms_norm_row<T>(xp + i * sx, rp ? rp + i * sr : nullptr, wp, op + i * so, D, e);
}

void fused_add_rms_norm(py::array& x, const std::optional<py::array>& residual, const py::array& weight,
                        py::array& out, double eps) {
  VCF_CHECK(x.ndim() == 2, "x: expected (L, D)");
  if (is_f64(x, "x")) add_rms_norm_typed<double>(x, residual, weight, out, eps);
  else add_rms_norm_typed<float>(x, residual, weight, out, eps);
}

template <typename T>
void rotary_typed(py::array& x, const py::array& cos, const py::array& sin, int64_t head_dim) {
  const int64_t L = x.shape(0), W = x.shape(1), half = head_dim / 2;
  const int64_t sx = row_stride<T>(x, "x", L, W);
  const int64_t sc = row_stride<T>(cos, "cos", L, half), ss = row_stride<T>(sin, "sin", L, half);
  VCF_CHECK(x.writeable(), "x: must be writable");
  T* xp = static_cast<T*>(x.mutable_data());
  const T* cp = static_cast<const T*>(cos.data());
  const T* sp = static_cast<const T*>(sin.data());
  const int64_t H = W / head_dim;
#pragma omp parallel for if (L * W >= (1 << 18))
  for (int64_t i = 0; i < L; ++i)
    for (int64_t h = 0; h < H; ++h) vcf::rotary_head<T>(xp + i * sx + h * head_dim, cp + i * sc, sp + i * ss, half);
}

void fused_rotary(py::array& x, const py::array& cos, const py::array& sin, int64_t head_dim) {
  VCF_CHECK(x.ndim() == 2, "x: expected (L, heads * head_dim)");
  VCF_CHECK(head_dim >= 2 && head_dim % 2 == 0, "head_dim: expected a positive even number");
  VCF_CHECK(x.shape(1) % head_dim == 0, "x: the row length must be a multiple of head_dim");
  if (is_f64(x, "x")) rotary_typed<double>(x, cos, sin, head_dim);
  else rotary_typed<float>(x, cos, sin, head_dim);
}

// float32 SiLU * up over one row. libm's scalar expf made this the step's costliest small kernel (measured 24 us
// per 32 x 256 decode layer, ~0.8 ms per 1,069-row prefill layer: ~3 ns an element, slower than ATen's two
// vectorized kernels). With AVX-512 the row runs exp_neg.h's polynomial exp (exp_f32) (Cephes' expf, ~1 ulp), which the
// compiler vectorizes: 8,192 elements in 3.7 us instead of 27-29 us, measured on this machine's EPYC. The same
// polynomial compiled for AVX2 or SSE2 ran at 26-41 us (GCC 12 left part of it scalar): AVX2 CPUs run the intrinsics copy
// below, others keep libm; vcf::cpu_isa() (cpu_isa.h) picks the copy, capped by VIDEOCOM_CPU_ISA in tests.
// Same formula as vcf::silu_mul, g / (1 + exp(-g)) * u; exp's ~1 ulp (and FMA contraction in the AVX-512 copy)
// make it differ from libm's by about an ulp: the test holds it to 2x the plain implementation's error.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VCF_SILU_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw")
namespace silu_avx512 {
#include "exp_neg.h"   // exp_f32(float), compiled here for AVX-512

void row(const float* __restrict g, const float* __restrict u, float* __restrict o, int64_t n) {
  for (int64_t f = 0; f < n; ++f) o[f] = g[f] / (1.0f + exp_f32(-g[f])) * u[f];
}
}  // namespace silu_avx512
#pragma GCC pop_options

// AVX2 + FMA (CPUs without AVX-512): the same polynomial written with intrinsics, 8 lanes, since GCC left the
// plain loop partly scalar for AVX2. Measured on a 2-core AMD EPYC (AVX2 only), the 28-layer tiny model's decode
// step (32 x 256 per layer): libm's scalar expf cost ~100 us a layer, ~2.9 ms a step (bench_engine_step).
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace silu_avx2 {
#include "exp_neg.h"   // exp_f32(float) for the tail, compiled here for AVX2

inline __m256 exp8(__m256 x) {   // exp_clamped of exp_neg.h, lane-wise
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  const __m256 r = _mm256_add_ps(_mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f))),
                                 _mm256_mul_ps(n, _mm256_set1_ps(2.12194440e-4f)));
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(magic)), _mm256_set1_epi32(127)),
      23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

void row(const float* __restrict g, const float* __restrict u, float* __restrict o, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  int64_t f = 0;
  for (; f + 8 <= n; f += 8) {
    const __m256 gv = _mm256_loadu_ps(g + f);
    const __m256 e = exp8(_mm256_sub_ps(zero, gv));
    _mm256_storeu_ps(o + f, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + f)));
  }
  for (; f < n; ++f) o[f] = g[f] / (1.0f + exp_f32(-g[f])) * u[f];
}
}  // namespace silu_avx2
#pragma GCC pop_options

#endif

void silu_mul_row_f32(const float* g, const float* u, float* o, int64_t n, vcf::Isa isa) {
#ifdef VCF_SILU_AVX512
  if (isa == vcf::Isa::avx512) return silu_avx512::row(g, u, o, n);
  if (isa == vcf::Isa::avx2) return silu_avx2::row(g, u, o, n);
#endif
  for (int64_t f = 0; f < n; ++f) o[f] = vcf::silu_mul<float>(g[f], u[f]);
}

template <typename T>
void silu_mul_typed(const py::array& gu, py::array& out) {
  const int64_t L = gu.shape(0), F = gu.shape(1) / 2;
  const int64_t sg = row_stride<T>(gu, "gate_up", L, 2 * F), so = row_stride<T>(out, "out", L, F);
  VCF_CHECK(out.writeable(), "out: must be writable");
  const T* gp = static_cast<const T*>(gu.data());
  T* op = static_cast<T*>(out.mutable_data());
  const vcf::Isa isa = vcf::cpu_isa();
#pragma omp parallel for if (L * F >= (1 << 18))
  for (int64_t i = 0; i < L; ++i) {
    const T* g = gp + i * sg;
    T* o = op + i * so;
    if constexpr (std::is_same_v<T, float>) {
      silu_mul_row_f32(g, g + F, o, F, isa);
    } else {
      for (int64_t f = 0; f < F; ++f) o[f] = vcf::silu_mul<T>(g[f], g[F + f]);
    }
  }
}

void fused_silu_mul(const py::array& gate_up, py::array& out) {
  VCF_CHECK(gate_up.ndim() == 2 && gate_up.shape(1) % 2 == 0, "gate_up: expected (L, 2 * F)");
  if (is_f64(gate_up, "gate_up")) silu_mul_typed<double>(gate_up, out);
  else silu_mul_typed<float>(gate_up, out);
}

}  // namespace

void register_fused_step(py::module_& m) {
  m.def("fused_add_rms_norm", &fused_add_rms_norm, py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("out"),
        py::arg("eps"),
        "x (L, D) += residual (L, D) (in place; None: no add), then out (L, D) = weight * RMSNorm(x) with float32 "
        "statistics (transformers' Qwen2RMSNorm). float32 or float64; rows may be strided.");
  m.def("fused_rotary", &fused_rotary, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("head_dim"),
        "Rotate every head of x (L, H * head_dim) in place (rotate_half convention) with cos/sin (L, head_dim / 2) "
        "of x's dtype. Rows may be strided (the q and k heads of a fused QKV output).");
  m.def("fused_silu_mul", &fused_silu_mul, py::arg("gate_up"), py::arg("out"),
        "out (L, F) = silu(gate_up[:, :F]) * gate_up[:, F:] for gate_up (L, 2 F).");
  m.def("cpu_isa", [] { return std::string(vcf::kIsaNames[static_cast<int>(vcf::cpu_isa())]); },
        "The instruction set of the kernels with per-ISA copies (SiLU*mul rows, paged attention tiles): 'avx512', "
        "'avx2' or 'baseline' (the CPU's best, or the VIDEOCOM_CPU_ISA cap; a bad or unsupported cap: ValueError).");
  m.def("cpu_isas", [] {
          std::vector<std::string> out;
          for (int i = 0; i <= static_cast<int>(vcf::best_isa()); ++i) out.emplace_back(vcf::kIsaNames[i]);
          return out;
        },
        "The instruction sets this CPU can run, baseline first.");
}
