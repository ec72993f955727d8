// Paged attention on the CPU (see paged_attention.h for the layout) and its binding.
//
// One work item = (chunk, tile of up to kTileRows query rows). All its query vectors (rows x Hq heads) share
// one sweep over the chunk's K blocks and one over its V blocks, row by row, each row (all kv heads, one
// contiguous span) used from L1 by every head of the tile: GQA without expanding K/V, and a decode costs
// one streaming pass over its sequence's keys. Items are independent, so OpenMP spreads them over cores
// with dynamic scheduling (sequences differ in length).
// Accumulation is in the input's precision (float32 or float64): fp64 keeps the engine's greedy-equality
// tests against the naive loop meaningful.
#include "paged_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace vcf {
namespace {

constexpr int kTileRows = 8;

struct Item {
  int chunk;
  int64_t row0;
};

// exp for float32 scores (inputs <= 0 after subtracting the row max): Cephes' expf polynomial, written so
// that the loop over a row of scores vectorises (no libm call); relative error ~1 ulp. float64 keeps
// std::exp: the fp64 path exists to compare against the naive loop, where accuracy is the point.
inline float exp_neg(float x) {
  x = std::max(x, -87.0f);
  const float magic = 12582912.0f;                 // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + magic;
  const float n = t - magic;
  int32_t ti, mi;
  std::memcpy(&ti, &t, 4);
  std::memcpy(&mi, &magic, 4);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (ti - mi + 127) << 23;      // 2^n
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}
inline double exp_neg(double x) { return std::exp(x); }

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

// Three passes over the tile's keys: scores (reads each K row once, contiguous across heads, for all Hq query
// vectors of the tile), softmax per query vector (causally invisible keys get probability 0), weighted sum
// of V (reads each V row once). Scores are kept (nq x keys): a few KiB for the short chunks this kernel
// serves (decodes; long prefill chunks go to SDPA). kD > 0 fixes the head dim at compile time.
template <typename T, int kD>
__attribute__((always_inline)) inline void run_item_impl(const PagedAttentionArgs& a, const Item& it, const T* q,
                                                          const T* kp, const T* vp, T* out, std::vector<T>& buf) {
  const int D = kD > 0 ? kD : a.head_dim, BS = a.block_size, Hq = a.num_q_heads, g = Hq / a.num_kv_heads;
  const int64_t n = a.q_len[it.chunk], first_key = a.ctx_len[it.chunk] - n;
  const int rows = (int)std::min<int64_t>(kTileRows, n - it.row0);
  const int nq = rows * Hq;                             // query vector qi = (row qi / Hq, head qi % Hq)
  const int64_t keys = first_key + it.row0 + rows;      // keys [0, keys) are seen by some row of the tile
  const size_t need = (size_t)nq * (2 * D + keys);
  if (buf.size() < need) buf.resize(need);
  T* qv = buf.data();              // (nq, D) scaled queries
  T* acc = qv + nq * D;            // (nq, D) output accumulators
  T* sc = acc + nq * D;            // (nq, keys) scores, then probabilities
  const T scale = (T)a.scale;
  const int64_t kv_row = (int64_t)a.num_kv_heads * D;   // one key row: all kv heads, contiguous
  const int32_t* table = a.tables + a.table_off[it.chunk];
  for (int qi = 0; qi < nq; ++qi) {
    const T* src = q + (a.q_start[it.chunk] + it.row0 + qi / Hq) * a.q_row_stride + (qi % Hq) * a.q_head_stride;
    for (int d = 0; d < D; ++d) qv[qi * D + d] = src[d] * scale;
  }
  for (int64_t p0 = 0; p0 < keys; p0 += BS) {           // pass 1: scores
    const T* kb = kp + (int64_t)table[p0 / BS] * BS * kv_row;
    const int cnt = (int)std::min<int64_t>(BS, keys - p0);
    for (int j = 0; j < cnt; ++j)
      for (int qi = 0; qi < nq; ++qi) {
        const T* qq = qv + qi * D;
        const T* kr = kb + j * kv_row + (qi % Hq) / g * D;
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int d = 0; d < D; ++d) s += qq[d] * kr[d];
        sc[qi * keys + p0 + j] = s;
      }
  }
  for (int qi = 0; qi < nq; ++qi) {                     // pass 2: softmax of each row of scores
    T* srow = sc + qi * keys;
    const int64_t vis = first_key + it.row0 + qi / Hq + 1;   // causal: this row sees keys [0, vis)
    T mx = srow[0];
    for (int64_t j = 1; j < vis; ++j) mx = std::max(mx, srow[j]);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < vis; ++j) {
      srow[j] = exp_neg(srow[j] - mx);
      sum += srow[j];
    }
    const T inv = T(1) / sum;
#pragma omp simd
    for (int64_t j = 0; j < vis; ++j) srow[j] *= inv;
    for (int64_t j = vis; j < keys; ++j) srow[j] = 0;
  }
  std::fill(acc, acc + nq * D, T(0));
  for (int64_t p0 = 0; p0 < keys; p0 += BS) {           // pass 3: probabilities x V
    const T* vb = vp + (int64_t)table[p0 / BS] * BS * kv_row;
    const int cnt = (int)std::min<int64_t>(BS, keys - p0);
    for (int j = 0; j < cnt; ++j)
      for (int qi = 0; qi < nq; ++qi) {
        const T w = sc[qi * keys + p0 + j];
        const T* vr = vb + j * kv_row + (qi % Hq) / g * D;
        T* o = acc + qi * D;
#pragma omp simd
        for (int d = 0; d < D; ++d) o[d] += w * vr[d];
      }
  }
  for (int r = 0; r < rows; ++r)                        // the tile's rows of out are contiguous (L, Hq, D)
    std::copy(acc + r * Hq * D, acc + (r + 1) * Hq * D, out + (a.q_start[it.chunk] + it.row0 + r) * Hq * D);
}

// Compiled for AVX-512, AVX2 and baseline x86-64; the loader picks one (GCC/Clang function multiversioning).
#if defined(__x86_64__) && defined(__GNUC__)
#define VCF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VCF_CLONES
#endif
VCF_CLONES void run_item(const PagedAttentionArgs& a, const Item& it, const float* q, const float* kp, const float* vp,
                         float* out, std::vector<float>& buf) {
  switch (a.head_dim) {
    case 32: return run_item_impl<float, 32>(a, it, q, kp, vp, out, buf);
    case 64: return run_item_impl<float, 64>(a, it, q, kp, vp, out, buf);
    case 128: return run_item_impl<float, 128>(a, it, q, kp, vp, out, buf);
    default: return run_item_impl<float, 0>(a, it, q, kp, vp, out, buf);
  }
}
VCF_CLONES void run_item(const PagedAttentionArgs& a, const Item& it, const double* q, const double* kp,
                         const double* vp, double* out, std::vector<double>& buf) {
  run_item_impl<double, 0>(a, it, q, kp, vp, out, buf);
}

template <typename T>
void run(const PagedAttentionArgs& a, const T* q, const T* kp, const T* vp, T* out) {
  std::vector<Item> items;
  for (int c = 0; c < a.num_chunks; ++c)
    for (int64_t r = 0; r < a.q_len[c]; r += kTileRows) items.push_back({c, r});
  const int64_t n = (int64_t)items.size();
#pragma omp parallel
  {
    std::vector<T> buf;
#pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < n; ++i) run_item(a, items[i], q, kp, vp, out, buf);
  }
}

}  // namespace

void paged_attention_cpu(const PagedAttentionArgs& a, const float* q, const float* k, const float* v, float* o) {
  run(a, q, k, v, o);
}
void paged_attention_cpu(const PagedAttentionArgs& a, const double* q, const double* k, const double* v, double* o) {
  run(a, q, k, v, o);
}

}  // namespace vcf

// --- binding: every check that keeps a bad buffer out of the kernel -------------------------------------
#ifndef VCF_KERNEL_ONLY   // (defined by standalone kernel harnesses)
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "check.h"

namespace py = pybind11;

namespace {

template <typename T>
const T* typed(const py::array& x, const char* name, char kind, size_t size) {
  VCF_CHECK(x.dtype().kind() == kind && (size_t)x.itemsize() == size,
            std::string(name) + ": wrong dtype (expected " + (kind == 'f' ? "float" : "int") + std::to_string(8 * size) + ")");
  return static_cast<const T*>(x.data());
}

template <typename T>
void call(const py::array& q, const py::array& k_pool, const py::array& v_pool, py::array& out,
          vcf::PagedAttentionArgs& a) {
  const T* qp = typed<T>(q, "q", 'f', sizeof(T));
  const T* kp = typed<T>(k_pool, "k_pool", 'f', sizeof(T));
  const T* vp = typed<T>(v_pool, "v_pool", 'f', sizeof(T));
  typed<T>(out, "out", 'f', sizeof(T));
  VCF_CHECK(q.strides(2) == (py::ssize_t)sizeof(T), "q: the head dim must be contiguous");
  VCF_CHECK(q.strides(0) % sizeof(T) == 0 && q.strides(1) % sizeof(T) == 0 && q.strides(0) >= 0 && q.strides(1) >= 0,
            "q: unsupported strides");
  a.q_row_stride = q.strides(0) / sizeof(T);
  a.q_head_stride = q.strides(1) / sizeof(T);
  T* op = static_cast<T*>(out.mutable_data());
  py::gil_scoped_release release;
  vcf::paged_attention_cpu(a, qp, kp, vp, op);
}

void paged_attention(const py::array& q, const py::array& k_pool, const py::array& v_pool, py::array& out,
                     const py::array& q_start, const py::array& q_len, const py::array& ctx_len,
                     const py::array& table_off, const py::array& tables, double scale) {
  VCF_CHECK(q.ndim() == 3, "q: expected (L, Hq, D)");
  VCF_CHECK(k_pool.ndim() == 4 && v_pool.ndim() == 4, "k_pool/v_pool: expected (num_blocks, BS, Hkv, D)");
  for (int d = 0; d < 4; ++d) VCF_CHECK(k_pool.shape(d) == v_pool.shape(d), "k_pool/v_pool: shapes differ");
  VCF_CHECK((k_pool.flags() & py::array::c_style) && (v_pool.flags() & py::array::c_style),
            "k_pool/v_pool: must be contiguous");
  VCF_CHECK(out.ndim() == 3 && (out.flags() & py::array::c_style) && out.writeable(),
            "out: expected a writable contiguous (L, Hq, D) array");
  const int64_t L = q.shape(0), Hq = q.shape(1), D = q.shape(2);
  const int64_t NB = k_pool.shape(0), BS = k_pool.shape(1), Hkv = k_pool.shape(2);
  VCF_CHECK(out.shape(0) == L && out.shape(1) == Hq && out.shape(2) == D, "out: shape must equal q's");
  VCF_CHECK(k_pool.shape(3) == D, "k_pool: head dim differs from q's");
  VCF_CHECK(Hkv >= 1 && Hq % Hkv == 0, "q/k_pool: query heads must be a multiple of kv heads");
  for (const py::array* x : {&q_start, &q_len, &ctx_len, &table_off})
    VCF_CHECK(x->ndim() == 1 && (x->flags() & py::array::c_style), "chunk metadata: expected contiguous 1-D arrays");
  const int64_t C = q_start.shape(0);
  VCF_CHECK(q_len.shape(0) == C && ctx_len.shape(0) == C && table_off.shape(0) == C,
            "q_start/q_len/ctx_len/table_off: lengths differ");
  VCF_CHECK(tables.ndim() == 1 && (tables.flags() & py::array::c_style), "tables: expected a contiguous 1-D array");
  const auto* qs = typed<int64_t>(q_start, "q_start", 'i', 8);
  const auto* ql = typed<int64_t>(q_len, "q_len", 'i', 8);
  const auto* cl = typed<int64_t>(ctx_len, "ctx_len", 'i', 8);
  const auto* to = typed<int64_t>(table_off, "table_off", 'i', 8);
  const auto* tb = typed<int32_t>(tables, "tables", 'i', 4);
  const int64_t T = tables.shape(0);
  for (int64_t c = 0; c < C; ++c) {
    const std::string at = "chunk " + std::to_string(c) + ": ";
    VCF_CHECK(ql[c] >= 1 && ql[c] <= cl[c], at + "need 1 <= q_len <= ctx_len");
    VCF_CHECK(qs[c] >= 0 && qs[c] + ql[c] <= L, at + "query rows outside q");
    const int64_t nb = (cl[c] + BS - 1) / BS;
    VCF_CHECK(to[c] >= 0 && to[c] + nb <= T, at + "block table outside tables");
    for (int64_t b = 0; b < nb; ++b) VCF_CHECK(tb[to[c] + b] >= 0 && tb[to[c] + b] < NB, at + "block id outside the pool");
  }
  vcf::PagedAttentionArgs a{0, 0, (int)Hq, (int)Hkv, (int)D, (int)BS, (int)C, qs, ql, cl, to, tb, scale};
  if (q.itemsize() == 8) call<double>(q, k_pool, v_pool, out, a);
  else call<float>(q, k_pool, v_pool, out, a);
}

}  // namespace

void register_attention(py::module_& m) {
  m.def("paged_attention", &paged_attention, py::arg("q"), py::arg("k_pool"), py::arg("v_pool"), py::arg("out"),
        py::arg("q_start"), py::arg("q_len"), py::arg("ctx_len"), py::arg("table_off"), py::arg("tables"),
        py::arg("scale"),
        "Causal attention of packed query chunks over paged K/V (float32 or float64, CPU). q (L, Hq, D) may be "
        "strided in its first two dims; out (L, Hq, D) contiguous; pools (num_blocks, BS, Hkv, D).");
}
#endif  // VCF_KERNEL_ONLY
