"""The Triton paged attention (kernels/paged_attention.py; the engine's attention on CUDA without flash-attn,
issue 16). The kernel runs under TRITON_INTERPRET=1 in a subprocess (Triton reads the flag at import):
decodes, first and later prefill chunks, GQA 2 / 7 / 3, head dims 64 / 40 / 24, float32 and float16, its error
against a float64 reference within 2x the SDPA backend's error in the same dtype (flash-attention's rule, + 1
ulp); a NaN-poisoned pool (it never loads a row at or past a chunk's context); strided query rows (the
engine's q is a view of the fused QKV rows); and a whole greedy rollout whose tokens equal the C++ backend's.
In process: the op's SDPA reference (what the CPU runs for the stand-in device) by the same rule, and the tile
list."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_rollout import env_factory, rollout_samples, tiny_dir  # noqa: F401
from test_flash_paged import _LENS, _STARTS, _step
from videocom_fast.rollout import attention as attn
from videocom_fast.rollout.kv_cache import PagedKVPool

ROOT = Path(__file__).resolve().parents[1]


def _within_rule(dtype, Hq, Hkv, D, lens, starts, seed):
    got, want = _step("triton", dtype, Hq, Hkv, D, lens, starts, bs=16, seed=seed)
    base, _ = _step("sdpa", dtype, Hq, Hkv, D, lens, starts, bs=16, seed=seed)
    ulp = torch.finfo(dtype).eps
    for i, (o, b, w) in enumerate(zip(got, base, want)):
        err, base_err = (o - w).abs().max().item(), (b - w).abs().max().item()
        assert err <= 2 * base_err + ulp, f"sequence {i}, seed {seed}: triton {err:.3g}, sdpa {base_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_op_equals_causal_attention(dtype):
    """The op's CPU implementation (no interpreter: the SDPA reference) through the engine's metadata."""
    _within_rule(dtype, 7, 1, 40, _LENS, _STARTS, random.randrange(2 ** 31))


@pytest.mark.parametrize("lens,starts,rows", [(_LENS, _STARTS, 16), ([5, 40, 17], [4, 39, 16], 1)])
def test_tiles_cover_every_query_row_once(lens, starts, rows):
    pool = PagedKVPool(1, 200, 16, 2, 8, layout="standard")
    q_lens = [n - s for n, s in zip(lens, starts)]
    q_starts = list(np.cumsum([0] + q_lens[:-1]))
    tables = [list(range(100, 100 + -(-n // 16))) for n in lens]
    meta = attn.PagedBatch(pool, q_starts, q_lens, list(lens), tables, backend="triton")
    tiles, cq, table, R = meta.triton_meta("cpu")
    assert R == rows and tiles.dtype == cq.dtype == table.dtype == torch.int32
    covered = sorted(q_starts[c] + m + j for c, m in tiles.t().tolist()
                     for j in range(R) if m + j < q_lens[c])
    assert covered == list(range(sum(q_lens)))
    assert cq.tolist() == [q_starts, q_lens, list(lens)]
    for c, t in enumerate(tables):
        assert table[c, :len(t)].tolist() == t and not table[c, len(t):].any()


_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, "ROOT/tests")
    from test_paged_attention_triton import _within_rule, _poisoned_and_strided, _split_keys, _greedy_equal
    from test_flash_paged import _LENS, _STARTS
    seed = SEED
    for dtype in (torch.float32, torch.float16):
        for Hq, Hkv, D in ((4, 2, 64), (7, 1, 40), (6, 2, 24)):
            _within_rule(dtype, Hq, Hkv, D, _LENS, _STARTS, seed)                          # mixed: R = 16
            _within_rule(dtype, Hq, Hkv, D, [33, 1, 300, 17], [32, 0, 299, 16], seed + 1)   # decodes: R = 1
    _poisoned_and_strided(seed)
    _split_keys(seed)
    if "greedy" in sys.argv:
        _greedy_equal()
    print("OK")
""")


def _nan_pool(seed, g, Hkv, D, lens, blocks, dtype=torch.float32, device="cpu", bs=16):
    """(pool, block tables): a pool whose every row holds NaN but the first lens[i] rows of sequence i (random
    K/V from `g`), each sequence on shuffled blocks."""
    pool = PagedKVPool(1, blocks, bs, Hkv, D, dtype=dtype, device=device, layout="standard",
                       fill=float("nan"))
    free = list(range(blocks))
    random.Random(seed).shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // bs))] for n in lens]
    for t, n in zip(tables, lens):
        k, v = (torch.randn(n, Hkv, D, generator=g).to(device, dtype) for _ in range(2))
        pool.write(0, pool.slots(t, 0, n).to(device), k, v)
    return pool, tables


def _poisoned_and_strided(seed):
    """Unwritten pool rows hold NaN; q is a strided view of QKV rows; the output equals the SDPA reference's
    on the same metadata (which gathers only up to each context)."""
    g = torch.Generator().manual_seed(seed)
    Hq, Hkv, D = 4, 2, 32
    lens, starts = [45, 3, 70], [44, 0, 50]
    pool, tables = _nan_pool(seed, g, Hkv, D, lens, 16)
    q_lens = [n - s for n, s in zip(lens, starts)]
    L = sum(q_lens)
    qkv = torch.randn(L, (Hq + 2 * Hkv) * D, generator=g)
    q = qkv[:, :Hq * D].view(L, Hq, D)
    q_starts = [0, q_lens[0], q_lens[0] + q_lens[1]]
    meta = attn.PagedBatch(pool, q_starts, q_lens, lens, tables, backend="triton")
    out = attn.attend(q, 0, meta, D ** -0.5)
    ref = torch.empty_like(out)
    tiles, cq, table, _ = meta.triton_meta("cpu")
    attn.paged_attention_ref(q, pool.k[0], pool.v[0], ref, tiles, cq, table, D ** -0.5)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


def _split_keys(seed):
    """Decode-only steps split their keys (flash-decoding): 1, 3, 16 shares and the default, against the
    reference; contexts of 1 key (15 of 16 shares empty), one block, a block and one, several blocks."""
    from videocom_fast.kernels import paged_attention as K
    g = torch.Generator().manual_seed(seed)
    Hq, Hkv, D, bs = 6, 2, 24, 16
    ctxs = [1, 16, 17, 300, 64, 65]
    pool, tables = _nan_pool(seed, g, Hkv, D, ctxs, 40, bs=bs)
    q = torch.randn(len(ctxs), Hq, D, generator=g)
    meta = attn.PagedBatch(pool, list(range(len(ctxs))), [1] * len(ctxs), ctxs, tables, backend="triton")
    tiles, cq, table, rows = meta.triton_meta("cpu")
    ref = torch.empty_like(q)
    attn.paged_attention_ref(q, pool.k[0], pool.v[0], ref, tiles, cq, table, D ** -0.5)
    assert rows == 1 and K.split_count(len(ctxs), Hkv, table.shape[1] * bs) > 1
    outs = []
    for splits in (None, 1, 3, 16):
        out = torch.full_like(q, float("nan"))
        K.paged_attention(q, pool.k[0], pool.v[0], out, tiles, cq, table, D ** -0.5, rows, splits=splits)
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
        outs.append(out)
    assert not torch.equal(outs[1], outs[2])    # the split path ran: another summation order


def _greedy_equal():
    """A greedy rollout through the Triton backend (interpreted) has the C++ backend's tokens."""
    from helpers_rollout import make_data, make_tiny
    from videocom_fast.models import load
    from videocom_fast.rollout import RolloutEngine
    import tempfile
    d = Path(tempfile.mkdtemp())
    model, proc = load(make_tiny(d / "tiny"), dtype=torch.float32)
    samples = make_data(d / "data", num_samples=1)
    out = {}
    for backend in ("cpp", "triton"):
        eng = RolloutEngine(model, proc, env_factory=env_factory(), max_rounds=2, max_new_tokens=12,
                            attention=backend)
        out[backend] = eng.generate(samples, num_generations=2, greedy=True, seed=0)
        assert eng.stats["attention"] == attn.LABELS[backend]
    for a, b in zip(out["cpp"][0], out["triton"][0]):
        assert a.token_ids == b.token_ids


@pytest.mark.slow
def test_triton_kernel_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    script = _SCRIPT.replace("SEED", str(random.randrange(2 ** 30))).replace("ROOT", str(ROOT))
    run = subprocess.run([sys.executable, "-c", script, "greedy"], env=env, capture_output=True, text=True,
                         timeout=900, cwd=ROOT / "tests")
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_kernel_on_cuda_within_twice_sdpa_error(dtype):
    """On a GPU (make gpu-check): 7B's heads (28 / 4 / 128) and odd ones, a NaN-poisoned pool, decodes and
    chunks; error against float64 within 2x the same metadata's SDPA reference run in `dtype` on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    seed = random.randrange(2 ** 31)
    g = torch.Generator().manual_seed(seed)
    cases = [((28, 4, 128), [300, 1, 40, 700, 513], [0, 0, 39, 450, 512]),
             ((4, 2, 64), [300, 1, 40], [0, 0, 39]),
             ((28, 4, 128), [2300, 1, 900, 17], [2299, 0, 899, 16]),
             ((6, 2, 24), [33, 700], [32, 699])]
    for (Hq, Hkv, D), lens, starts in cases:    # mixed steps, and decode-only steps (their keys split)
        pool, tables = _nan_pool(seed, g, Hkv, D, lens, 400, dtype, "cuda")
        q_lens = [n - s for n, s in zip(lens, starts)]
        q = torch.randn(sum(q_lens), Hq, D, generator=g).to("cuda", dtype)
        q_starts = list(np.cumsum([0] + q_lens[:-1]))
        meta = attn.PagedBatch(pool, q_starts, q_lens, lens, tables, backend="triton")
        out = attn.attend(q, 0, meta, D ** -0.5)
        tiles, cq, table, _ = meta.triton_meta("cuda")
        base, want = torch.empty_like(out), torch.empty(out.shape, dtype=torch.float64)
        attn.paged_attention_ref(q, pool.k[0], pool.v[0], base, tiles, cq, table, D ** -0.5)
        attn.paged_attention_ref(q.double().cpu(), pool.k[0].double().cpu(), pool.v[0].double().cpu(), want,
                                 tiles.cpu(), cq.cpu(), table.cpu(), D ** -0.5)
        err = (out.double().cpu() - want).abs().max().item()
        base_err = (base.double().cpu() - want).abs().max().item()
        assert err <= 2 * base_err + torch.finfo(dtype).eps, (Hq, Hkv, D, seed, err, base_err)


def test_triton_attention_on_the_cpu_says_it_runs_the_reference(tiny_dir):  # noqa: F811
    from videocom_fast.models import load
    from videocom_fast.rollout import RolloutEngine
    model, proc = load(tiny_dir, dtype=torch.float32)
    with pytest.warns(UserWarning, match="SDPA reference, a test path"):
        eng = RolloutEngine(model, proc, attention="triton")
    assert eng.attn_backend == "triton"


def test_kernel_entry_refuses_bad_arguments_by_name():
    """Checked before any launch (no GPU or interpreter needed): shapes, metadata dtypes, the tile rows."""
    K = pytest.importorskip("videocom_fast.kernels.paged_attention")
    if K.triton is None:
        pytest.skip("triton is not importable")
    pool = PagedKVPool(1, 4, 16, 2, 8, layout="standard")
    q, out = torch.zeros(3, 4, 8), torch.zeros(3, 4, 8)
    i32 = lambda *s: torch.zeros(*s, dtype=torch.int32)  # noqa: E731
    args = (i32(2, 3), i32(3, 3), i32(3, 1), 0.1, 1)
    with pytest.raises(ValueError, match="do not fit"):
        K.paged_attention(torch.zeros(3, 3, 8), pool.k[0], pool.v[0], out, *args)   # 3 heads, 2 kv heads
    with pytest.raises(ValueError, match="metadata must be int32"):
        K.paged_attention(q, pool.k[0], pool.v[0], out, i32(2, 3).long(), *args[1:])
    with pytest.raises(ValueError, match="rows_per_tile must be 1 or 16"):
        K.paged_attention(q, pool.k[0], pool.v[0], out, *args[:4], 4)
    with pytest.raises(ValueError, match="unit stride in D"):
        K.paged_attention(q.transpose(1, 2).contiguous().transpose(1, 2), pool.k[0], pool.v[0], out, *args)
