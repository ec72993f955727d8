"""A whole `RolloutEngine.generate` on the stand-in accelerator (videocom_fast/testing/standin.py): prompts on a
worker thread, the vision tower, prefix-shared prefills, decodes, observations fed back, finished trajectories,
with the engine's real step code (staging, upload, bind, sampler, download), not a hand-built step.

Asserted, per engine step (issue 16): exactly one host-to-device copy (the staging buffer, attention metadata
included: cu_seqlens and block tables for flash-attn, bucket tables and prefill block ids for SDPA) and exactly
one device-to-host read (the sampled ids + log-probs); nothing else reads the device during the run but the
vision tower's rotary table (once per engine). The values equal the same engine run with CPU tensors.
Backends: SDPA, flash-attn (fake), the Triton paged op, and the Triton op with decode-only steps through
graphs (decode_graphs.record_capture: replays re-run the recorded ops on the same device tensors, so the graph
path's own copies are checked too). The flash path runs through tests/fake_flash_attn.py; the fake's own host
reads (it checks cu_seqlens on the host, which the real kernel does not) are left out of the count by the
frame that asked.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fake_flash_attn
from helpers_rollout import env_factory, forced_scripts, tiny_dir, rollout_samples  # noqa: F401
from videocom_fast.models import load
from videocom_fast.rollout import RolloutEngine, attention as attn, decode_graphs
from videocom_fast.testing.standin import StandIn

G = 3


class _Graphed(RolloutEngine):
    """Decode-only steps through graphs (decode_graphs.record_capture: a CUDA graph's semantics off CUDA)."""
    CUDA_GRAPHS = True
    GRAPH_CAPTURE = staticmethod(decode_graphs.record_capture)


def _run(model, proc, samples, attention, rounds, graphs=False):
    forced = forced_scripts(samples, proc.tokenizer)
    cls = _Graphed if graphs and model.device.type == "meta" else RolloutEngine
    eng = cls(model, proc, env_factory=env_factory(), max_rounds=rounds, max_new_tokens=10,
              forced_rounds=forced, kv_budget_tokens=8192, attention=attention)
    return eng, eng.generate(samples, num_generations=G, temperature=0.9, top_k=20, seed=3)


def _events(dev, kind, where=None, skip="fake_flash_attn.py"):
    return sum(1 for e in dev.events if e.kind == kind and skip not in e.where and (where is None or where in e.where))


def _assert_same(got, want, atol):
    for gg, wg in zip(got, want):
        for g, w in zip(gg, wg):
            assert g.token_ids == w.token_ids and g.generated_mask == w.generated_mask
            assert g.finish_reason == w.finish_reason and g.round_texts == w.round_texts
            assert torch.equal(g.position_ids, w.position_ids)
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), rtol=0, atol=atol)


@pytest.mark.parametrize("backend", ["sdpa", "flash", "triton", "triton+graphs"])
def test_generate_on_the_standin_uploads_once_and_reads_once_per_step(backend, tiny_dir, rollout_samples,  # noqa: F811
                                                                      monkeypatch):
    # forced_scripts covers rounds 1-3 (segment, frame, zoom); a 4th round samples freely. In float16 the rounding
    # of a step depends on which rows share it (when the worker's observations arrive), so a free round could
    # draw differently across two runs: the float16 run keeps to the scripted rounds (its log-probs still compared)
    backend, graphs = backend.split("+")[0], backend.endswith("+graphs")
    dtype, rounds = (torch.float32, 4) if backend == "sdpa" else (torch.float16, 3)
    model, proc = load(tiny_dir, dtype=dtype)
    samples = rollout_samples[:2]
    with fake_flash_attn.installed(monkeypatch) as fake:
        if backend == "flash":
            monkeypatch.setattr(attn, "FLASH_DEVICE_TYPES", ("cuda", "cpu", "meta"))
        cpu_eng, want = _run(model, proc, samples, backend, rounds)
        assert cpu_eng.attn_backend == backend
        with torch.no_grad(), StandIn() as dev:
            eng, got = _run(dev.put(copy.deepcopy(model)), proc, samples, backend, rounds, graphs)
        assert eng.attn_backend == backend and eng.device.type == "meta"
        if backend == "flash":
            assert fake.calls == (cpu_eng.stats["steps"] + eng.stats["steps"]) * model.config.text_config.num_hidden_layers
    steps = eng.stats["steps"]
    if graphs:   # the CPU run is eager: replays read and write the same as eager steps
        assert eng.stats["cuda_graphs"] == "on" and eng.stats["graph_steps"] > steps / 2, eng.stats
    # (the step count depends on when the worker's observations arrive: per run, not per backend or device)
    assert steps > 10 and eng.stats["generated_tokens"] == cpu_eng.stats["generated_tokens"] > 0
    assert sum(len(t.rounds) for g in got for t in g) >= len(samples) * G * 3   # observations were fed back
    # one upload per step, from the staging buffer; no other copy of step metadata (attention, KV, sampler)
    assert _events(dev, "h2d", "engine_step.py") == steps, dev.report()
    for module in ("attention.py", "kv_cache.py", "sampling.py", "fused_step.py"):
        assert _events(dev, "h2d", module) == 0, (module, dev.report())
    assert _events(dev, "h2d", "packed_forward.py") == 1, dev.report()   # its M-RoPE row selector, per generate
    # one read per step (the download of ids + log-probs) + the vision tower's rotary table, once
    downloads = _events(dev, "d2h", "engine_step.py")
    assert downloads == steps, dev.report()
    syncs = sum(1 for e in dev.events if e.sync and "fake_flash_attn.py" not in e.where)
    assert syncs == steps + 1, dev.report()
    _assert_same(got, want, atol=1e-5 if dtype == torch.float32 else 2e-3)
