"""The acceptance gate of the engine: greedy float64 token ids equal the naive re-prefill loop's on 16
synthesized samples whose episodes use all three manipulations (slow: the naive loop is the slow part)."""
from __future__ import annotations

import pytest
import torch

from helpers_rollout import rollout_samples, tiny_dir  # noqa: F401
from test_rollout import _check_naive, _engine, model64  # noqa: F401


@pytest.mark.slow
def test_greedy_equals_naive_loop_on_16_samples_with_all_manipulations(model64, rollout_samples):
    model, proc = model64
    samples = rollout_samples[:16]
    eng = _engine(model, proc, samples)
    trajs = eng.generate(samples, num_generations=2, greedy=True)
    kinds = {(o.action.kind, o.reason) for g in trajs for t in g for o in t.observations if o is not None and o.action}
    assert {("segment", "ok"), ("frame", "ok"), ("zoom", "ok")} <= kinds
    assert all(len(t.media) >= 4 for g in trajs for t in g)   # main video + rewatch + frame + crop
    _check_naive(model, proc, samples, trajs)


