"""sampling.py against transformers' logits warpers (top-k / top-p sets), log-softmax, and frequencies."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from videocom_fast.rollout.sampling import SamplingParams, filter_logits, rollout_generator, sample


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


def test_frequencies_follow_the_filtered_distribution():
    V, draws = 9, 20000
    logits = torch.randn(1, V)
    params = SamplingParams(temperature=1.3, top_k=6, top_p=0.9)
    g = rollout_generator(5, 0, 0)
    counts = torch.zeros(V)
    rows = logits.expand(draws, V)
    tok, _ = sample(rows, params, [g] * draws)
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


def test_ties_at_the_kth_logit_are_all_kept():
    """top-k keeps every token tied with the k-th logit (transformers' rule): the k-only fast path must not
    cut them, so such rows take the full-vocabulary path."""
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, -2.0, 0.5]])
    params = SamplingParams(temperature=1.0, top_k=2, top_p=1.0)
    g = rollout_generator(3, 0, 0)
    tok, _ = sample(logits.expand(6000, 6), params, [g] * 6000)
    counts = torch.bincount(tok, minlength=6).float() / 6000
    want = filter_logits(logits, 2, 1.0).softmax(-1)[0]
    assert (want[1:4] > 0).all() and counts[1:4].min() > 0.5 * want[1]
    assert 0.5 * (counts - want).abs().sum() < 0.03
