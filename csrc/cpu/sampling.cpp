// Top-k / top-p draws for the rollout engine, one row per sampling sequence, and its binding.
//
// Legend: N rows, V vocabulary, k top_k, u_n the row's uniform draw in [0, 1).
//
// Same distribution as videocom_fast/rollout/sampling.py (`filter_logits` then an inverse-CDF draw, the order
// transformers' TopK then TopP warpers apply): keep every logit >= the k-th largest (ties at the k-th value are
// all kept), then in ascending order drop the tokens whose cumulative probability stays <= 1 - top_p (the most
// likely token always stays), then draw the first token whose cumulative probability exceeds u_n * total.
// The CDF runs in the torch path's order (see draw_row), so both pick the same token for the same u except
// where u_n falls within rounding of a CDF step (both take float32 exps, here exp_neg.h's polynomial, ~1 ulp, and
// sum them in float64; session 18: std::exp in float64 cost 0.3 us of a 3 us row at k = 50).
// Why C++: the torch path costs ~10 small ops per engine step (topk, tie check, flips, softmax, cumsum,
// searchsorted; ~1.2 ms for 128 x 640 logits measured); this is a guessed threshold checked by one vectorized
// count, a vectorized selection of the k-th value among the candidates (kth_largest), and a sort of k integers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "check.h"
#include "vec8.h"   // V8f / V8i, load8 / store8, VCF_CLONES_AVX2

namespace py = pybind11;

namespace vcf {
namespace {

#include "exp_neg.h"   // exp_neg_v: 8 lanes of the polynomial exp (the paged-attention kernel's)

// Floats as int32 keys in the same order (negative floats mirrored): a selection by counting on ints.
inline int32_t order_key(float v) {
  int32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b >= 0 ? b : b ^ 0x7fffffff;
}

// How many keys are >= t: int32 lanes (no widening), one clone per vector width chosen at load time.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
int64_t count_at_least(const int32_t* keys, int64_t V, int32_t t) {
  int32_t c = 0;   // V < 2^31 (checked by the caller)
  for (int64_t i = 0; i < V; ++i) c += keys[i] >= t;
  return c;
}

// The k-th largest finite value of x[0, V) (or -inf when fewer than k are finite), by binary search on the
// ordered keys: the largest key t with count(key >= t) >= k is the k-th value's key. Each count is a
// branch-free pass the compiler vectorizes; a heap or nth_element spends most of its time in mispredicted
// branches on random logits (measured, the whole draw of a 640-logit row at k = 50: 8.4 us with a heap,
// the same with nth_element, 2.9 us this way).
float kth_largest(const float* x, int64_t V, int64_t k, std::vector<int32_t>& keys) {
  const float ninf = -std::numeric_limits<float>::infinity();
  keys.resize(V);
  int32_t lo = std::numeric_limits<int32_t>::max(), hi = std::numeric_limits<int32_t>::min();
  int64_t finite = 0;
  for (int64_t i = 0; i < V; ++i) {
    const bool ok = x[i] > ninf;   // -inf and NaN are never sampled (torch's topk would rank a NaN first)
    const int32_t key = ok ? order_key(x[i]) : std::numeric_limits<int32_t>::min();
    keys[i] = key;
    finite += ok;
    if (ok) {
      lo = std::min(lo, key);
      hi = std::max(hi, key);
    }
  }
  if (finite < k) return ninf;
  const int32_t* kp = keys.data();
  while (lo < hi) {   // invariant: count(key >= lo) >= k
    const int32_t mid = static_cast<int32_t>(lo + ((static_cast<int64_t>(hi) - lo + 1) >> 1));
    if (count_at_least(kp, V, mid) >= k) lo = mid; else hi = mid - 1;
  }
  for (int64_t i = 0; i < V; ++i)
    if (kp[i] == lo) return x[i];
  return ninf;   // unreachable: lo is some element's key
}

// How many values are >= t (NaN never): a branch-free pass, one clone per vector width.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
int64_t count_ge(const float* x, int64_t V, float t) {
  int32_t c = 0;   // V < 2^31 (checked by the caller)
  for (int64_t i = 0; i < V; ++i) c += x[i] >= t;
  return c;
}

struct Scratch {   // per thread, reused across rows
  std::vector<std::pair<float, int64_t>> kept;
  std::vector<int32_t> keys, cand;
  std::vector<float> sample, cval;
  std::vector<uint64_t> sorted;
  std::vector<double> e;
};

// s.kept = the row's values >= its k-th largest (all ties kept; -inf and NaN never), ascending by (value, id).
// The k-th value is found among CANDIDATES: a strided sample of 64 values guesses a threshold t that about 2k + 4
// of every 64 values reach, one vectorized pass counts them, and when there are between k and 4k + 64 the values
// >= t (which hold the k largest) are compacted branch-free into a small buffer where kth_largest runs on ~k
// values instead of V. A guess outside that range falls back to kth_largest over the whole row. The kept values
// are sorted as 64-bit (order key, id) integers. Measured on a 2-core AMD EPYC (AVX2), 104 rows of 640 logits,
// k = 50, top_p 1: 5.6 -> 4.1 us a row (k = 5: 3.7 -> 1.1), the same token for every row (a standalone build
// of both versions, same run). Session 17, 2-core Intel Xeon (AVX-512), 73 rows of 640 logits, k = 50: the
// branch-free key build below took the draw from 2.78 to 2.20 us a row (a standalone build of both, same tokens);
// sorting all candidates instead of selecting the k-th first was slower (2.56 us).
void top_k_kept(const float* x, int64_t V, int64_t k, Scratch& s) {
  const float ninf = -std::numeric_limits<float>::infinity();
  float kth = ninf;
  int64_t m = V;                  // the values kept ones are collected from: s.cand[0, m) or the whole row
  bool from_cand = false;
  if (k > 0 && k < V) {
    const int64_t S = std::min<int64_t>(V, 64), stride = V / S;
    s.sample.resize(S);
    for (int64_t j = 0; j < S; ++j) {
      const float v = x[j * stride];
      s.sample[j] = v == v ? v : ninf;   // NaN ranks last (a strict weak order for nth_element)
    }
    const int64_t r = std::min<int64_t>(S - 1, 2 * (k * S / V) + 4);
    std::nth_element(s.sample.begin(), s.sample.begin() + r, s.sample.end(), std::greater<float>());
    const float t = s.sample[r];
    const int64_t c = count_ge(x, V, t);
    if (c >= k && c <= 4 * k + 64) {
      s.cand.resize(V);
      s.cval.resize(V);
      m = 0;
      for (int64_t i = 0; i < V; ++i) {   // branch-free compaction of the candidates
        s.cand[m] = static_cast<int32_t>(i);
        s.cval[m] = x[i];
        m += x[i] >= t;
      }
      kth = kth_largest(s.cval.data(), m, k, s.keys);   // exact: the k largest are all candidates
      from_cand = true;
    } else {
      kth = kth_largest(x, V, k, s.keys);
    }
  }
  // kept as 64-bit sort keys: (order key of the value, id) ascending = ascending value, ties by id; written
  // branch-free (every key stored, the count advanced by the test: on random logits the branch mispredicted
  // often enough to cost a fifth of the draw)
  s.sorted.resize(m);
  uint64_t* keys = s.sorted.data();
  int64_t n = 0;
  auto keep = [&](int64_t i) {
    const float v = x[i];
    keys[n] = (static_cast<uint64_t>(static_cast<uint32_t>(order_key(v)) ^ 0x80000000u) << 32) |
              static_cast<uint32_t>(i);
    n += (v >= kth) & (v > ninf);   // NaN and -inf fail both tests
  };
  if (from_cand) {
    for (int64_t j = 0; j < m; ++j) keep(s.cand[j]);
  } else {
    for (int64_t j = 0; j < m; ++j) keep(j);
  }
  s.sorted.resize(n);
  std::sort(s.sorted.begin(), s.sorted.end());
  s.kept.resize(s.sorted.size());
  for (size_t j = 0; j < s.sorted.size(); ++j) {
    const int64_t i = static_cast<int64_t>(s.sorted[j] & 0xffffffffu);
    s.kept[j] = {x[i], i};
  }
}

int64_t draw_row(const float* x, int64_t V, int64_t top_k, double top_p, double u, Scratch& s) {
  top_k_kept(x, V, top_k, s);
  auto& kept = s.kept;
  auto& e = s.e;
  if (kept.empty()) {   // every logit -inf/NaN: no distribution; the lowest id, as argmax of an all -inf row
    return 0;
  }
  const double mx = kept.back().first;
  const size_t n = kept.size();
  e.resize(n);
  auto fill_e = [&](size_t j0) {
    for (size_t j = j0; j < n; ++j) e[j] = exp_neg(static_cast<float>(kept[j].first - mx));
  };
  fill_e(0);
  size_t first = 0;
  if (top_p < 1.0) {
    double total = 0;
    for (size_t j = 0; j < n; ++j) total += e[j];
    double cum = 0;
    while (first + 1 < n) {   // the most likely token always stays
      cum += e[first] / total;
      if (cum > 1.0 - top_p) break;
      ++first;
    }
  }
  // CDF order of the torch path: ascending value when top-k cut the row without ties at the k-th value (its
  // top-k-only path), vocabulary order otherwise (its full-vocabulary path); either order, same distribution
  const bool cut = top_k > 0 && top_k < V && (int64_t)n == top_k;
  if (!cut) {
    std::sort(kept.begin() + first, kept.end(), [](const auto& a, const auto& b) { return a.second < b.second; });
    fill_e(first);
  }
  double total = 0;
  for (size_t j = first; j < n; ++j) total += e[j];
  const double target = u * total;
  double cum = 0;
  for (size_t j = first; j < n; ++j) {
    cum += e[j];
    if (cum > target) return kept[j].second;
  }
  return kept.back().second;
}

// (N, V) of a contiguous float32 logits array, checked (both draws' entry points).
std::pair<int64_t, int64_t> logits_shape(const py::array& logits) {
  VCF_CHECK(logits.ndim() == 2 && (logits.flags() & py::array::c_style), "logits: expected a contiguous (N, V) array");
  VCF_CHECK(logits.dtype().kind() == 'f' && logits.itemsize() == 4, "logits: expected float32");
  const int64_t V = logits.shape(1);
  VCF_CHECK(V >= 1 && V < (int64_t(1) << 31), "logits: vocabulary size must be in [1, 2^31)");
  return {logits.shape(0), V};
}

void sample_logits(const py::array& logits, const py::array& u, int64_t top_k, double top_p, py::array& out) {
  const auto shape = logits_shape(logits);
  const int64_t N = shape.first, V = shape.second;
  VCF_CHECK(u.ndim() == 1 && u.shape(0) == N && (u.flags() & py::array::c_style) && u.dtype().kind() == 'f' &&
                u.itemsize() == 8, "u: expected a contiguous float64 (N,) array");
  VCF_CHECK(out.ndim() == 1 && out.shape(0) == N && (out.flags() & py::array::c_style) && out.writeable() &&
                out.dtype().kind() == 'i' && out.itemsize() == 8, "out: expected a writable contiguous int64 (N,) array");
  VCF_CHECK(top_k >= 0, "top_k: must be >= 0 (0: no top-k)");
  VCF_CHECK(top_p > 0.0 && top_p <= 1.0, "top_p: must be in (0, 1]");
  const float* x = static_cast<const float*>(logits.data());
  const double* up = static_cast<const double*>(u.data());
  for (int64_t n = 0; n < N; ++n) VCF_CHECK(up[n] >= 0.0 && up[n] < 1.0, "u: row " + std::to_string(n) + " outside [0, 1)");
  int64_t* o = static_cast<int64_t*>(out.mutable_data());
  py::gil_scoped_release release;
  // a row costs 2-5 us at V = 640, k = 50 (more with V): rows in parallel from 16 on (an OpenMP region costs
  // ~1-3 us); with one OpenMP thread (OMP_NUM_THREADS=1 runs) this is the serial loop
#pragma omp parallel if (N >= 16)
  {
    Scratch scratch;
#pragma omp for schedule(dynamic, 8)
    for (int64_t n = 0; n < N; ++n) o[n] = draw_row(x + n * V, V, top_k, top_p, up[n], scratch);
  }
}

// --- the engine step's whole sampler in one call (sample_rows) ------------------------------------------------

// w = x / T (a true division in float32, as torch's `logits.float() / T`); returns log(sum_i exp(w_i - max)) + max,
// the row's log-partition: exp in 8 lanes of exp_neg.h's polynomial (~1 ulp), the sum in float64. A NaN anywhere
// makes it NaN (as torch's log_softmax); an all -inf row gives -inf.
// Both passes in explicit 8-lane vectors: GCC keeps a float max reduction scalar without -ffast-math.
VCF_CLONES_AVX2 double scale_logsumexp(const float* x, int64_t V, float T, float* w) {
  const float ninf = -std::numeric_limits<float>::infinity();
  V8f m8 = V8f{} + ninf;
  V8i nan8{};
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) {
    const V8f v = load8(x + i) / T;
    store8(w + i, v);
    m8 = v > m8 ? v : m8;
    nan8 |= v != v;
  }
  float mx = ninf;
  bool nan = false;
  for (int u = 0; u < 8; ++u) {
    mx = m8[u] > mx ? m8[u] : mx;
    nan |= nan8[u] != 0;
  }
  for (; i < V; ++i) {
    const float v = x[i] / T;
    w[i] = v;
    mx = v > mx ? v : mx;
    nan |= v != v;
  }
  if (nan) return std::numeric_limits<double>::quiet_NaN();
  if (mx == ninf) return mx;
  V8f acc{};
  i = 0;
  for (; i + 8 <= V; i += 8) {
    acc += exp_neg_v<V8f, V8i>(load8(w + i) - mx);
  }
  double total = 0;
  for (int u = 0; u < 8; ++u) total += acc[u];
  for (; i < V; ++i) total += exp_neg(w[i] - mx);
  return static_cast<double>(mx) + std::log(total);
}

// The first index of the largest value (a NaN counts as the largest, the first NaN wins: torch's argmax).
int64_t argmax_row(const float* w, int64_t V) {
  int64_t best = 0;
  for (int64_t i = 1; i < V; ++i) {
    const float b = w[best], v = w[i];
    if (b != b) break;
    if (v > b || v != v) best = i;
  }
  return best;
}

// sampling.py's `sample` for CPU float32 logits in one call: per row, w = logits / T, the log-partition of w (the
// log-prob is taken BEFORE suppression and truncation, as the trainer computes it), the suppressed ids set to
// -inf, then the argmax (greedy) or draw_row's top-k / top-p draw with the row's uniform, a forced token (>= 0)
// replacing it, and the log-prob of the token kept. Why: the torch path is ~8 ATen calls per step (divide,
// log_softmax, index_fill, the draw, where, gather, their conversions), each with its dispatch cost.
void sample_rows(const py::array& logits, double temperature, const py::array& suppress, const py::array& u,
                 const py::array& forced, int64_t top_k, double top_p, bool greedy, py::array& tokens,
                 py::array& logprobs) {
  const auto shape = logits_shape(logits);
  const int64_t N = shape.first, V = shape.second;
  VCF_CHECK(temperature > 0.0, "temperature: must be > 0");
  auto vec = [&](const py::array& a, char kind, int64_t n, const char* what) {
    VCF_CHECK(a.ndim() == 1 && a.shape(0) == n && (a.flags() & py::array::c_style) && a.dtype().kind() == kind &&
                  a.itemsize() == 8, std::string(what) + ": expected a contiguous 1-d array of " + std::to_string(n) +
                  (kind == 'f' ? " float64" : " int64") + " values");
  };
  vec(u, 'f', greedy ? u.shape(0) : N, "u");
  vec(forced, 'i', N, "forced");
  vec(suppress, 'i', suppress.ndim() == 1 ? suppress.shape(0) : -1, "suppress");
  vec(tokens, 'i', N, "tokens");
  VCF_CHECK(tokens.writeable(), "tokens: expected a writable array");
  VCF_CHECK(logprobs.ndim() == 1 && logprobs.shape(0) == N && (logprobs.flags() & py::array::c_style) &&
                logprobs.writeable() && logprobs.dtype().kind() == 'f' && logprobs.itemsize() == 4,
            "logprobs: expected a writable contiguous float32 (N,) array");
  VCF_CHECK(top_k >= 0, "top_k: must be >= 0 (0: no top-k)");
  VCF_CHECK(top_p > 0.0 && top_p <= 1.0, "top_p: must be in (0, 1]");
  const float* x = static_cast<const float*>(logits.data());
  const double* up = static_cast<const double*>(u.data());
  const int64_t* fp = static_cast<const int64_t*>(forced.data());
  const int64_t* sp = static_cast<const int64_t*>(suppress.data());
  const int64_t S = suppress.shape(0);
  for (int64_t j = 0; j < S; ++j) VCF_CHECK(sp[j] >= 0 && sp[j] < V, "suppress: id " + std::to_string(sp[j]) +
                                            " outside the vocabulary [0, " + std::to_string(V) + ")");
  for (int64_t n = 0; n < N; ++n) {
    VCF_CHECK(fp[n] < V, "forced: row " + std::to_string(n) + " holds id " + std::to_string(fp[n]) + " >= V " +
                             std::to_string(V));
    VCF_CHECK(greedy || (up[n] >= 0.0 && up[n] < 1.0), "u: row " + std::to_string(n) + " outside [0, 1)");
  }
  int64_t* tok = static_cast<int64_t*>(tokens.mutable_data());
  float* lp = static_cast<float*>(logprobs.mutable_data());
  const float T = static_cast<float>(temperature);
  py::gil_scoped_release release;
#pragma omp parallel if (N >= 16)
  {
    Scratch scratch;
    std::vector<float> w(V);
#pragma omp for schedule(dynamic, 8)
    for (int64_t n = 0; n < N; ++n) {
      const double lse = scale_logsumexp(x + n * V, V, T, w.data());
      int64_t t = fp[n];
      if (t < 0) {
        for (int64_t j = 0; j < S; ++j) w[sp[j]] = -std::numeric_limits<float>::infinity();
        t = greedy ? argmax_row(w.data(), V) : draw_row(w.data(), V, top_k, top_p, up[n], scratch);
      }
      tok[n] = t;
      lp[n] = static_cast<float>(static_cast<double>(x[n * V + t] / T) - lse);
    }
  }
}

}  // namespace
}  // namespace vcf

void register_sampling(py::module_& m) {
  m.def("sample_logits", &vcf::sample_logits, py::arg("logits"), py::arg("u"), py::arg("top_k"), py::arg("top_p"),
        py::arg("out"),
        "One inverse-CDF draw per row of float32 logits (N, V) after top-k (ties kept) then top-p, with the row's "
        "uniform u (N,) float64 in [0, 1); token ids into out (N,) int64.");
  m.def("sample_rows", &vcf::sample_rows, py::arg("logits"), py::arg("temperature"), py::arg("suppress"),
        py::arg("u"), py::arg("forced"), py::arg("top_k"), py::arg("top_p"), py::arg("greedy"), py::arg("tokens"),
        py::arg("logprobs"),
        "The engine's sampler in one call: per row of float32 logits (N, V), log_softmax(logits / T) at the token "
        "(before suppression and truncation), the suppressed ids (S,) int64 excluded, then the argmax (greedy) or "
        "the top-k / top-p draw with u (N,) float64, a forced id (N,) int64 (>= 0) replacing it; ids into tokens "
        "(N,) int64, log-probs into logprobs (N,) float32.");
}
