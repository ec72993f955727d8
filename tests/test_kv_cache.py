"""Paged KV pool and paged attention against plain causal attention over each whole sequence (float64)."""
from __future__ import annotations

import random

import pytest
import torch

from videocom_fast.rollout.attention import PagedBatch, paged_attention
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


@pytest.mark.parametrize("bs,Hq,Hkv", [(4, 4, 2), (16, 2, 2), (3, 6, 1)])
def test_paged_attention_equals_causal_attention(bs, Hq, Hkv):
    """Several sequences, each at a different stage (prefill from 0, a later chunk, a decode), one call."""
    torch.manual_seed(bs)
    D, scale = 8, 8 ** -0.5
    lens = [23, 1, 17, 40, 9]            # total rows of each sequence
    starts = [0, 0, 11, 39, 8]           # rows already in the KV before this step (39, 8: decodes)
    pool = PagedKVPool(1, 64, bs, Hkv, D, dtype=torch.float64)
    free = list(range(64))
    random.Random(bs).shuffle(free)
    tables, q_all, k_all, v_all = [], [], [], []
    for n in lens:
        tables.append([free.pop() for _ in range(-(-n // bs))])
        q_all.append(torch.randn(Hq, n, D, dtype=torch.float64))
        k_all.append(torch.randn(Hkv, n, D, dtype=torch.float64))
        v_all.append(torch.randn(Hkv, n, D, dtype=torch.float64))
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
    meta = PagedBatch(pool, q_starts, q_lens, lens, tables)
    out, _ = paged_attention(_Layer(0), q, k, v, None, scaling=scale, paged=meta)
    assert out.shape == (1, sum(q_lens), Hq, D)
    for i in range(len(lens)):
        want = _reference(q_all[i], k_all[i], v_all[i], scale)[starts[i]:]
        torch.testing.assert_close(out[0, q_starts[i]:q_starts[i] + q_lens[i]], want, rtol=1e-12, atol=1e-12)


def test_without_metadata_falls_back_to_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    q, k, v = torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    layer = _Layer(0)
    layer.is_causal = True
    layer.num_key_value_groups = 2
    got, _ = paged_attention(layer, q, k, v, None, scaling=0.3)
    want, _ = sdpa_attention_forward(layer, q, k, v, None, scaling=0.3)
    torch.testing.assert_close(got, want)
