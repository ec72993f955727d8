"""Paged attention of one engine step, one layer: the new kernel vs today's path, same run, same inputs.

today  K stored (NB, BS, Hkv, D); decodes and chunks of <= 16 rows in the previous C++ kernel (a dot over D
       per score: `_C.paged_attention_rowdot`, kept in csrc/cpu/paged_attention.cpp as this baseline), longer
       prefill chunks one SDPA call each on their gathered blocks (attention.py's "sdpa" code for them)
new    K transposed within blocks (NB, Hkv, D, BS); every chunk in `_C.paged_attention` (attention.attend)
Workloads (tiny Qwen2.5-VL heads: Hq 4, Hkv 2, D 32; block 16; fp32; block tables shuffled over the pool,
as after many forks):
  decode         128 decodes of 600 keys, every sequence its own blocks (39 MB of K/V: DRAM-bound)
  decode_shared  128 decodes of 600 keys as the engine runs them: 16 prompts x G 8 rollouts sharing the
                 prompt's 400 keys (blocks shared by reference), 200 private keys each
  mixed          96 decodes of 300-700 keys + 40 prefill chunks of 20-200 rows over 200-1000 keys
  mixed_7b       the mixed step with Qwen2.5-VL-7B's heads (Hq 28, Hkv 4, D 128)
Threads: torch's (2 here) for SDPA; OMP_NUM_THREADS for the kernels (set both, or neither).
Run: .venv/bin/pytest bench/bench_attention.py --benchmark-only   (prints a table of today/new ratios)
"""
from __future__ import annotations

import random

import pytest
import torch

from videocom_fast.rollout import attention as attn
from videocom_fast.rollout.kv_cache import PagedKVPool

pytestmark = pytest.mark.skipif(not attn.cpp_available("cpu", torch.float32), reason="videocom_fast._C not built")

SHAPES = {"tiny": (4, 2, 32), "7b": (28, 4, 128)}
BS, TODAY_MAX_ROWS = 16, 16      # the previous routing: chunks of <= 16 rows went to the C++ kernel
_medians: dict = {}


def _workload(case: str, rng: random.Random):
    """(q_lens, ctx_lens, block tables) over a pool of exactly the blocks used."""
    if case.startswith("decode"):
        q_lens, ctx = [1] * 128, [600] * 128
    else:
        q_lens = [1] * 96 + [rng.randrange(20, 201) for _ in range(40)]
        ctx = [rng.randrange(300, 701) for _ in range(96)] + [n + rng.randrange(200, 801) for n in q_lens[96:]]
    if case == "decode_shared":
        free = list(range(16 * 25 + 128 * 13))           # prompt: 400 keys = 25 blocks; own: 200 keys = 13
        rng.shuffle(free)
        prompts = [[free.pop() for _ in range(25)] for _ in range(16)]
        tables = [prompts[i // 8] + [free.pop() for _ in range(13)] for i in range(128)]
        return q_lens, ctx, tables, 16 * 25 + 128 * 13
    nb = [-(-c // BS) for c in ctx]
    free = list(range(sum(nb)))
    rng.shuffle(free)
    return q_lens, ctx, [[free.pop() for _ in range(n)] for n in nb], sum(nb)


def _step(shape: str, case: str):
    """Both paths over the same K/V, query and tables: (today_fn, new_fn)."""
    Hq, Hkv, D = SHAPES[shape]
    rng = random.Random(0)
    q_lens, ctx, tables, nblocks = _workload(case, rng)
    new_pool = PagedKVPool(1, nblocks, BS, Hkv, D, layout="k_transposed")
    old_pool = PagedKVPool(1, nblocks, BS, Hkv, D, layout="standard")
    old_pool.k[0].normal_()
    old_pool.v[0].normal_()
    new_pool.k[0].copy_(old_pool.k[0])
    new_pool.v[0].copy_(old_pool.v[0])
    q_starts = [sum(q_lens[:i]) for i in range(len(q_lens))]
    q_LHD = torch.randn(sum(q_lens), Hq, D)
    scale = D ** -0.5
    new_meta = attn.PagedBatch(new_pool, q_starts, q_lens, ctx, tables, backend="cpp")

    def pick(idx):
        return ([q_starts[i] for i in idx], [q_lens[i] for i in idx], [ctx[i] for i in idx], [tables[i] for i in idx])

    short = [i for i in range(len(q_lens)) if q_lens[i] <= TODAY_MAX_ROWS]
    long = [i for i in range(len(q_lens)) if q_lens[i] > TODAY_MAX_ROWS]
    short_meta = attn.PagedBatch(old_pool, *pick(short), backend="cpp").cpp_meta()
    long_meta = attn.PagedBatch(old_pool, *pick(long), backend="sdpa")
    from videocom_fast import _C

    def today():
        out = attn.attend(q_LHD, 0, long_meta, scale)     # long chunks' rows (gather + SDPA)
        _C.paged_attention_rowdot(q_LHD.numpy(), old_pool.k[0].numpy(), old_pool.v[0].numpy(), out.numpy(),
                                  *short_meta, scale)
        return out

    def new():
        return attn.attend(q_LHD, 0, new_meta, scale)

    return today, new


CASES = [("tiny", "decode"), ("tiny", "decode_shared"), ("tiny", "mixed"), ("7b", "mixed")]


@pytest.mark.parametrize("path", ["today", "new"])
@pytest.mark.parametrize("shape,case", CASES)
def test_paged_attention_step(benchmark, shape, case, path):
    benchmark.group = f"attention_{shape}_{case}"
    benchmark.extra_info["role"] = "baseline" if path == "today" else "candidate"
    today, new = _step(shape, case)
    want, got = today(), new()        # warm-up, and the two paths agree
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    fn = today if path == "today" else new
    benchmark.pedantic(fn, rounds=15 if shape == "tiny" else 5, warmup_rounds=1)
    _medians[(shape, case, path)] = benchmark.stats["median"]


@pytest.fixture(scope="module", autouse=True)
def _ratio_table(request):
    yield
    if not _medians:
        return
    lines = ["", "paged attention, one layer of one step (2-core CPU, fp32)   today ms     new ms   speedup"]
    for shape, case in CASES:
        t, n = _medians.get((shape, case, "today")), _medians.get((shape, case, "new"))
        if t and n:
            lines.append(f"  {shape + ' ' + case:<56}{t * 1e3:>9.3f}{n * 1e3:>11.3f}{t / n:>9.2f}x")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():  # fd capture is still on during module teardown
        print("\n".join(lines))
