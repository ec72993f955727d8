"""The engine's per-step sampler: 128 rows x 640 logits (bench_rollout's small workload: 16 prompts x G 8, the
tiny tokenizer), temperature 0.9, top-k 50, 5 suppressed ids (the vision markers), 1 and 2 threads.

Rows per thread count (one group each):
  torch         sampling.sample(impl="torch"): the vectorized torch draw (role: baseline)
  masked_serial sampling.sample as it ran until session 12: an index_fill copy of the scaled logits with the
                suppressed ids at -inf, the C++ draw's rows one after another (its OpenMP rule N*V > 2^18
                never held at the engine's sizes), log-softmax after the draw
  draw_only     sampling.sample from session 12 to 17: torch's log-softmax first, the suppressed ids at -inf
                in place, the C++ draw's rows in parallel from 16 rows on (with 2 threads), a gather
  engine        sampling.sample now: the whole sampler in one C++ call (`_C.sample_rows`, session 18)
All four return the same tokens for the same uniforms (asserted before timing; the torch path may differ on a
row whose uniform lands within float32 rounding of a CDF step: none at these sizes and this seed).
Run: .venv/bin/pytest bench/bench_sampling.py --benchmark-only -o python_files="bench_*.py"
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from videocom_fast.rollout.sampling import SamplingParams, _cpp_draw_ok, sample

N, V, K = 128, 640, 50
PARAMS = SamplingParams(temperature=0.9, top_k=K)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, V, generator=g) * 3
    u = torch.from_numpy(np.random.default_rng(0).random(N))
    return logits, u, torch.arange(V - 5, V)


def _masked_serial(logits, u, sup):
    from videocom_fast import _C
    scaled = logits.float() / PARAMS.temperature
    work = scaled.index_fill(-1, sup, float("-inf"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokens = torch.empty(N, dtype=torch.long)
        _C.sample_logits(work.contiguous().numpy(), u.numpy(), K, 1.0, tokens.numpy())
    finally:
        torch.set_num_threads(threads)
    return tokens, scaled.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


def _draw_only(logits, u, sup):
    from videocom_fast import _C
    work = logits.float() / PARAMS.temperature
    logp = work.log_softmax(-1)
    work.index_fill_(-1, sup, float("-inf"))
    tokens = torch.empty(N, dtype=torch.long)
    _C.sample_logits(work.contiguous().numpy(), u.numpy(), K, 1.0, tokens.numpy())
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


IMPLS = {"torch": lambda lg, u, sup: sample(lg, PARAMS, suppress_ids=sup, uniforms=u, impl="torch"),
         "masked_serial": _masked_serial,
         "draw_only": _draw_only,
         "engine": lambda lg, u, sup: sample(lg, PARAMS, suppress_ids=sup, uniforms=u)}


@pytest.mark.skipif(not _cpp_draw_ok(torch.zeros(1, 1)), reason="_C not built")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_sampler(benchmark, data, impl, threads):
    logits, u, sup = data
    want = IMPLS["engine"](logits, u, sup)[0]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tokens, _ = IMPLS[impl](logits, u, sup)
        assert torch.equal(tokens, want), f"{impl}: {(tokens != want).sum()} rows differ"
        benchmark.group = f"sampler {N}x{V} k{K}, {threads} thread(s)"
        benchmark.extra_info["role"] = "baseline" if impl == "torch" else "candidate"
        benchmark.pedantic(IMPLS[impl], args=data, rounds=200, warmup_rounds=10)
    finally:
        torch.set_num_threads(before)
