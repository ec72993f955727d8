// The row-wise halves of training/causal_attention.py (causal attention for CPU training, forward and backward
// as blocked matmuls around these two passes), and their bindings.
//
// Legend: a block of scores S (M, R, C): M head groups, R query rows, C keys; query row i of every group sits at
// position r0 + i of its sequence, so it may attend keys j < n_i = min(C, r0 + i + 1) (causal).
// - causal_softmax_(s, r0, scale): s <- softmax(scale * s) over j < n_i, 0 for j >= n_i (in place);
// - causal_softmax_backward_(p, dp, r0, scale): dp <- scale * p * (dp - sum_j p dp), 0 for j >= n_i (in place):
//   the softmax's vector-Jacobian product with the scale folded in (dS of flash-attention's backward).
// Why: the same two passes as ATen ops are 4-6 full passes over (M, R, C) each (scale, mask, softmax; mul, sum,
// sub, mul), most of the time of a blocked attention on small heads; fused, each reads and writes a row once.
// float32 rows run 8 lanes of exp_neg.h's polynomial (the paged-attention kernel's exp), float64 uses std::exp
// (the path tests compare against). Rows run in parallel (OpenMP) when a block is large.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "check.h"
#include "vec8.h"   // V8f / V8i, load8 / store8, VCF_CLONES_AVX2

namespace py = pybind11;

namespace {

#include "exp_neg.h"   // exp_neg_v (8 lanes), exp_neg (float: the polynomial; double: std::exp)

__attribute__((always_inline)) inline float lane_sum(V8f v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

template <typename T>
__attribute__((always_inline)) inline void softmax_row(T* s, int64_t n, int64_t C, T scale) {
  T mx = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {   // the max in 8 lanes (a scalar max chain waits on each compare)
    if (n >= 8) {
      V8f m8 = load8(s);
      for (j = 8; j + 8 <= n; j += 8) {
        const V8f x = load8(s + j);
        m8 = x > m8 ? x : m8;
      }
      for (int u = 0; u < 8; ++u) mx = std::max(mx, m8[u]);
    }
  }
  for (; j < n; ++j) mx = std::max(mx, s[j]);
  mx *= scale;   // scale > 0: the max of the scaled row
  T total = 0;
  j = 0;
  if constexpr (std::is_same_v<T, float>) {
    V8f acc{};
    for (; j + 8 <= n; j += 8) {
      const V8f e = exp_neg_v<V8f, V8i>(load8(s + j) * scale - mx);
      store8(s + j, e);
      acc += e;
    }
    total = lane_sum(acc);
  }
  for (; j < n; ++j) {
    s[j] = exp_neg(s[j] * scale - mx);
    total += s[j];
  }
  const T inv = T(1) / total;
  for (j = 0; j < n; ++j) s[j] *= inv;
  std::fill(s + n, s + C, T(0));
}

template <typename T>
__attribute__((always_inline)) inline void softmax_backward_row(const T* p, T* dp, int64_t n, int64_t C, T scale) {
  T dot = 0;
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    V8f acc{};
    for (; j + 8 <= n; j += 8) acc += load8(p + j) * load8(dp + j);
    dot = lane_sum(acc);
  }
  for (; j < n; ++j) dot += p[j] * dp[j];
  for (j = 0; j < n; ++j) dp[j] = scale * p[j] * (dp[j] - dot);
  std::fill(dp + n, dp + C, T(0));
}

// float32 rows through one clone per vector width (the loops above inlined into each)
VCF_CLONES_AVX2 void softmax_row_f32(float* s, int64_t n, int64_t C, float scale) { softmax_row(s, n, C, scale); }
VCF_CLONES_AVX2 void softmax_backward_row_f32(const float* p, float* dp, int64_t n, int64_t C, float scale) {
  softmax_backward_row(p, dp, n, C, scale);
}

struct Block {
  int64_t M, R, C;
};

Block check_block(const py::array& a, const char* name, int64_t r0, double scale) {
  VCF_CHECK(a.ndim() == 3, std::string(name) + ": expected (M, R, C), got " + std::to_string(a.ndim()) + " dims");
  VCF_CHECK(a.flags() & py::array::c_style, std::string(name) + ": expected a C-contiguous array");
  VCF_CHECK(a.dtype().kind() == 'f' && (a.itemsize() == 4 || a.itemsize() == 8),
            std::string(name) + ": expected float32 or float64");
  VCF_CHECK(a.writeable(), std::string(name) + ": expected a writable array (written in place)");
  VCF_CHECK(r0 >= 0, "r0: the first row's position must be >= 0, got " + std::to_string(r0));
  VCF_CHECK(scale > 0 && std::isfinite(scale), "scale: must be a finite value > 0, got " + std::to_string(scale));
  return {a.shape(0), a.shape(1), a.shape(2)};
}

// Rows (m, i) of the block in parallel when there is enough work to pay for an OpenMP region.
template <typename F>
void for_rows(const Block& b, int64_t r0, F&& row) {
  const int64_t rows = b.M * b.R;
#pragma omp parallel for schedule(static) if (rows * b.C >= (int64_t(1) << 16))
  for (int64_t k = 0; k < rows; ++k) row(k, std::min(b.C, r0 + k % b.R + 1));
}

void causal_softmax(py::array s, int64_t r0, double scale) {
  const Block b = check_block(s, "s", r0, scale);
  py::gil_scoped_release release;
  if (s.itemsize() == 4) {
    float* x = static_cast<float*>(s.mutable_data());
    for_rows(b, r0, [&](int64_t k, int64_t n) { softmax_row_f32(x + k * b.C, n, b.C, float(scale)); });
  } else {
    double* x = static_cast<double*>(s.mutable_data());
    for_rows(b, r0, [&](int64_t k, int64_t n) { softmax_row<double>(x + k * b.C, n, b.C, scale); });
  }
}

void causal_softmax_backward(py::array p, py::array dp, int64_t r0, double scale) {
  const Block b = check_block(dp, "dp", r0, scale);
  VCF_CHECK(p.ndim() == 3 && p.shape(0) == b.M && p.shape(1) == b.R && p.shape(2) == b.C &&
                (p.flags() & py::array::c_style) && p.dtype().is(dp.dtype()),
            "p: expected a C-contiguous array of dp's shape and dtype");
  py::gil_scoped_release release;
  if (dp.itemsize() == 4) {
    const float* pp = static_cast<const float*>(p.data());
    float* d = static_cast<float*>(dp.mutable_data());
    for_rows(b, r0, [&](int64_t k, int64_t n) {
      softmax_backward_row_f32(pp + k * b.C, d + k * b.C, n, b.C, float(scale));
    });
  } else {
    const double* pp = static_cast<const double*>(p.data());
    double* d = static_cast<double*>(dp.mutable_data());
    for_rows(b, r0, [&](int64_t k, int64_t n) {
      softmax_backward_row<double>(pp + k * b.C, d + k * b.C, n, b.C, scale);
    });
  }
}

}  // namespace

void register_causal_softmax(py::module_& m) {
  m.def("causal_softmax_", &causal_softmax, py::arg("s"), py::arg("r0"), py::arg("scale"),
        "In place on scores s (M, R, C): softmax(scale * s) over the keys row i may see (j <= r0 + i), 0 past them.");
  m.def("causal_softmax_backward_", &causal_softmax_backward, py::arg("p"), py::arg("dp"), py::arg("r0"),
        py::arg("scale"),
        "In place on dp (M, R, C): scale * p * (dp - sum_j p * dp) over the keys row i may see, 0 past them.");
}
