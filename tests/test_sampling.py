"""sampling.py against transformers' logits warpers (top-k / top-p sets), log-softmax, and frequencies; the
C++ draw (csrc/cpu/sampling.cpp) against the torch draw; counter-based uniforms."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from videocom_fast.rollout.sampling import (SamplingParams, counter_uniforms, filter_logits, rollout_generator,
                                            rollout_key, sample)

IMPLS = ["cpp", "torch"]


@pytest.mark.parametrize("N,V,k,p", [(1, 7, 3, 1.0), (5, 97, 50, 0.9), (3, 341, 0, 0.5), (4, 1025, 17, 0.75)])
def test_filter_matches_transformers_warpers(N, V, k, p):
    logits = torch.randn(N, V) * 3
    got = filter_logits(logits, k, p)
    want = logits.clone()
    if k:
        want = TopKLogitsWarper(top_k=k)(None, want)
    if p < 1.0:
        want = TopPLogitsWarper(top_p=p)(None, want)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert torch.equal(got[torch.isfinite(got)], logits[torch.isfinite(got)])


def test_logprob_is_full_vocabulary_log_softmax_before_truncation():
    logits = torch.randn(6, 341, dtype=torch.float64)
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.8)
    gens = [rollout_generator(1, i, 0) for i in range(6)]
    tok, lp = sample(logits, params, gens)
    assert lp.dtype == torch.float32
    want = (logits.float() / 0.7).log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
    torch.testing.assert_close(lp, want, rtol=0, atol=0)
    topk = logits.topk(5, dim=-1).indices
    assert all(int(t) in topk[i].tolist() for i, t in enumerate(tok))


def test_greedy_is_argmax_and_respects_suppression():
    logits = torch.randn(4, 97)
    tok, _ = sample(logits, SamplingParams(greedy=True))
    assert torch.equal(tok, logits.argmax(-1))
    sup = logits.argmax(-1).unique()
    tok2, lp2 = sample(logits, SamplingParams(greedy=True), suppress_ids=sup)
    assert not any(int(t) in sup.tolist() for t in tok2)
    masked = logits.clone()
    masked[:, sup] = float("-inf")
    assert torch.equal(tok2, masked.argmax(-1))
    # the log-prob ignores suppression: it is the model's own distribution
    torch.testing.assert_close(lp2, (logits / 0.9).log_softmax(-1).gather(-1, tok2[:, None]).squeeze(-1))


@pytest.mark.parametrize("impl", IMPLS)
def test_frequencies_follow_the_filtered_distribution(impl):
    V, draws = 9, 20000
    logits = torch.randn(1, V)
    params = SamplingParams(temperature=1.3, top_k=6, top_p=0.9)
    g = rollout_generator(5, 0, 0)
    counts = torch.zeros(V)
    rows = logits.expand(draws, V)
    tok, _ = sample(rows, params, [g] * draws, impl=impl)
    counts += torch.bincount(tok, minlength=V)
    want = filter_logits(logits / 1.3, 6, 0.9).softmax(-1)[0]
    tv = 0.5 * (counts / draws - want).abs().sum()
    assert tv < 0.02, (counts / draws, want)
    assert counts[want == 0].sum() == 0


def test_per_rollout_generators_are_independent_of_batch_composition():
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, top_k=0)
    a, _ = sample(logits, p, [rollout_generator(0, 0, r) for r in range(3)])
    b, _ = sample(logits[1:2], p, [rollout_generator(0, 0, 1)])
    assert a[1] == b[0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="generator"):
        sample(torch.randn(2, 5), SamplingParams(), [rollout_generator(0, 0, 0)])
    with pytest.raises(ValueError, match="logits"):
        sample(torch.randn(5), SamplingParams(greedy=True))


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_at_the_kth_logit_are_all_kept(impl):
    """top-k keeps every token tied with the k-th logit (transformers' rule): the k-only fast path must not
    cut them, so such rows take the full-vocabulary path."""
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, -2.0, 0.5]])
    params = SamplingParams(temperature=1.0, top_k=2, top_p=1.0)
    g = rollout_generator(3, 0, 0)
    tok, _ = sample(logits.expand(6000, 6), params, [g] * 6000, impl=impl)
    counts = torch.bincount(tok, minlength=6).float() / 6000
    want = filter_logits(logits, 2, 1.0).softmax(-1)[0]
    assert (want[1:4] > 0).all() and counts[1:4].min() > 0.5 * want[1]
    assert 0.5 * (counts - want).abs().sum() < 0.03


@pytest.mark.parametrize("V,k,p", [(641, 50, 1.0), (641, 50, 0.9), (97, 0, 0.3), (1025, 1, 1.0), (33, 33, 0.75),
                                   (5, 7, 0.5)])
def test_cpp_draw_equals_torch_draw_for_the_same_uniforms(V, k, p):
    """Same u -> same token, except where u lands within float32 rounding of a CDF step (the torch path
    sums float32 probabilities, the C++ one float64): at most a few rows in 4000."""
    N = 4000
    logits = torch.randn(N, V) * 2
    logits[:, :3] = float("-inf")             # suppressed ids, as the engine passes them
    params = SamplingParams(temperature=0.8, top_k=k, top_p=p)
    u = np.random.default_rng().random(N)
    a, _ = sample(logits, params, uniforms=u, impl="cpp")
    b, _ = sample(logits, params, uniforms=u, impl="torch")
    assert (a >= 3).all()
    assert (a != b).sum() <= 4, int((a != b).sum())


@pytest.mark.parametrize("V", [48, 1000])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_cpp_kth_selection_on_ties_signed_zeros_and_extremes(k, V):
    """The C++ k-th value comes from a binary search on order-preserving int keys: rows of few distinct values
    (ties at the k-th, negative k-th values, -0.0 next to +0.0, +-1e30, rows with fewer than k finite
    logits) must keep the same tokens as torch's topk path, so the same u draws a token of the same logit.
    Torch rows are drawn one at a time: its top-k-only path is chosen per batch (any tie anywhere ->
    vocabulary order for every row), the C++ one per row. Within a run of equal logits the two order tokens
    differently (topk's tie order vs ids), so ids may differ there; the distribution and values may not.
    V = 48: the C++ threshold guess always leaves between k and 4k + 64 candidates (the candidate path);
    V = 1000: runs of equal top values leave far more, so the exact search over the whole row decides."""
    rng = np.random.default_rng()
    N = 1500 if V == 48 else 300
    x = rng.integers(-4, 4, size=(N, V)).astype(np.float32)
    x[rng.random((N, V)) < 0.3] = -0.0
    x[rng.random((N, V)) < 0.02] = 1e30
    x[rng.random((N, V)) < 0.02] = -1e30
    x[rng.random((N, V)) < 0.2] = -np.inf
    x[:50, 10:] = -np.inf                      # fewer finite logits than k in some rows
    logits = torch.from_numpy(x)
    params = SamplingParams(temperature=1.0, top_k=k, top_p=1.0)
    u = rng.random(N)
    a, _ = sample(logits, params, uniforms=u, impl="cpp")
    b = torch.cat([sample(logits[n:n + 1], params, uniforms=u[n:n + 1], impl="torch")[0] for n in range(N)])
    assert torch.isfinite(logits.gather(1, a[:, None])).all()
    va, vb = logits.gather(1, a[:, None]), logits.gather(1, b[:, None])
    assert (va != vb).sum() <= 2, int((va != vb).sum())


def test_counter_uniforms_are_a_function_of_key_and_counter():
    keys = np.array([rollout_key(0, s, r) for s in range(4) for r in range(8)], dtype=np.uint64)
    assert len(set(keys.tolist())) == 32
    c = np.arange(32, dtype=np.uint64)
    u = counter_uniforms(keys, c)
    assert u.dtype == np.float64 and ((u >= 0) & (u < 1)).all()
    np.testing.assert_array_equal(u[5:6], counter_uniforms(keys[5:6], c[5:6]))   # batch composition
    stream = counter_uniforms(np.full(50000, keys[0]), np.arange(50000, dtype=np.uint64))
    assert abs(stream.mean() - 0.5) < 0.01 and abs(stream.var() - 1 / 12) < 0.005
    hist = np.bincount((stream * 10).astype(int), minlength=10) / 50000
    assert np.abs(hist - 0.1).max() < 0.01
    assert np.corrcoef(stream[:-1], stream[1:])[0, 1] < 0.02


def test_cpp_gather_uniforms_equal_counter_uniforms_bit_for_bit():
    from videocom_fast import _C
    rng = np.random.default_rng()
    S, W = 37, 61
    key = rng.integers(0, 2**64, S, dtype=np.uint64, endpoint=False)
    ntok = rng.integers(0, 2**62, S, dtype=np.int64)
    ntok[:3] = (0, 1, 2**63 - 1)                       # the wrap of ntok + 1 as uint64 included
    who = rng.integers(0, S, W, dtype=np.int64)        # repeats, any order
    out = np.full(W, -1.0)
    _C.gather_uniforms(who, key, ntok, out)
    np.testing.assert_array_equal(out, counter_uniforms(key[who], ntok[who]))
    _C.gather_uniforms(who[:0], key, ntok, out[:0])
    for args, what in (((np.array([S]), key, ntok, out[:1]), "who: slot 37"),
                       ((who, key.astype(np.int64), ntok, out), "key"),
                       ((who, key, ntok, out[:-1]), "out"),
                       ((who, key, ntok, out.astype(np.float32)), "out")):
        with pytest.raises(ValueError, match=what):
            _C.gather_uniforms(*args)


def test_cpp_draw_rejects_bad_buffers():
    from videocom_fast import _C
    x, u, out = np.zeros((3, 5), np.float32), np.full(3, 0.5), np.zeros(3, np.int64)
    with pytest.raises(ValueError, match="logits"):
        _C.sample_logits(x.astype(np.float64), u, 2, 1.0, out)
    with pytest.raises(ValueError, match="u:"):
        _C.sample_logits(x, u[:2], 2, 1.0, out)
    with pytest.raises(ValueError, match="row 1 outside"):
        _C.sample_logits(x, np.array([0.1, 1.0, 0.2]), 2, 1.0, out)
    with pytest.raises(ValueError, match="out"):
        _C.sample_logits(x, u, 2, 1.0, out.astype(np.int32))
    with pytest.raises(ValueError, match="top_p"):
        _C.sample_logits(x, u, 2, 0.0, out)
    with pytest.raises(ValueError, match="top_k"):
        _C.sample_logits(x, u, -1, 1.0, out)
    with pytest.raises(ValueError, match="impl"):
        sample(torch.zeros(3, 5), SamplingParams(), uniforms=u, impl="numpy")
    with pytest.raises(ValueError, match="uniforms"):
        sample(torch.zeros(3, 5), SamplingParams(), uniforms=np.full(3, np.nan))


def test_cpp_draw_never_picks_nan_or_inf_and_survives_an_empty_row():
    from videocom_fast import _C
    x = np.random.default_rng().standard_normal((200, 30)).astype(np.float32)
    x[:, ::3] = np.nan
    x[:, 1::3] = -np.inf
    x[-1] = -np.inf                      # no finite logit at all: a defined token, no crash
    out = np.zeros(200, np.int64)
    _C.sample_logits(x, np.random.default_rng().random(200), 5, 0.9, out)
    assert (out[:-1] % 3 == 2).all() and out[-1] == 0


@pytest.mark.parametrize("N,V,k,p", [(1, 7, 3, 1.0), (37, 641, 50, 0.9), (64, 97, 0, 0.5)])
def test_cpp_draw_rows_in_parallel_equal_rows_in_turn(N, V, k, p):
    """From 16 rows on the C++ draw runs rows on all OpenMP threads, each with its own scratch: the same
    tokens as one thread."""
    from videocom_fast import _C
    x = (np.random.default_rng().standard_normal((N, V)) * 3).astype(np.float32)
    u = np.random.default_rng().random(N)
    two, one = np.zeros(N, np.int64), np.zeros(N, np.int64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _C.sample_logits(x, u, k, p, two)
        torch.set_num_threads(1)
        _C.sample_logits(x, u, k, p, one)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(two, one)


def test_sample_suppresses_the_same_ids_on_both_draws():
    """Suppressed ids are set to -inf in place AFTER the log-softmax (on the division's new tensor): never
    drawn, the caller's logits untouched, the log-probs still the full-vocabulary log-softmax."""
    logits = torch.randn(300, 50)
    logits[:, 7] = 40.0
    params = SamplingParams(temperature=0.8, top_k=5)
    u = np.random.default_rng().random(300)
    sup = torch.tensor([7, 3])
    before = logits.clone()
    a, la = sample(logits, params, uniforms=u, suppress_ids=sup, impl="cpp")
    assert torch.equal(logits, before)
    b, lb = sample(logits, params, uniforms=u, suppress_ids=sup, impl="torch")
    assert not torch.isin(a, sup).any() and (a != b).sum() <= 1
    # log-probs stay the full-vocabulary log-softmax before suppression (the trainer's), on both paths: the
    # torch path's bit-equal, the C++ one's within 2x the torch path's error against float64 (+ 2 ulps)
    want = (logits / 0.8).log_softmax(-1)
    torch.testing.assert_close(lb, want.gather(-1, b[:, None]).squeeze(-1), rtol=0, atol=0)
    _assert_logprobs_close(la, logits, 0.8, a)


def _assert_logprobs_close(lp, logits, temperature, tokens):
    """lp (float32) against log_softmax(logits / T) at `tokens`: error vs float64 <= 2x the error of torch's
    float32 log_softmax (flash-attention's rule), plus 2 ulps of the row's largest |logit / T| (the resolution
    of float32 inputs: another exp and summation order may land on either side)."""
    exact = (logits.double() / torch.tensor(temperature, dtype=torch.float32).double()).log_softmax(-1)
    exact = exact.gather(-1, tokens[:, None]).squeeze(-1)
    plain = (logits / temperature).log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1).double()
    ulp = torch.finfo(torch.float32).eps * (logits / temperature).abs().amax(-1).clamp(min=1.0)
    err, allowed = (lp.double() - exact).abs(), 2 * (plain - exact).abs() + 2 * ulp
    worst = float((err - allowed).max())
    assert (err <= allowed).all(), f"{int((err > allowed).sum())} rows; worst excess {worst:.3g}"


@pytest.mark.parametrize("N,V,k,p,greedy", [(1, 7, 3, 1.0, False), (73, 640, 50, 1.0, False),
                                            (37, 641, 0, 0.8, False), (20, 151, 50, 1.0, True),
                                            (5, 13, 5, 0.5, True)])
def test_sample_rows_equals_the_torch_sampler(N, V, k, p, greedy):
    """The engine's one-call C++ sampler (`_C.sample_rows`: scale, log-probs, suppression, draw or argmax,
    forced tokens) against the torch path on fresh random logits: the same tokens (a uniform may land within
    rounding of a CDF step: at most one row apart), the forced rows' tokens, log-probs within float32
    error."""
    logits = torch.randn(N, V) * 4
    params = SamplingParams(temperature=0.7, top_k=k, top_p=p, greedy=greedy)
    u = np.random.default_rng().random(N)
    sup = torch.randperm(V)[:min(3, V - 1)]
    forced = torch.where(torch.rand(N) < 0.3, torch.randint(0, V, (N,)), -1)
    a, la = sample(logits, params, uniforms=u, suppress_ids=sup, forced=forced, impl="cpp")
    b, lb = sample(logits, params, uniforms=u, suppress_ids=sup, forced=forced, impl="torch")
    assert (a != b).sum() <= (0 if greedy else 1), int((a != b).sum())
    drawn = forced < 0
    assert torch.equal(a[~drawn], forced[~drawn]) and not torch.isin(a[drawn], sup).any()
    _assert_logprobs_close(la, logits, 0.7, a)


def test_sample_rows_rejects_bad_buffers_and_survives_nan_rows():
    from videocom_fast import _C
    x, u = np.random.default_rng().standard_normal((3, 5)).astype(np.float32), np.full(3, 0.5)
    none, tok, lp = np.full(3, -1, np.int64), np.zeros(3, np.int64), np.zeros(3, np.float32)
    ok = dict(logits=x, temperature=1.0, suppress=np.array([1]), u=u, forced=none, top_k=2, top_p=1.0,
              greedy=False, tokens=tok, logprobs=lp)
    for bad, match in [(dict(suppress=np.array([5])), "suppress: id 5 outside"),
                       (dict(forced=np.array([-1, 5, -1])), "forced: row 1 holds id 5"),
                       (dict(logprobs=np.zeros(3, np.float64)), "logprobs"), (dict(u=u[:2]), "u:"),
                       (dict(temperature=0.0), "temperature"), (dict(logits=x.astype(np.float64)), "logits")]:
        with pytest.raises(ValueError, match=match):
            _C.sample_rows(**{**ok, **bad})
    _C.sample_rows(**{**ok, "u": np.empty(0), "greedy": True})   # greedy needs no uniforms
    best = x[:, [0, 2, 3, 4]].argmax(1)   # id 1 suppressed
    assert np.array_equal(tok, np.where(best > 0, best + 1, 0))
    x[1, 2] = np.nan   # a NaN logit: its row's log-prob is NaN (torch's log_softmax), the draw skips it
    _C.sample_rows(**ok)
    assert np.isnan(lp[1]) and not np.isnan(lp[[0, 2]]).any() and tok[1] not in (1, 2)


def test_a_row_with_ties_changes_only_its_own_draw():
    """One row tied at its k-th value takes the full-vocabulary draw; every other row keeps its top-k draw, in
    both implementations, so the same uniforms give the same tokens. (Until session 12 one tied row sent the
    whole CPU batch of the torch path to the full draw: same distribution, another token for the same u, and
    test_cpp_draw_equals_torch_draw_for_the_same_uniforms failed in ~4% of its random draws.)"""
    N, V, k = 300, 97, 10
    logits = torch.randn(N, V) * 2
    logits[0, :] = torch.arange(V, dtype=torch.float32) / V
    logits[0, 10:20] = 5.0                    # row 0: ten ids tied at the top, k-th value included, plus more
    logits[0, 20:30] = 5.0
    params = SamplingParams(temperature=0.8, top_k=k)
    u = np.random.default_rng().random(N)
    a, _ = sample(logits, params, uniforms=u, impl="cpp")
    b, _ = sample(logits, params, uniforms=u, impl="torch")
    assert 10 <= int(a[0]) < 30 and 10 <= int(b[0]) < 30
    assert (a != b).sum() <= 1, int((a != b).sum())
