"""Decode-only steps through captured graphs (videocom_fast/rollout/decode_graphs.py, issue 16), without a
GPU: `record_capture` gives a CUDA graph's semantics on the CPU (the forward's dispatched ops recorded once
with their tensors and Python arguments, replays re-run exactly those ops on those tensors). A whole sampled
generate with graphs equals the same engine without them (padded decodes both times), token for token, its
log-probs within float32 rounding; a graph that misses one of the step's inputs (the chunks' context lengths)
replays stale values and the tokens differ, so the comparison can fail. The fused ops take their dispatched
torch reference (`force_impl("torch")`): the CPU's direct C++ calls bypass the dispatcher, which a recording
cannot see, as a CUDA graph cannot see host work."""
from __future__ import annotations

import pytest
import torch

from helpers_rollout import env_factory, rollout_samples, tiny_dir  # noqa: F401
from videocom_fast.models import load
from videocom_fast.rollout import RolloutEngine, decode_graphs as dg, fused_step

G = 4


class _Padded(RolloutEngine):
    PAD_DECODES = True


class _Graphed(RolloutEngine):
    CUDA_GRAPHS = True
    GRAPH_CAPTURE = staticmethod(dg.record_capture)


def _run(cls, model, proc, samples, attention="triton"):
    eng = cls(model, proc, env_factory=env_factory(), max_rounds=3, max_new_tokens=12, kv_budget_tokens=16384,
              attention=attention)
    with fused_step.force_impl("torch"):
        out = eng.generate(samples, num_generations=G, temperature=0.9, top_k=20, seed=5)
    return eng, out


@pytest.fixture(scope="module")
def runs(tiny_dir, rollout_samples):  # noqa: F811
    model, proc = load(tiny_dir, dtype=torch.float32)
    samples = rollout_samples[:2]
    return model, proc, samples, _run(_Padded, model, proc, samples)


def _same(a, b) -> bool:
    """Same tokens, log-probs within float32 rounding (the step count, so which rows share a step, follows the
    worker's timing: per run)."""
    close = lambda x, y: torch.allclose(torch.tensor(x), torch.tensor(y), rtol=0, atol=1e-5)  # noqa: E731
    return all(x.token_ids == y.token_ids and close(x.logprobs, y.logprobs)
               for ga, gb in zip(a, b) for x, y in zip(ga, gb))


def test_graphed_generate_equals_eager_generate(runs):
    model, proc, samples, (eager, want) = runs
    eng, got = _run(_Graphed, model, proc, samples)
    st = eng.stats
    assert st["cuda_graphs"] == "on" and eager.stats["cuda_graphs"] == "off"
    assert st["graph_steps"] > 10 and 1 <= st["graph_captures"] < st["graph_steps"] / 2, st
    assert st["generated_tokens"] == eager.stats["generated_tokens"]
    assert _same(got, want)


def test_a_graph_missing_an_input_replays_stale_values(runs, monkeypatch):
    model, proc, samples, (_, want) = runs
    load_all = dg._Graph.load

    def load_without_ctx(self, ids, pos, slots, tiles, cq, table):
        load_all(self, ids, pos, slots, tiles, self.cq.clone(), table)     # the chunks' lengths stay stale
    monkeypatch.setattr(dg._Graph, "load", load_without_ctx)
    eng, got = _run(_Graphed, model, proc, samples)
    assert eng.stats["graph_steps"] > 10 and not _same(got, want)


def test_graphs_say_why_they_are_off(tiny_dir, rollout_samples):  # noqa: F811
    model, proc = load(tiny_dir, dtype=torch.float32)
    eng, _ = _run(_Graphed, model, proc, rollout_samples[:1], attention="cpp")
    assert eng.stats["cuda_graphs"] == "needs the triton attention (this engine's: cpp)"
    assert "graph_steps" not in eng.stats

    class NoCapture(RolloutEngine):
        CUDA_GRAPHS = True
    eng, _ = _run(NoCapture, model, proc, rollout_samples[:1])
    assert eng.stats["cuda_graphs"] == "needs a CUDA device or a GRAPH_CAPTURE"
    eng = _Graphed(model, proc, env_factory=env_factory(), max_rounds=1, max_new_tokens=4, attention="triton")
    eng.generate(rollout_samples[:1], num_generations=2, seed=0)    # fp32 on the CPU: the direct C++ kernels
    assert "invisible to a capture" in eng.stats["cuda_graphs"] and "graph_steps" not in eng.stats


def test_replay_follows_new_inputs_and_narrow_tables():
    """DecodeGraphs on a toy forward: one capture per (B, table width), later steps copied into it."""
    calls = []

    def forward(ids, pos, slots, meta):
        calls.append(1)
        tiles, cq, table, _ = meta.triton_meta(ids.device)
        return (ids + pos.sum(0) + slots + cq[2].long() + table.long().sum(1)).float()[:, None]
    graphs = dg.DecodeGraphs(forward, pool=None, capture=dg.record_capture)

    def meta(B, W, ctx, blk):
        return dg._StaticMeta(None, torch.stack([torch.arange(B), torch.zeros(B, dtype=torch.long)]).int(),
                              torch.stack([torch.arange(B), torch.ones(B, dtype=torch.long), ctx]).int(),
                              torch.full((B, W), blk, dtype=torch.int32))
    for step, (W, blk) in enumerate([(3, 1), (5, 2), (8, 3)]):
        ids, pos, slots, ctx = (torch.randint(0, 100, s) for s in ((4,), (3, 4), (4,), (4,)))
        out = graphs.run(ids, pos, slots, meta(4, W, ctx, blk))
        torch.testing.assert_close(out[:, 0], (ids + pos.sum(0) + slots + ctx + W * blk).float())
    assert graphs.captures == 1 and graphs.replays == 3 and len(calls) == 1      # widths 3, 5, 8 share W = 8
    bad = dg._StaticMeta(None, torch.zeros(2, 2, dtype=torch.int32), torch.zeros(3, 2, dtype=torch.int32),
                         torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="one row per tile"):
        graphs.run(ids, pos, slots, bad)     # 2 tiles for 4 rows
