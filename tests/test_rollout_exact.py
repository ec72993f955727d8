"""The acceptance gate of the engine (issue 6): greedy float64 token ids equal the naive re-prefill loop's.

Two versions, both slow (the naive loop, one `generate` with a fresh prefill per round, is the slow part):
1. The SFT-fitted tiny model (tests/fixtures_sft.py `sft_tiny_model`) running FREE: no scripted tokens,
   every round is the model's own greedy output, so its actions, the env's media, the observation
   prefills on top of the paged KV and the next rounds all have to agree with the naive loop. The test
   also counts the actions the episodes emitted and requires all three manipulations: an episode set in
   which the model happens not to manipulate would pass the equality check without exercising them.
2. The random tiny model with scripted ("forced") manipulation rounds (helpers_rollout.forced_scripts),
   which pins the odd cases the fitted model never produces (an action line ended by "\\n..." instead of
   <|im_end|>, so the engine injects the <|im_end|>).

Samples of (1): the fixture's 8 eval samples and the first 24 training samples (grpo format). On 16 of
them the fitted model's zoom boxes were valid only once (most are out of the frame: "bad_box"), so 32
keep "each manipulation served with media" from hanging on one episode; about 40 s in all. Greedy rollouts of one group are forked from one prefill and identical,
so the naive loop runs once per sample and both rollouts are compared to it.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from helpers_rollout import rollout_samples, tiny_dir  # noqa: F401
from test_rollout import _check_naive, _engine, model64  # noqa: F401
from bench.naive_rollout import naive_rollout
from videocom_fast.protocol import parse_action
from videocom_fast.rollout import RolloutEngine

MAX_ROUNDS, MAX_NEW = 5, 48     # fitted rounds are ~20-30 tokens (one sentence + one action line)


@pytest.fixture(scope="module")
def fitted64(sft_tiny_model):
    model, proc = sft_tiny_model.load()
    model = model.double()
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    samples = sft_tiny_model.samples("eval")[:8] + sft_tiny_model.samples("grpo")[:24]
    return model, proc, samples, sft_tiny_model.media_config


def _fitted_env_factory(media_config):
    from videocom_fast.env import ManipulationEnv
    from videocom_fast.media import FrameCache
    cache = FrameCache()
    return lambda sample: ManipulationEnv(sample, cache=cache, config=media_config)


@pytest.mark.slow
def test_fitted_model_free_running_greedy_equals_naive_loop(fitted64):
    model, proc, samples, mc = fitted64
    assert len(samples) >= 16
    eng = RolloutEngine(model, proc, env_factory=_fitted_env_factory(mc), max_rounds=MAX_ROUNDS,
                        max_new_tokens=MAX_NEW)
    trajs = eng.generate(samples, num_generations=2, greedy=True)
    make_env = _fitted_env_factory(mc)
    emitted, served = Counter(), Counter()
    for si, group in enumerate(trajs):
        nv = naive_rollout(model, proc, make_env(samples[si]), max_rounds=MAX_ROUNDS, max_new_tokens=MAX_NEW,
                           greedy=True)
        for tr in group:
            where = f"sample {si} ({samples[si]['id']}) rollout {tr.rollout_index}"
            if tr.token_ids != nv.token_ids:
                k = next((i for i, (a, b) in enumerate(zip(tr.token_ids, nv.token_ids)) if a != b),
                         min(len(tr.token_ids), len(nv.token_ids)))
                pytest.fail(f"{where}: token ids differ first at {k} (engine {tr.token_ids[k:k + 5]}, "
                            f"naive {nv.token_ids[k:k + 5]}); engine rounds {tr.round_texts!r}, "
                            f"naive rounds {nv.round_texts!r}")
            assert tr.generated_mask == nv.generated_mask, where
            assert tr.round_texts == nv.round_texts, where
            assert tr.finish_reason == nv.finish_reason, where
        tr = group[0]
        for text in tr.round_texts:
            a = parse_action(text)
            emitted[a.kind if a is not None else None] += 1
        for o in tr.observations:
            if o is not None and o.action is not None:
                served[(o.action.kind, o.reason)] += 1
    print(f"\nfitted greedy episodes: emitted actions {dict(emitted)}; env results {dict(served)}; "
          f"finish reasons {dict(Counter(t.finish_reason for g in trajs for t in g))}")
    # the episodes must really manipulate: each kind emitted, and each served with media at least once
    assert {"segment", "frame", "zoom"} <= set(emitted), emitted
    assert all(served[(k, "ok")] > 0 for k in ("segment", "frame", "zoom")), served


@pytest.mark.slow
def test_greedy_equals_naive_loop_on_16_samples_with_forced_manipulations(model64, rollout_samples):
    model, proc = model64
    samples = rollout_samples[:16]
    eng = _engine(model, proc, samples)
    trajs = eng.generate(samples, num_generations=2, greedy=True)
    kinds = {(o.action.kind, o.reason) for g in trajs for t in g for o in t.observations if o is not None and o.action}
    assert {("segment", "ok"), ("frame", "ok"), ("zoom", "ok")} <= kinds
    assert all(len(t.media) >= 4 for g in trajs for t in g)   # main video + rewatch + frame + crop
    _check_naive(model, proc, samples, trajs)

