"""Paged KV pool and paged attention against plain causal attention over each whole sequence (float64)."""
from __future__ import annotations

import random

import pytest
import torch

from videocom_fast.rollout.attention import PagedBatch, cpp_available, paged_attention
from videocom_fast.rollout.kv_cache import PagedKVPool, StepCache


class _Layer(torch.nn.Module):
    def __init__(self, idx):
        super().__init__()
        self.layer_idx = idx


def _reference(q_HLD, k_HLD, v_HLD, scale):
    """Naive causal attention with GQA in float64: (L, Hq, D)."""
    rep = q_HLD.shape[0] // k_HLD.shape[0]
    k, v = k_HLD.repeat_interleave(rep, 0), v_HLD.repeat_interleave(rep, 0)
    s = (q_HLD @ k.transpose(1, 2)) * scale
    L = s.shape[-1]
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(0, 1)


def test_pool_write_gather_roundtrip_and_copy_rows():
    pool = PagedKVPool(2, 13, 5, 3, 4, dtype=torch.float64)
    table = random.sample(range(13), 4)
    k, v = torch.randn(17, 3, 4, dtype=torch.float64), torch.randn(17, 3, 4, dtype=torch.float64)
    pool.write(1, pool.slots(table, 0, 17), k, v)
    gk, gv = pool.gather(1, table, 17)
    assert torch.equal(gk, k) and torch.equal(gv, v)
    free = [b for b in range(13) if b not in table][0]
    pool.copy_rows(table[3], free, 2)   # rows 15, 16 live in block 3
    assert torch.equal(pool.k[1][free, :2], k[15:17]) and torch.equal(pool.v[0][free, :2], pool.v[0][table[3], :2])
    with pytest.raises(ValueError, match="rows"):
        pool.copy_rows(0, 1, 6)
    with pytest.raises(ValueError, match="slots"):
        pool.slots(table, 0, 21)
    with pytest.raises(ValueError, match="num_blocks"):
        PagedKVPool(1, 0, 4, 1, 1)


_CASES = [(4, 4, 2, 8), (16, 2, 2, 32), (3, 6, 1, 24), (5, 4, 1, 64), (16, 28, 4, 128)]


@pytest.mark.parametrize("backend", ["sdpa", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bs,Hq,Hkv,D", _CASES)
def test_paged_attention_equals_causal_attention(bs, Hq, Hkv, D, dtype, backend):
    """Several sequences, each at a different stage (prefill from 0, a later chunk, a decode), one call.
    Under "cpp", chunks of <= CPP_MAX_QUERY_ROWS rows run the C++ kernel (decodes, the 6- and 12-row
    chunks: one and two row tiles) and the longer ones SDPA, so both paths meet in one output."""
    if backend == "cpp" and not cpp_available("cpu", dtype):
        pytest.skip("videocom_fast._C not built")
    torch.manual_seed(bs * D)
    scale = D ** -0.5
    lens = [23, 1, 17, 40, 9, 30, 70]    # total rows of each sequence
    starts = [0, 0, 11, 39, 8, 18, 69]   # rows already in the KV before this step (39, 8, 69: decodes)
    pool = PagedKVPool(1, 96, bs, Hkv, D, dtype=dtype)
    free = list(range(96))
    random.Random(bs).shuffle(free)
    tables, q_all, k_all, v_all = [], [], [], []
    for n in lens:
        tables.append([free.pop() for _ in range(-(-n // bs))])
        q_all.append(torch.randn(Hq, n, D, dtype=torch.float64))
        k_all.append(torch.randn(Hkv, n, D, dtype=torch.float64))
        v_all.append(torch.randn(Hkv, n, D, dtype=torch.float64))
    want_all = [_reference(q, k, v, scale) for q, k, v in zip(q_all, k_all, v_all)]
    q_all, k_all, v_all = ([t.to(dtype) for t in ts] for ts in (q_all, k_all, v_all))
    for t, s, k, v in zip(tables, starts, k_all, v_all):   # earlier steps: rows [0, start)
        if s:
            pool.write(0, pool.slots(t, 0, s), k[:, :s].transpose(0, 1), v[:, :s].transpose(0, 1))
    # this step: rows [start, len) of every sequence packed into one query
    q = torch.cat([q[:, s:] for q, s in zip(q_all, starts)], dim=1)[None]
    k = torch.cat([k[:, s:] for k, s in zip(k_all, starts)], dim=1)[None]
    v = torch.cat([v[:, s:] for v, s in zip(v_all, starts)], dim=1)[None]
    slots = torch.cat([pool.slots(t, s, n) for t, s, n in zip(tables, starts, lens)])
    StepCache(pool, slots).update(k, v, 0)
    q_lens = [n - s for n, s in zip(lens, starts)]
    q_starts = [sum(q_lens[:i]) for i in range(len(lens))]
    meta = PagedBatch(pool, q_starts, q_lens, lens, tables, backend=backend)
    if backend == "cpp":
        assert sorted(q_lens[i] for i in meta.cpp_chunks) == [1, 1, 1, 1, 6, 12]
    out, _ = paged_attention(_Layer(0), q, k, v, None, scaling=scale, paged=meta)
    assert out.shape == (1, sum(q_lens), Hq, D) and out.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for i in range(len(lens)):
        got = out[0, q_starts[i]:q_starts[i] + q_lens[i]].double()
        torch.testing.assert_close(got, want_all[i][starts[i]:], rtol=tol, atol=tol)


def _cpp_args(L=3, Hq=4, Hkv=2, D=8, NB=6, BS=4):
    import numpy as np
    q = np.random.default_rng(0).standard_normal((L, Hq, D)).astype(np.float32)
    pool = np.zeros((NB, BS, Hkv, D), np.float32)
    i64 = lambda *x: np.array(x, dtype=np.int64)  # noqa: E731
    return dict(q=q, k_pool=pool, v_pool=pool.copy(), out=np.zeros_like(q), q_start=i64(0, 1), q_len=i64(1, 2),
                ctx_len=i64(5, 7), table_off=i64(0, 2), tables=np.array([0, 1, 2, 3], dtype=np.int32), scale=0.5)


@pytest.mark.parametrize("change,match", [
    (dict(tables=[0, 1, 2, 9]), "chunk 1: block id outside the pool"),
    (dict(q_len=[1, 8]), "chunk 1: need 1 <= q_len <= ctx_len"),
    (dict(q_len=[0, 2]), "chunk 0: need 1 <= q_len"),
    (dict(q_start=[0, 2]), "chunk 1: query rows outside q"),
    (dict(ctx_len=[5, 13]), "chunk 1: block table outside tables"),
    (dict(out="f64"), "out: wrong dtype"),
    (dict(k_pool="f64"), "k_pool: wrong dtype"),
    (dict(q_start="i32"), "q_start: wrong dtype"),
    (dict(table_off=[0]), "lengths differ"),
    (dict(q="2d"), "q: expected"),
    (dict(v_pool="short"), "shapes differ"),
    (dict(k_pool="strided", v_pool="strided"), "must be contiguous"),
    (dict(out="short"), "out: shape must equal q's"),
    (dict(q="3heads", out="3heads"), "multiple of kv heads"),
    (dict(q="strided_d"), "head dim must be contiguous"),
])
def test_cpp_paged_attention_rejects_bad_buffers(change, match):
    """Every bad buffer is a ValueError naming it (never a read outside the pool)."""
    import numpy as np
    _C = pytest.importorskip("videocom_fast._C")
    a = _cpp_args()
    for name, v in change.items():
        if v == "f64":
            a[name] = a[name].astype(np.float64)
        elif v == "i32":
            a[name] = a[name].astype(np.int32)
        elif v == "2d":
            a[name] = a[name][0]
        elif v == "short":
            a[name] = a[name][:-1]
        elif v == "strided":
            a[name] = np.repeat(a[name], 2, axis=0)[::2]
        elif v == "3heads":
            a[name] = np.ascontiguousarray(a[name][:, :3])
        elif v == "strided_d":
            a[name] = np.repeat(a[name], 2, axis=2)[:, :, ::2]
        else:
            a[name] = np.array(v, dtype=a[name].dtype)
    with pytest.raises(ValueError, match=match):
        _C.paged_attention(**a)
    a = _cpp_args()
    _C.paged_attention(**a)                   # the unchanged arguments are valid
    assert np.isfinite(a["out"]).all()


def test_without_metadata_falls_back_to_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    q, k, v = torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    layer = _Layer(0)
    layer.is_causal = True
    layer.num_key_value_groups = 2
    got, _ = paged_attention(layer, q, k, v, None, scaling=0.3)
    want, _ = sdpa_attention_forward(layer, q, k, v, None, scaling=0.3)
    torch.testing.assert_close(got, want)
