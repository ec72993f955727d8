"""Paged attention of one engine step, one layer: the C++ kernel vs the torch path it replaced (same run).

The torch path (backend "sdpa") gathers each bucket of decodes' K/V blocks into a padded tensor with
index_select, then runs SDPA with a key-length mask; the C++ kernel (csrc/cpu/paged_attention.cpp) reads
the blocks where they are. Shapes: the tiny model's heads (Hq 4, Hkv 2, D 32) and Qwen2.5-VL-7B's
(Hq 28, Hkv 4, D 128), block size 16, fp32, block tables shuffled over the pool as after many forks.
  decode  128 sequences (16 prompts x G 8) decoding one token each, contexts uniform in [200, 600)
  mixed   the same plus 4 observation prefill chunks of 12 rows (what the engine batches with decodes)
Run: .venv/bin/pytest bench/bench_attention.py --benchmark-only -o python_files="bench_*.py"
"""
from __future__ import annotations

import random

import pytest
import torch

from videocom_fast.rollout.attention import PagedBatch, cpp_available, paged_attention
from videocom_fast.rollout.kv_cache import PagedKVPool

SHAPES = {"tiny": (4, 2, 32), "7b": (28, 4, 128)}
BS, NUM_SEQ = 16, 128


class _Layer(torch.nn.Module):
    layer_idx = 0


def _step(shape: str, case: str, backend: str):
    Hq, Hkv, D = SHAPES[shape]
    rng = random.Random(0)
    ctx = [rng.randrange(200, 600) for _ in range(NUM_SEQ)]
    q_lens = [1] * NUM_SEQ + ([12] * 4 if case == "mixed" else [])
    ctx += [rng.randrange(300, 600) for _ in q_lens[NUM_SEQ:]]
    nb = [-(-c // BS) for c in ctx]
    pool = PagedKVPool(1, sum(nb), BS, Hkv, D)
    pool.k[0].normal_()
    pool.v[0].normal_()
    free = list(range(sum(nb)))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in nb]
    q_starts = [sum(q_lens[:i]) for i in range(len(q_lens))]
    q = torch.randn(1, Hq, sum(q_lens), D)
    meta = PagedBatch(pool, q_starts, q_lens, ctx, tables, backend=backend)
    return lambda: paged_attention(_Layer(), q, None, None, None, scaling=D ** -0.5, paged=meta)[0]


BACKENDS = ["sdpa", pytest.param("cpp", marks=pytest.mark.skipif(not cpp_available("cpu", torch.float32),
                                                                  reason="_C not built"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["decode", "mixed"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_paged_attention_step(benchmark, shape, case, backend):
    benchmark.group = f"attention_{shape}_{case}"
    benchmark.extra_info["role"] = "baseline" if backend == "sdpa" else "candidate"
    fn = _step(shape, case, backend)
    fn()   # warm-up (metadata built once per step, as in the engine)
    out = benchmark(fn)
    assert torch.isfinite(out).all()
