#ifndef VCF_PAGED_ATTENTION_TILES   // (the file proper; the tiles section is at the end)
// Paged attention on the CPU (see paged_attention.h for the layouts), the pool's K/V write, and their binding.
//
// One work item = (chunk, tile of up to kTileRows query rows). Per kv head, the item's query vectors
// (rows x the g = Hq / Hkv heads sharing that kv head: GQA without expanding K/V) sweep the chunk's keys in
// segments of whole blocks with an online softmax (flash-attention's running max and sum):
//   pass 1  scores  S[qi][0:BS] += q[qi][d] * Kt[h][d][0:BS]   for d < D   (K transposed within the block:
//           BS-wide contiguous rows, broadcast FMAs, no horizontal reductions; up to kMR query vectors
//           share each K row loaded, their BS-wide score rows held in registers)
//   pass 2  softmax update per query vector: causally invisible keys get probability exactly 0
//   pass 3  acc[qi][0:D] += P[qi][j] * V[j][h][0:D]                          (kMR vectors per V row loaded)
// A decode is one streaming pass over its sequence's keys; a prefill tile of 16 rows reuses every K/V block
// it loads for 16 * g query vectors, which is what lets this kernel beat gather + SDPA on long chunks too.
// Blocks live at random places in the pool (a block's K for one head is one 2 KiB span: hardware
// prefetchers stop at its end), so pass 1 prefetches the next block's K and V explicitly (one block ahead:
// 128 random-block decodes of 600 keys took 2.5 ms on 1 thread, 3.3 ms without, 3.0 ms three blocks ahead).
// Items are independent: OpenMP spreads them over cores with dynamic scheduling (order: see run()).
// Measured on the bench workloads (bench/bench_attention.py, 2 threads): prefill tiles at ~75-135 GFLOP/s per
// core, decodes at the machine's streaming bandwidth for random 4 KiB blocks (~24 GB/s on 2 cores).
// Accumulation is in the input's precision (float32 or float64): fp64 keeps the engine's greedy-equality
// tests against the naive loop meaningful.
#include "paged_attention.h"
#include "cpu_isa.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"   // vector-typed helpers in the non-AVX copies: an ABI note, no bug
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace vcf {
namespace {

constexpr int kTileRows = 16;     // query rows per work item: each K/V block loaded serves 16 * g vectors
constexpr int kMR = 8;            // query vectors per register tile (8 x 16 fp32 scores = 8 zmm registers)
constexpr int kSegKeys = 512;     // keys per online-softmax segment (scores: 32 x 512 fp32 = 64 KiB, in L2;
                                  // ~6% faster than 256 on 110-row chunks over 600 keys, measured)
#ifndef VCF_PA_PREFETCH
#define VCF_PA_PREFETCH 1
#endif
constexpr int kPrefetchBlocks = VCF_PA_PREFETCH;

struct Item {
  int chunk;
  int64_t row0;
  int64_t cost;
};

// --- per-target copies of the tiles -----------------------------------------------------------------------
// The section after `#else` at the end of this file (exp, register tiles, one work item) is compiled three
// times, for AVX-512, AVX2+FMA and baseline x86-64, by including this file into three namespaces under
// `#pragma GCC target`, each with its native vector width (VCF_PA_VEC_BYTES); run() picks one by the CPU's
// features. (Not target_clones: GCC lowered the tiles' vector types for the default target before cloning,
// which left the AVX-512 clone ~3.5x slower; and 64-byte vectors in the AVX2 copy ran 30x slower, measured.)
#define VCF_PAGED_ATTENTION_TILES
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
#define VCF_PA_VEC_BYTES 64
namespace avx512 {
#include __FILE__
}  // namespace avx512
#undef VCF_PA_VEC_BYTES
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define VCF_PA_VEC_BYTES 32
namespace avx2 {
#include __FILE__
}  // namespace avx2
#undef VCF_PA_VEC_BYTES
#pragma GCC pop_options
#define VCF_PA_X86 1
#endif
#define VCF_PA_VEC_BYTES 16
namespace generic {
#include __FILE__
}  // namespace generic
#undef VCF_PA_VEC_BYTES
#undef VCF_PAGED_ATTENTION_TILES

template <typename T>
using RunItem = void (*)(const PagedAttentionArgs&, const Item&, const T*, const T*, const T*, T*, std::vector<T>&);
template <typename T>
RunItem<T> pick_run_item() {
#ifdef VCF_PA_X86
  switch (vcf::cpu_isa()) {   // the CPU's best, or the VIDEOCOM_CPU_ISA cap (cpu_isa.h)
    case vcf::Isa::avx512: return avx512::run_item<T>;
    case vcf::Isa::avx2: return avx2::run_item<T>;
    case vcf::Isa::baseline: break;
  }
#endif
  return generic::run_item<T>;
}

template <typename T>
void run(const PagedAttentionArgs& a, const T* q, const T* kp, const T* vp, T* out) {
  std::vector<Item> items;
  for (int c = 0; c < a.num_chunks; ++c) {
    const int64_t first_key = a.ctx_len[c] - a.q_len[c];
    for (int64_t r = 0; r < a.q_len[c]; r += kTileRows) {
      const int64_t rows = std::min<int64_t>(kTileRows, a.q_len[c] - r);
      items.push_back({c, r, rows * (first_key + r + rows) + 64});   // ~ scores computed (+ fixed overhead)
    }
  }
  // Prefill tiles first, longest first (with dynamic scheduling the last items to finish are short: balanced
  // threads), then the decodes in the caller's order: rollouts of one prompt are scheduled together and share
  // its blocks, which then come from cache instead of memory.
  const auto decodes = std::stable_partition(items.begin(), items.end(),
                                             [&](const Item& x) { return a.q_len[x.chunk] > 1; });
  std::stable_sort(items.begin(), decodes, [](const Item& x, const Item& y) { return x.cost > y.cost; });
  const int64_t n = (int64_t)items.size();
  static const RunItem<T> run_item = pick_run_item<T>();
#pragma omp parallel if (n > 1)
  {
    std::vector<T> buf;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) run_item(a, items[i], q, kp, vp, out, buf);
  }
}

// K rows go to the transposed storage (NB, Hkv, D, BS), V rows to (NB, BS, Hkv, D).
template <typename T>
void kv_write(T* kp, T* vp, const int64_t* slots, int64_t L, const T* k, const T* v, int64_t k_rs, int64_t k_hs,
              int64_t v_rs, int64_t v_hs, int Hkv, int D, int BS) {
#pragma omp parallel for schedule(static) if (L >= 1024)
  for (int64_t i = 0; i < L; ++i) {
    const int64_t b = slots[i] / BS, r = slots[i] % BS;
    for (int h = 0; h < Hkv; ++h) {
      const T* ks = k + i * k_rs + h * k_hs;
      T* kd = kp + ((b * Hkv + h) * D) * BS + r;
      for (int d = 0; d < D; ++d) kd[d * BS] = ks[d];
      std::memcpy(vp + ((b * BS + r) * Hkv + h) * D, v + i * v_rs + h * v_hs, sizeof(T) * D);
    }
  }
}

}  // namespace

// --- the previous kernel (K stored (NB, BS, Hkv, D); one dot over D with a horizontal reduction per score;
// chunks of <= 16 rows, longer ones went to gather + SDPA), kept verbatim as bench/bench_attention.py's
// baseline ("today's path"). Not used by the engine.
namespace rowdot {
constexpr int kTileRows = 8;

struct Item {
  int chunk;
  int64_t row0;
};

#include "exp_neg.h"   // exp_neg(float), exp_neg(double)

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

}  // namespace rowdot

void paged_attention_cpu(const PagedAttentionArgs& a, const float* q, const float* k, const float* v, float* o) {
  run(a, q, k, v, o);
}
void paged_attention_cpu(const PagedAttentionArgs& a, const double* q, const double* k, const double* v, double* o) {
  run(a, q, k, v, o);
}
void paged_attention_rowdot_cpu(const PagedAttentionArgs& a, const float* q, const float* k, const float* v, float* o) {
  rowdot::run(a, q, k, v, o);
}
void paged_attention_rowdot_cpu(const PagedAttentionArgs& a, const double* q, const double* k, const double* v,
                                double* o) {
  rowdot::run(a, q, k, v, o);
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

// k_pool is the (NB, BS, Hkv, D)-shaped view of the transposed storage (NB, Hkv, D, BS) (kv_cache.PagedKVPool,
// layout "k_transposed"); v_pool is (NB, BS, Hkv, D) contiguous. A pool in another layout is rejected here:
// read as transposed it would give finite, wrong numbers. Returns (NB, BS, Hkv, D). (k_transposed = false:
// the baseline kernel's standard layout, K contiguous like V.)
std::vector<int64_t> check_pools(const py::array& k_pool, const py::array& v_pool, bool k_transposed = true) {
  VCF_CHECK(k_pool.ndim() == 4 && v_pool.ndim() == 4, "k_pool/v_pool: expected (num_blocks, BS, Hkv, D)");
  for (int d = 0; d < 4; ++d) VCF_CHECK(k_pool.shape(d) == v_pool.shape(d), "k_pool/v_pool: shapes differ");
  VCF_CHECK(k_pool.dtype().is(v_pool.dtype()), "k_pool/v_pool: dtypes differ");
  VCF_CHECK(v_pool.flags() & py::array::c_style, "v_pool: must be contiguous (num_blocks, BS, Hkv, D)");
  const int64_t NB = k_pool.shape(0), BS = k_pool.shape(1), Hkv = k_pool.shape(2), D = k_pool.shape(3);
  const int64_t it = k_pool.itemsize();
  const int64_t want[4] = {Hkv * D * BS * it, it, D * BS * it, BS * it};   // strides of the transposed storage
  if (!k_transposed) {
    VCF_CHECK(k_pool.flags() & py::array::c_style, "k_pool: must be contiguous (num_blocks, BS, Hkv, D)");
    return {NB, BS, Hkv, D};
  }
  for (int d = 0; d < 4; ++d)
    VCF_CHECK(k_pool.shape(d) == 1 || k_pool.strides(d) == want[d],
              "k_pool: expected K transposed within blocks (PagedKVPool layout 'k_transposed': storage "
              "(num_blocks, Hkv, D, BS) seen as (num_blocks, BS, Hkv, D)); got strides of another layout");
  return {NB, BS, Hkv, D};
}

template <typename T>
void call(const py::array& q, const py::array& k_pool, const py::array& v_pool, py::array& out,
          vcf::PagedAttentionArgs& a, bool rowdot) {
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
  if (rowdot) vcf::paged_attention_rowdot_cpu(a, qp, kp, vp, op);
  else vcf::paged_attention_cpu(a, qp, kp, vp, op);
}

void attention_checked(const py::array& q, const py::array& k_pool, const py::array& v_pool, py::array& out,
                       const py::array& q_start, const py::array& q_len, const py::array& ctx_len,
                       const py::array& table_off, const py::array& tables, double scale, bool rowdot) {
  VCF_CHECK(q.ndim() == 3, "q: expected (L, Hq, D)");
  const auto pool = check_pools(k_pool, v_pool, !rowdot);
  VCF_CHECK(out.ndim() == 3 && (out.flags() & py::array::c_style) && out.writeable(),
            "out: expected a writable contiguous (L, Hq, D) array");
  const int64_t L = q.shape(0), Hq = q.shape(1), D = q.shape(2);
  const int64_t NB = pool[0], BS = pool[1], Hkv = pool[2];
  VCF_CHECK(out.shape(0) == L && out.shape(1) == Hq && out.shape(2) == D, "out: shape must equal q's");
  VCF_CHECK(pool[3] == D, "k_pool: head dim differs from q's");
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
  if (q.itemsize() == 8) call<double>(q, k_pool, v_pool, out, a, rowdot);
  else call<float>(q, k_pool, v_pool, out, a, rowdot);
}

void paged_attention(const py::array& q, const py::array& k_pool, const py::array& v_pool, py::array& out,
                     const py::array& q_start, const py::array& q_len, const py::array& ctx_len,
                     const py::array& table_off, const py::array& tables, double scale) {
  attention_checked(q, k_pool, v_pool, out, q_start, q_len, ctx_len, table_off, tables, scale, false);
}
void paged_attention_rowdot(const py::array& q, const py::array& k_pool, const py::array& v_pool, py::array& out,
                            const py::array& q_start, const py::array& q_len, const py::array& ctx_len,
                            const py::array& table_off, const py::array& tables, double scale) {
  attention_checked(q, k_pool, v_pool, out, q_start, q_len, ctx_len, table_off, tables, scale, true);
}

template <typename T>
void write_typed(py::array& k_pool, py::array& v_pool, const int64_t* sl, int64_t L, const py::array& k,
                 const py::array& v, const std::vector<int64_t>& pool) {
  const T* ks = typed<T>(k, "k", 'f', sizeof(T));
  const T* vs = typed<T>(v, "v", 'f', sizeof(T));
  for (const auto& [x, name] : {std::pair<const py::array*, const char*>{&k, "k"}, {&v, "v"}}) {
    VCF_CHECK(x->strides(2) == (py::ssize_t)sizeof(T), std::string(name) + ": the head dim must be contiguous");
    VCF_CHECK(x->strides(0) >= 0 && x->strides(1) >= 0 && x->strides(0) % sizeof(T) == 0 &&
              x->strides(1) % sizeof(T) == 0, std::string(name) + ": unsupported strides");
  }
  T* kp = static_cast<T*>(k_pool.mutable_data());
  T* vp = static_cast<T*>(v_pool.mutable_data());
  // no GIL release: a copy of the step's rows (tens of us), shorter than re-acquiring the GIL from a thread
  // running Python
  vcf::kv_write<T>(kp, vp, sl, L, ks, vs, k.strides(0) / sizeof(T), k.strides(1) / sizeof(T), v.strides(0) / sizeof(T),
                   v.strides(1) / sizeof(T), (int)pool[2], (int)pool[3], (int)pool[1]);
}

void paged_kv_write(py::array& k_pool, py::array& v_pool, const py::array& slots, const py::array& k,
                    const py::array& v) {
  const auto pool = check_pools(k_pool, v_pool);
  VCF_CHECK(k_pool.writeable() && v_pool.writeable(), "k_pool/v_pool: must be writable");
  VCF_CHECK(slots.ndim() == 1 && (slots.flags() & py::array::c_style), "slots: expected a contiguous 1-D array");
  const auto* sl = typed<int64_t>(slots, "slots", 'i', 8);
  const int64_t L = slots.shape(0), cap = pool[0] * pool[1];
  for (const auto& [x, name] : {std::pair<const py::array*, const char*>{&k, "k"}, {&v, "v"}})
    VCF_CHECK(x->ndim() == 3 && x->shape(0) == L && x->shape(1) == pool[2] && x->shape(2) == pool[3],
              std::string(name) + ": expected (len(slots), Hkv, D) of the pool");
  for (int64_t i = 0; i < L; ++i)
    VCF_CHECK(sl[i] >= 0 && sl[i] < cap, "slots: index " + std::to_string(i) + " (slot " + std::to_string(sl[i]) +
                                             ") outside the pool's " + std::to_string(cap) + " rows");
  if (k_pool.itemsize() == 8) write_typed<double>(k_pool, v_pool, sl, L, k, v, pool);
  else write_typed<float>(k_pool, v_pool, sl, L, k, v, pool);
}

}  // namespace

void register_attention(py::module_& m) {
  m.def("paged_attention", &paged_attention, py::arg("q"), py::arg("k_pool"), py::arg("v_pool"), py::arg("out"),
        py::arg("q_start"), py::arg("q_len"), py::arg("ctx_len"), py::arg("table_off"), py::arg("tables"),
        py::arg("scale"),
        "Causal attention of packed query chunks over paged K/V (float32 or float64, CPU). q (L, Hq, D) may be "
        "strided in its first two dims; out (L, Hq, D) contiguous; v_pool (num_blocks, BS, Hkv, D) contiguous; "
        "k_pool the (num_blocks, BS, Hkv, D) view of K stored transposed within blocks (num_blocks, Hkv, D, BS).");
  m.def("paged_attention_rowdot", &paged_attention_rowdot, py::arg("q"), py::arg("k_pool"), py::arg("v_pool"),
        py::arg("out"), py::arg("q_start"), py::arg("q_len"), py::arg("ctx_len"), py::arg("table_off"),
        py::arg("tables"), py::arg("scale"),
        "The previous kernel (both pools (num_blocks, BS, Hkv, D) contiguous; a dot over D per score), kept as "
        "bench/bench_attention.py's baseline. Same arguments and checks as paged_attention.");
  m.def("paged_kv_write", &paged_kv_write, py::arg("k_pool"), py::arg("v_pool"), py::arg("slots"), py::arg("k"),
        py::arg("v"),
        "Write rows k, v (L, Hkv, D) at flat slots (block * BS + row) of the pools (layouts as paged_attention).");
}
#endif  // VCF_KERNEL_ONLY

#else  // VCF_PAGED_ATTENTION_TILES: compiled once per target, inside vcf::{anonymous}::<target>

#include "exp_neg.h"   // exp_neg(float), exp_neg(double)

// --- register tiles (kBS / kD > 0: sizes fixed at compile time, loops fully unrolled into registers) -----
// Vec<T> is one native vector of this copy (VCF_PA_VEC_BYTES: a zmm register in the AVX-512 copy, ymm in the
// AVX2 one, xmm in the generic one); ld/st go through memcpy, which compiles to unaligned vector moves.
typedef float VecF __attribute__((vector_size(VCF_PA_VEC_BYTES)));
typedef double VecD __attribute__((vector_size(VCF_PA_VEC_BYTES)));
template <typename T>
using Vec = std::conditional_t<std::is_same_v<T, float>, VecF, VecD>;
template <typename T>
constexpr int kW = VCF_PA_VEC_BYTES / sizeof(T);
template <typename T>
__attribute__((always_inline)) inline Vec<T> ld(const T* p) {
  Vec<T> x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
template <typename T>
__attribute__((always_inline)) inline void st(T* p, const Vec<T>& x) { std::memcpy(p, &x, sizeof(x)); }

// s[j] = exp(s[j] - m) for j < n (scores <= m), returning their sum: exp_neg.h's polynomial on whole vectors
// (the plain loop stayed scalar in the AVX2 copy and made the softmax pass most of a tiny-head prefill tile).
template <typename T>
__attribute__((always_inline)) inline T exp_row(T* __restrict s, int n, T m) {
  T total = 0;
  int j = 0;
  if constexpr (std::is_same_v<T, float>) {
    typedef int32_t VecI __attribute__((vector_size(VCF_PA_VEC_BYTES)));
    constexpr int W = kW<float>;
    VecF sum{};
    for (; j + W <= n; j += W) {
      const VecF e = exp_neg_v<VecF, VecI>(ld<float>(s + j) - m);
      st<float>(s + j, e);
      sum += e;
    }
    for (int u = 0; u < W; ++u) total += sum[u];
  }
  for (; j < n; ++j) {
    s[j] = exp_neg(s[j] - m);
    total += s[j];
  }
  return total;
}

// s[r * sst + j] = sum_d q[r * D + d] * kt[d * BS + j] for r < MR, j < BS
template <typename T, int MR, int kD, int kBS>
__attribute__((always_inline)) inline void qk_tile(const T* __restrict q, const T* __restrict kt, T* __restrict s,
                                                   int sst, int D_, int BS_) {
  const int D = kD > 0 ? kD : D_;
  if constexpr (kBS > 0 && kBS % kW<T> == 0) {
    constexpr int NV = kBS / kW<T>;
    Vec<T> acc[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int u = 0; u < NV; ++u) acc[r][u] = Vec<T>{};
    for (int d = 0; d < D; ++d) {
      Vec<T> kr[NV];
      for (int u = 0; u < NV; ++u) kr[u] = ld<T>(kt + d * kBS + u * kW<T>);
      for (int r = 0; r < MR; ++r) {
        const T qd = q[r * D + d];
        for (int u = 0; u < NV; ++u) acc[r][u] += qd * kr[u];
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int u = 0; u < NV; ++u) st<T>(s + r * sst + u * kW<T>, acc[r][u]);
  } else {
    const int BS = BS_;
    for (int r = 0; r < MR; ++r) {
      T* sr = s + r * sst;
      for (int j = 0; j < BS; ++j) sr[j] = 0;
      for (int d = 0; d < D; ++d) {
        const T qd = q[r * D + d];
        const T* kr = kt + d * BS;
#pragma omp simd
        for (int j = 0; j < BS; ++j) sr[j] += qd * kr[j];
      }
    }
  }
}

// acc[r * D + d] += sum_{j < cnt} p[r * pst + j] * v[j * vst + d] for r < MR, in column strips of kDT
template <typename T, int MR, int kD>
__attribute__((always_inline)) inline void pv_tile(const T* __restrict p, int pst, const T* __restrict v, int64_t vst,
                                                   T* __restrict acc, int cnt, int D_) {
  if constexpr (kD > 0 && kD % kW<T> == 0) {
    constexpr int kDT = kD < 2 * kW<T> ? kD : 2 * kW<T>;   // 8 rows x 2 vectors = 16 accumulator registers
    constexpr int NV = kDT / kW<T>;
    for (int d0 = 0; d0 < kD; d0 += kDT) {
      Vec<T> o[MR][NV];
      for (int r = 0; r < MR; ++r)
        for (int u = 0; u < NV; ++u) o[r][u] = ld<T>(acc + r * kD + d0 + u * kW<T>);
      for (int j = 0; j < cnt; ++j) {
        Vec<T> vr[NV];
        for (int u = 0; u < NV; ++u) vr[u] = ld<T>(v + j * vst + d0 + u * kW<T>);
        for (int r = 0; r < MR; ++r) {
          const T w = p[r * pst + j];
          for (int u = 0; u < NV; ++u) o[r][u] += w * vr[u];
        }
      }
      for (int r = 0; r < MR; ++r)
        for (int u = 0; u < NV; ++u) st<T>(acc + r * kD + d0 + u * kW<T>, o[r][u]);
    }
  } else {
    const int D = kD > 0 ? kD : D_;
    for (int j = 0; j < cnt; ++j) {
      const T* vr = v + j * vst;
      for (int r = 0; r < MR; ++r) {
        const T w = p[r * pst + j];
        T* o = acc + r * D;
#pragma omp simd
        for (int d = 0; d < D; ++d) o[d] += w * vr[d];
      }
    }
  }
}

// Query vectors per register tile. The AVX2 copy's float32 tiles take as many as keep the QK tile's
// accumulators (MR x NV vectors), one K row (NV) and a broadcast in the 16 ymm registers: 8 rows of a 16-key
// block (2 ymm each) spilled, 6 do not. Measured on a 2-core AMD EPYC with AVX2 (1 thread, bench_attention's
// mixed step, A/B builds, 3 alternating runs): 7B heads 1.09-1.16 s -> 0.89-0.97 s (1.2x); the tiny heads
// unchanged (their step is the softmax pass). No sum changes: bit-equal. The other copies (AVX-512's 32
// registers; SSE, float64: not measured) keep kMR.
template <typename T, int kBS>
constexpr int tile_rows() {
  if constexpr (VCF_PA_VEC_BYTES == 32 && std::is_same_v<T, float>) {
    constexpr int nv = kBS > 0 && kBS % kW<T> == 0 ? kBS / kW<T> : 2;
    return std::max(1, std::min(kMR, (16 - nv - 1) / nv));
  } else {
    return kMR;
  }
}

// The remainder of the query vectors (nq % tile_rows) runs a narrower tile of the same code.
template <typename T, int kD, int kBS>
inline void qk_rows(int mr, const T* q, const T* kt, T* s, int sst, int D, int BS) {
  switch (mr) {
    case 8: return qk_tile<T, 8, kD, kBS>(q, kt, s, sst, D, BS);
    case 7: return qk_tile<T, 7, kD, kBS>(q, kt, s, sst, D, BS);
    case 6: return qk_tile<T, 6, kD, kBS>(q, kt, s, sst, D, BS);
    case 5: return qk_tile<T, 5, kD, kBS>(q, kt, s, sst, D, BS);
    case 4: return qk_tile<T, 4, kD, kBS>(q, kt, s, sst, D, BS);
    case 3: return qk_tile<T, 3, kD, kBS>(q, kt, s, sst, D, BS);
    case 2: return qk_tile<T, 2, kD, kBS>(q, kt, s, sst, D, BS);
    default: return qk_tile<T, 1, kD, kBS>(q, kt, s, sst, D, BS);
  }
}
template <typename T, int kD>
inline void pv_rows(int mr, const T* p, int pst, const T* v, int64_t vst, T* acc, int cnt, int D) {
  switch (mr) {
    case 8: return pv_tile<T, 8, kD>(p, pst, v, vst, acc, cnt, D);
    case 7: return pv_tile<T, 7, kD>(p, pst, v, vst, acc, cnt, D);
    case 6: return pv_tile<T, 6, kD>(p, pst, v, vst, acc, cnt, D);
    case 5: return pv_tile<T, 5, kD>(p, pst, v, vst, acc, cnt, D);
    case 4: return pv_tile<T, 4, kD>(p, pst, v, vst, acc, cnt, D);
    case 3: return pv_tile<T, 3, kD>(p, pst, v, vst, acc, cnt, D);
    case 2: return pv_tile<T, 2, kD>(p, pst, v, vst, acc, cnt, D);
    default: return pv_tile<T, 1, kD>(p, pst, v, vst, acc, cnt, D);
  }
}

// --- one work item ---------------------------------------------------------------------------------------

template <typename T, int kD, int kBS>
__attribute__((always_inline)) inline void run_item_impl(const PagedAttentionArgs& a, const Item& it, const T* q,
                                                          const T* kp, const T* vp, T* out, std::vector<T>& buf) {
  const int D = kD > 0 ? kD : a.head_dim, BS = kBS > 0 ? kBS : a.block_size;
  constexpr int kRowsT = tile_rows<T, kBS>();
  const int Hq = a.num_q_heads, Hkv = a.num_kv_heads, g = Hq / Hkv;
  const int64_t n = a.q_len[it.chunk], first_key = a.ctx_len[it.chunk] - n;
  const int rows = (int)std::min<int64_t>(kTileRows, n - it.row0);
  const int nq = rows * g;                              // query vector qi = (row qi / g, head h * g + qi % g)
  const int64_t keys = first_key + it.row0 + rows;      // keys [0, keys) are seen by some row of the tile
  const int seg_blocks = std::max(1, kSegKeys / BS);
  const int seg_cap = seg_blocks * BS;
  const size_t need = (size_t)nq * (2 * D + 2 + seg_cap);
  if (buf.size() < need) buf.resize(need);
  T* qv = buf.data();              // (nq, D) scaled queries
  T* acc = qv + nq * D;            // (nq, D) output accumulators
  T* mx = acc + nq * D;            // (nq,) running max of the scores
  T* sum = mx + nq;                // (nq,) running sum of exp(score - max)
  T* sc = sum + nq;                // (nq, seg_cap) scores, then probabilities, of one segment
  const T scale = (T)a.scale;
  const int64_t k_block = (int64_t)Hkv * D * BS, v_row = (int64_t)Hkv * D;   // (per block, per row)
  const int32_t* table = a.tables + a.table_off[it.chunk];
  const int64_t vis0 = first_key + it.row0 + 1;         // row r of the tile sees keys [0, vis0 + r)
  for (int h = 0; h < Hkv; ++h) {
    for (int qi = 0; qi < nq; ++qi) {
      const T* src = q + (a.q_start[it.chunk] + it.row0 + qi / g) * a.q_row_stride + (h * g + qi % g) * a.q_head_stride;
      for (int d = 0; d < D; ++d) qv[qi * D + d] = src[d] * scale;
      mx[qi] = -std::numeric_limits<T>::infinity();
      sum[qi] = 0;
    }
    std::fill(acc, acc + nq * D, T(0));
    for (int64_t s0 = 0; s0 < keys; s0 += seg_cap) {
      const int seg_len = (int)std::min<int64_t>(seg_cap, keys - s0);
      const int64_t b0 = s0 / BS, nb = (seg_len + BS - 1) / BS;
      for (int64_t b = b0; b < b0 + nb; ++b) {          // pass 1: scores of the segment
        if (kPrefetchBlocks > 0 && b + kPrefetchBlocks < (keys + BS - 1) / BS) {
          const int64_t pb = table[b + kPrefetchBlocks];
          const char* kpf = reinterpret_cast<const char*>(kp + pb * k_block + (int64_t)h * D * BS);
          for (size_t o = 0; o < sizeof(T) * D * BS; o += 64) __builtin_prefetch(kpf + o);
          const char* vpf = reinterpret_cast<const char*>(vp + pb * k_block + (int64_t)h * D);
          for (int j = 0; j < BS; ++j)
            for (size_t o = 0; o < sizeof(T) * D; o += 64) __builtin_prefetch(vpf + j * v_row * sizeof(T) + o);
        }
        const T* kt = kp + (int64_t)table[b] * k_block + (int64_t)h * D * BS;
        for (int qi = 0; qi < nq; qi += kRowsT)
          qk_rows<T, kD, kBS>(std::min(kRowsT, nq - qi), qv + qi * D, kt, sc + qi * seg_cap + (b - b0) * BS, seg_cap,
                              D, BS);
      }
      for (int qi = 0; qi < nq; ++qi) {                 // pass 2: online softmax update
        T* srow = sc + qi * seg_cap;
        const int nv = (int)std::clamp<int64_t>(vis0 + qi / g - s0, 0, seg_len);   // causal: visible keys
        if (nv == 0) {
          std::fill(srow, srow + seg_len, T(0));
          continue;
        }
        T m = srow[0];
#pragma omp simd reduction(max : m)
        for (int j = 1; j < nv; ++j) m = srow[j] > m ? srow[j] : m;
        if (m > mx[qi]) {                               // rescale what was accumulated under the old max
          const T alpha = exp_neg(mx[qi] - m);
          sum[qi] *= alpha;
          for (int d = 0; d < D; ++d) acc[qi * D + d] *= alpha;
          mx[qi] = m;
        }
        sum[qi] += exp_row(srow, nv, mx[qi]);
        std::fill(srow + nv, srow + seg_len, T(0));
      }
      for (int64_t b = b0; b < b0 + nb; ++b) {          // pass 3: probabilities x V
        const T* vb = vp + (int64_t)table[b] * k_block + (int64_t)h * D;
        const int cnt = (int)std::min<int64_t>(BS, keys - b * BS);   // rows past the tile's keys: not read
        for (int qi = 0; qi < nq; qi += kRowsT)
          pv_rows<T, kD>(std::min(kRowsT, nq - qi), sc + qi * seg_cap + (b - b0) * BS, seg_cap, vb, v_row,
                         acc + qi * D, cnt, D);
      }
    }
    for (int qi = 0; qi < nq; ++qi) {                   // out rows are (L, Hq, D) contiguous
      T* o = out + ((a.q_start[it.chunk] + it.row0 + qi / g) * Hq + h * g + qi % g) * D;
      const T inv = T(1) / sum[qi];
      for (int d = 0; d < D; ++d) o[d] = acc[qi * D + d] * inv;
    }
  }
}

template <typename T, int kBS>
__attribute__((always_inline)) inline void run_item_d(const PagedAttentionArgs& a, const Item& it, const T* q,
                                                       const T* kp, const T* vp, T* out, std::vector<T>& buf) {
  switch (a.head_dim) {
    case 32: return run_item_impl<T, 32, kBS>(a, it, q, kp, vp, out, buf);
    case 64: return run_item_impl<T, 64, kBS>(a, it, q, kp, vp, out, buf);
    case 128: return run_item_impl<T, 128, kBS>(a, it, q, kp, vp, out, buf);
    default: return run_item_impl<T, 0, kBS>(a, it, q, kp, vp, out, buf);
  }
}
template <typename T>
void run_item(const PagedAttentionArgs& a, const Item& it, const T* q, const T* kp, const T* vp, T* out,
              std::vector<T>& buf) {
  if (a.block_size == 16) return run_item_d<T, 16>(a, it, q, kp, vp, out, buf);
  run_item_impl<T, 0, 0>(a, it, q, kp, vp, out, buf);
}

#endif  // VCF_PAGED_ATTENTION_TILES
