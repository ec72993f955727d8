"""Decode-only steps padded to their CUDA-graph bucket (`RolloutEngine.PAD_DECODES`, issue 16): the shapes a
captured graph needs, checked on the CPU. A padded step must give the same tokens and log-probs as the unpadded
one, and its padded rows must write only the scratch block (one block past the scheduler's): every real
sequence's KV, read through its own block table when it finishes, equals the unpadded run's. (Not the pools
block by block: env replies come back from worker threads, so which free block a sequence gets depends on
timing; a block-by-block comparison failed CI once on the sampled run, with equal tokens and log-probs.)
"""
from __future__ import annotations

import pytest
import torch

from helpers_rollout import env_factory, forced_scripts, rollout_samples, tiny_dir  # noqa: F401
from videocom_fast.models import load
from videocom_fast.rollout import RolloutEngine


def _run(model, proc, samples, pad: bool, greedy: bool):
    eng = RolloutEngine(model, proc, env_factory=env_factory(), max_rounds=2, max_new_tokens=6, keep_kv_pool=True,
                        kv_budget_tokens=2048, forced_rounds=forced_scripts(samples, proc.tokenizer))
    eng.PAD_DECODES = pad
    padded = []   # per padded step: (real rows, rows after padding, slots of the padded rows)
    inner = eng._pad_decodes

    def spy(rows, decode_only):
        n = len(rows[0])
        rows = inner(rows, decode_only)
        if len(rows[0]) > n:
            padded.append((n, len(rows[0]), rows[2][n:].tolist()))   # (ids, positions, KV slots, ...)
        return rows
    eng._pad_decodes = spy
    kv = {}   # (group, rollout) -> per layer (K, V) rows of the finished sequence, through its block table
    finish = eng._finish

    def snapshot(s, reason):
        if not s.done and not s.sched_finished:
            n, table = eng.sched.num_computed_tokens(s.sid), eng.sched.block_table(s.sid)
            kv[s.traj.sample_index, s.traj.rollout_index] = [tuple(x.clone() for x in eng.pool.gather(layer, table, n))
                                                  for layer in range(eng.pool.num_layers)]
        finish(s, reason)
    eng._finish = snapshot
    res = eng.generate(samples, num_generations=3, seed=5, greedy=greedy)
    return eng, res, padded, kv


@pytest.mark.parametrize("greedy", [True, False])
def test_padded_decode_steps_equal_unpadded_and_touch_only_the_scratch_block(tiny_dir, rollout_samples, greedy):
    model, proc = load(tiny_dir, dtype=torch.float64)
    samples = rollout_samples[:2]
    with torch.no_grad():
        eng0, base, none, kv0 = _run(model, proc, samples, pad=False, greedy=greedy)
        eng1, got, padded, kv1 = _run(model, proc, samples, pad=True, greedy=greedy)
    assert not none and eng0.pool.num_blocks == eng0.stats["kv_pool_blocks"]
    # 2 groups x G = 3: decode-only steps of 6 (or fewer) sequences ran as 8 rows
    assert padded and all(b == RolloutEngine.decode_bucket(n) > n for n, b, _ in padded), padded
    scratch = eng1._scratch_block
    assert scratch == eng1.stats["kv_pool_blocks"] == eng1.pool.num_blocks - 1
    bs = eng1.pool.block_size
    assert all(s // bs == scratch for _, _, slots in padded for s in slots)
    for b, g in zip(base, got):
        for t0, t1 in zip(b, g):
            assert t1.token_ids == t0.token_ids and t1.finish_reason == t0.finish_reason
            torch.testing.assert_close(torch.tensor(t1.logprobs), torch.tensor(t0.logprobs), rtol=0, atol=1e-12)
    assert kv0.keys() == kv1.keys() and len(kv0) == 6   # every sequence's KV, as the unpadded run wrote it
    for key in kv0:
        for (k0, v0), (k1, v1) in zip(kv0[key], kv1[key]):
            assert k0.shape[0] > 0 and k1.shape == k0.shape
            torch.testing.assert_close(k1, k0, rtol=0, atol=1e-12)
            torch.testing.assert_close(v1, v0, rtol=0, atol=1e-12)
