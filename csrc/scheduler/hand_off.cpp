// The engine step's token hand-off (rollout/engine_step.py `_on_tokens`) in one call: each sampled token that
// cannot end its round is appended to its slot's round arrays (engine._SeqState), the others are returned to
// the Python path. Why: the numpy version is ~20 array calls a step (a lookup, masks, fancy-indexed writes and
// five increments), ~0.12 ms of host time on a 2-core Xeon, more than the work itself.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "check.h"

namespace py = pybind11;

namespace {

template <typename T>
T* column(py::array& a, int64_t rows, const char* name) {
  VCF_CHECK(a.ndim() == 1 && a.shape(0) >= rows && (a.flags() & py::array::c_style) && a.writeable() &&
                a.dtype().equal(py::dtype::of<T>()),
            std::string(name) + ": expected a writable contiguous 1-d " + std::string(py::str(py::dtype::of<T>())) +
                " array, at least " + std::to_string(rows) + " long");
  return static_cast<T*>(a.mutable_data());
}

template <typename T>
T* table(py::array& a, int64_t rows, int64_t width, const char* name) {
  VCF_CHECK(a.ndim() == 2 && a.shape(0) >= rows && a.shape(1) == width && (a.flags() & py::array::c_style) &&
                a.writeable() && a.dtype().equal(py::dtype::of<T>()),
            std::string(name) + ": expected a writable contiguous (slots, width) " +
                std::string(py::str(py::dtype::of<T>())) + " array");
  return static_cast<T*>(a.mutable_data());
}

// who (W,) slots, toks (W,) ids, lps (W,) log-probs; may_end (T,) int8: 1 a token that may end a round, 0 one
// that cannot, -1 not classified yet (ids >= T too: both take the per-token Python path, which needs no table).
// A token ends nothing when it cannot end a round and its round has room (rl < max_new - 1). Returns (end: the
// indices k of the others, in order; sids: the scheduler ids of the appended ones, for append_one_each).
py::tuple hand_off(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& who,
                   const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& toks,
                   const py::array_t<double, py::array::c_style | py::array::forcecast>& lps,
                   const py::array_t<int8_t, py::array::c_style>& may_end, int64_t max_new, py::array& sid,
                   py::array& pend, py::array& rl, py::array& npos, py::array& ntok, py::array& known,
                   py::array& last, py::array& rt_tok, py::array& rt_lp, py::array& rt_gen) {
  const int64_t W = who.size();
  VCF_CHECK(who.ndim() == 1 && toks.ndim() == 1 && lps.ndim() == 1 && toks.size() == W && lps.size() == W,
            "who, toks, lps: expected 1-d arrays of one length");
  VCF_CHECK(may_end.ndim() == 1, "may_end: expected a 1-d int8 table");
  const int64_t S = sid.ndim() == 1 ? sid.shape(0) : 0, width = rt_tok.ndim() == 2 ? rt_tok.shape(1) : 0;
  const int64_t* w = who.data();
  for (int64_t k = 0; k < W; ++k)
    VCF_CHECK(w[k] >= 0 && w[k] < S, "who: slot " + std::to_string(w[k]) + " outside [0, " + std::to_string(S) + ")");
  auto* sid_p = column<int64_t>(sid, S, "sid");
  auto* pend_p = column<int64_t>(pend, S, "pend");
  auto* rl_p = column<int64_t>(rl, S, "rl");
  auto* npos_p = column<int64_t>(npos, S, "npos");
  auto* ntok_p = column<int64_t>(ntok, S, "ntok");
  auto* known_p = column<int64_t>(known, S, "known");
  auto* last_p = column<int64_t>(last, S, "last");
  auto* tok_t = table<int64_t>(rt_tok, S, width, "rt_tok");
  auto* lp_t = table<double>(rt_lp, S, width, "rt_lp");
  auto* gen_t = table<bool>(rt_gen, S, width, "rt_gen");
  const int64_t* t = toks.data();
  const double* lp = lps.data();
  const int8_t* tab = may_end.data();
  const int64_t T = may_end.shape(0);
  std::vector<int64_t> end, sids;
  for (int64_t k = 0; k < W; ++k) {
    const int64_t r = w[k], tok = t[k];
    const bool plain = tok >= 0 && tok < T && tab[tok] == 0 && rl_p[r] < max_new - 1;
    if (!plain) {
      end.push_back(k);
      continue;
    }
    const int64_t j = pend_p[r];
    VCF_CHECK(j < width, "rt_tok: slot " + std::to_string(r) + " has no room for a token (width " +
                             std::to_string(width) + ")");
    tok_t[r * width + j] = tok;
    lp_t[r * width + j] = lp[k];
    gen_t[r * width + j] = true;
    last_p[r] = tok;
    ++pend_p[r], ++rl_p[r], ++npos_p[r], ++ntok_p[r], ++known_p[r];
    sids.push_back(sid_p[r]);
  }
  auto as_array = [](const std::vector<int64_t>& v) {
    py::array_t<int64_t> a(static_cast<py::ssize_t>(v.size()));
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
  };
  return py::make_tuple(as_array(end), as_array(sids));
}

uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// out[k] = sampling.counter_uniforms(key[who[k]], ntok[who[k]]), bit for bit: the step's uniforms written straight
// into its staging buffer (the numpy version is ~15 array calls, ~0.05 ms a step).
void gather_uniforms(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& who, py::array& key,
                     py::array& ntok, py::array& out) {
  const int64_t W = who.size(), S = key.ndim() == 1 ? key.shape(0) : 0;
  VCF_CHECK(who.ndim() == 1, "who: expected a 1-d array of slots");
  const auto* k_p = column<uint64_t>(key, S, "key");
  const auto* n_p = column<int64_t>(ntok, S, "ntok");
  auto* o_p = column<double>(out, W, "out");
  VCF_CHECK(out.shape(0) == W, "out: expected " + std::to_string(W) + " float64 values, got " +
                                   std::to_string(out.shape(0)));
  const int64_t* w = who.data();
  for (int64_t k = 0; k < W; ++k) {
    VCF_CHECK(w[k] >= 0 && w[k] < S, "who: slot " + std::to_string(w[k]) + " outside [0, " + std::to_string(S) + ")");
    const uint64_t z = k_p[w[k]] + (static_cast<uint64_t>(n_p[w[k]]) + 1) * 0x9E3779B97F4A7C15ULL;
    o_p[k] = static_cast<double>(splitmix64(z) >> 11) * 0x1.0p-53;
  }
}

}  // namespace

void register_hand_off(py::module_& m) {
  m.def("gather_uniforms", &gather_uniforms, py::arg("who"), py::arg("key"), py::arg("ntok"), py::arg("out"),
        "out[k] = the counter-based uniform of slot who[k] (sampling.counter_uniforms(key, ntok)), bit for bit.");
  m.def("hand_off", &hand_off, py::arg("who"), py::arg("toks"), py::arg("lps"), py::arg("may_end"),
        py::arg("max_new"), py::arg("sid"), py::arg("pend"), py::arg("rl"), py::arg("npos"), py::arg("ntok"),
        py::arg("known"), py::arg("last"), py::arg("rt_tok"), py::arg("rt_lp"), py::arg("rt_gen"),
        "The engine step's token hand-off: appends each token that cannot end its round to its slot's round "
        "arrays (engine._SeqState) and returns (end: the indices of the others, sids: the appended ones' "
        "scheduler ids).");
}
