// Top-k / top-p draws for the rollout engine, one row per sampling sequence, and its binding.
//
// Legend: N rows, V vocabulary, k top_k, u_n the row's uniform draw in [0, 1).
//
// Same distribution as videocom_fast/rollout/sampling.py (`filter_logits` then an inverse-CDF draw, the order
// transformers' TopK then TopP warpers apply): keep every logit >= the k-th largest (ties at the k-th value are
// all kept), then in ascending order drop the tokens whose cumulative probability stays <= 1 - top_p (the most
// likely token always stays), then draw the first token whose cumulative probability exceeds u_n * total.
// The CDF runs in the torch path's order (see draw_row), so both pick the same token for the same u except
// where u_n falls within rounding (float32 there, float64 here) of a CDF step.
// Why C++: the torch path costs ~10 small ops per engine step (topk, tie check, flips, softmax, cumsum,
// searchsorted; ~1.2 ms for 128 x 640 logits measured); this is one pass over the row plus a sort of k values.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "check.h"

namespace py = pybind11;

namespace vcf {
namespace {

int64_t draw_row(const float* x, int64_t V, int64_t top_k, double top_p, double u,
                 std::vector<std::pair<float, int64_t>>& kept, std::vector<float>& heap) {
  const float ninf = -std::numeric_limits<float>::infinity();
  float kth = ninf;
  if (top_k > 0 && top_k < V) {   // k-th largest finite logit: a size-k min-heap, one pass, most values rejected
    heap.clear();
    for (int64_t i = 0; i < V; ++i) {
      const float v = x[i];
      if (!(v > ninf)) continue;   // -inf and NaN are never sampled (torch's topk would rank a NaN first)
      if ((int64_t)heap.size() < top_k) {
        heap.push_back(v);
        std::push_heap(heap.begin(), heap.end(), std::greater<float>());
      } else if (v > heap.front()) {
        std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
        heap.back() = v;
        std::push_heap(heap.begin(), heap.end(), std::greater<float>());
      }
    }
    if ((int64_t)heap.size() == top_k) kth = heap.front();
  }
  kept.clear();
  for (int64_t i = 0; i < V; ++i)
    if (x[i] >= kth && x[i] > ninf) kept.emplace_back(x[i], i);   // NaN and -inf fail both tests
  if (kept.empty()) {   // every logit -inf/NaN: no distribution; the lowest id, as argmax of an all -inf row
    return 0;
  }
  std::sort(kept.begin(), kept.end());   // ascending value, ties by id
  const double mx = kept.back().first;
  size_t first = 0;
  if (top_p < 1.0) {
    double total = 0;
    for (auto& [v, i] : kept) total += std::exp((double)v - mx);
    double cum = 0;
    while (first + 1 < kept.size()) {   // the most likely token always stays
      cum += std::exp((double)kept[first].first - mx) / total;
      if (cum > 1.0 - top_p) break;
      ++first;
    }
  }
  // CDF order of the torch path: ascending value when top-k cut the row without ties at the k-th value (its
  // top-k-only path), vocabulary order otherwise (its full-vocabulary path); either order, same distribution
  const bool cut = top_k > 0 && top_k < V && (int64_t)kept.size() == top_k;
  if (!cut)
    std::sort(kept.begin() + first, kept.end(), [](const auto& a, const auto& b) { return a.second < b.second; });
  double total = 0;
  for (size_t j = first; j < kept.size(); ++j) total += std::exp((double)kept[j].first - mx);
  const double target = u * total;
  double cum = 0;
  for (size_t j = first; j < kept.size(); ++j) {
    cum += std::exp((double)kept[j].first - mx);
    if (cum > target) return kept[j].second;
  }
  return kept.back().second;
}

void sample_logits(const py::array& logits, const py::array& u, int64_t top_k, double top_p, py::array& out) {
  VCF_CHECK(logits.ndim() == 2 && (logits.flags() & py::array::c_style), "logits: expected a contiguous (N, V) array");
  VCF_CHECK(logits.dtype().kind() == 'f' && logits.itemsize() == 4, "logits: expected float32");
  const int64_t N = logits.shape(0), V = logits.shape(1);
  VCF_CHECK(V >= 1, "logits: empty vocabulary");
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
#pragma omp parallel if (N * V > (1 << 18))
  {
    std::vector<std::pair<float, int64_t>> kept;
    std::vector<float> heap;
#pragma omp for schedule(dynamic, 8)
    for (int64_t n = 0; n < N; ++n) o[n] = draw_row(x + n * V, V, top_k, top_p, up[n], kept, heap);
  }
}

}  // namespace
}  // namespace vcf

void register_sampling(py::module_& m) {
  m.def("sample_logits", &vcf::sample_logits, py::arg("logits"), py::arg("u"), py::arg("top_k"), py::arg("top_p"),
        py::arg("out"),
        "One inverse-CDF draw per row of float32 logits (N, V) after top-k (ties kept) then top-p, with the row's "
        "uniform u (N,) float64 in [0, 1); token ids into out (N,) int64.");
}
