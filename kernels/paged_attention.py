"""Paged causal attention on CUDA in ONE op per layer (issue 16; one Triton launch, two when a decode-only
step splits its keys): the engine's attention when flash-attn is not importable (its SDPA fallback gathers
each decode bucket's whole K/V per layer and issues ~6 kernels per bucket and ~5 per prefill chunk, with
shapes read from the host).

Legend: L packed query rows, Hq / Hkv query / key-value heads, G = Hq / Hkv, D head dim, C chunks, T tiles,
BS pool block rows, R query rows per tile.

One program per (tile, kv head). A tile is R consecutive query rows of one chunk (R = 1 when every chunk of
the step is a decode, else 16); its G query heads that share the kv head are stacked into the M dimension of
the matmuls (M = R * GP, GP = G padded to a power of two, M >= 16), so each K/V block is loaded once for all
of them (no K/V expansion to Hq heads). The keys are walked BLOCK_N at a time through the chunk's block table
with an online softmax in float32 (flash-attention's recurrence); query row i of a chunk of q_len rows and
ctx keys sees keys j <= ctx - q_len + i, and no key at or past ctx is ever loaded (masked loads): rows of the
pool that were never written are never read.

Decode-only steps split the keys (flash-decoding): with few sequences, tiles x kv heads programs cannot fill a
GPU (8 sequences of a 7B model: 32 programs on an H100's 132 SMs, each walking the whole context), so each
program takes one of S shares of the keys (`split_count`) and writes its partial softmax state (max, sum,
unnormalized output) to a workspace that a second kernel merges. S follows static shapes only.

Everything the kernel reads about the step is on the device (tile list, per-chunk q_start / q_len / ctx, the
block table): no host value sets a loop bound, so a decode step of a fixed bucket has a fixed launch shape
(what a CUDA graph needs). The math is the C++ kernel's (csrc/cpu/paged_attention.cpp) and SDPA's; the tests
compare all three (tests/test_paged_attention_triton.py, under TRITON_INTERPRET=1 in a subprocess).
"""
from __future__ import annotations

import torch

try:  # Triton is optional: the CPU paths never need this module
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "not available"
    triton = tl = None

BLOCK_N = 32    # keys per iteration


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def tile_rows(max_q_len: int) -> int:
    """R: query rows per tile (the host builds the tile list with it; the kernel's BLOCK_M)."""
    return 1 if max_q_len <= 1 else 16


def group_pad(group: int, rows: int) -> int:
    """GP: the query heads per kv head padded to a power of two, with R * GP >= 16 (tl.dot's minimum)."""
    return max(_next_pow2(group), 16 // rows)


if triton is not None:
    @triton.jit
    def _tile(tiles_ptr, cq_ptr, T, C, G: tl.constexpr, GP: tl.constexpr, R: tl.constexpr):
        """This program's tile: its chunk, first row, q_len and ctx; per stacked row i of M = R * GP: the row
        within the chunk, the packed query row, the query head, and whether it is a real (row, head)."""
        c = tl.load(tiles_ptr + tl.program_id(0))
        m0 = tl.load(tiles_ptr + T + tl.program_id(0))
        q_len = tl.load(cq_ptr + C + c)
        i = tl.arange(0, R * GP)
        r = m0 + i // GP                      # the row within the chunk
        gi = i % GP                           # the query head within the group
        rows = (tl.load(cq_ptr + c) + r).to(tl.int64)
        heads = tl.program_id(1) * G + gi
        return c, m0, q_len, tl.load(cq_ptr + 2 * C + c), r, rows, heads, (r < q_len) & (gi < G)

    @triton.jit
    def _partials(ws_ptr, s, T, M: tl.constexpr, DP: tl.constexpr):
        """Where split s of this program's (tile, kv head) keeps its partial state: m (M,), l (M,), then the
        unnormalized output (M, DP), float32."""
        slot = (s * T + tl.program_id(0)) * tl.num_programs(1) + tl.program_id(1)
        return ws_ptr + slot.to(tl.int64) * (M * (DP + 2))

    @triton.jit
    def _paged_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, ws_ptr, tiles_ptr, cq_ptr, table_ptr, T, C,
                                max_blocks, sq_l, sq_h, sk_r, sk_h, so_l, so_h, scale,
                                G: tl.constexpr, GP: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr,
                                D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr, IEEE: tl.constexpr,
                                SPLITS: tl.constexpr):
        h = tl.program_id(1)
        c, m0, q_len, ctx, r, rows, heads, row_ok = _tile(tiles_ptr, cq_ptr, T, C, G, GP, R)
        M: tl.constexpr = R * GP
        i = tl.arange(0, M)
        d = tl.arange(0, DP)
        d_ok = d < D
        q = tl.load(q_ptr + rows[:, None] * sq_l + heads[:, None] * sq_h + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        last = ctx - q_len + r                # the last key each row sees
        hi = tl.minimum(ctx, ctx - q_len + m0 + R)
        lo = 0
        if SPLITS > 1:                        # this program's share of the keys, whole BLOCK_N steps
            per = tl.cdiv(tl.cdiv(hi, SPLITS), BLOCK_N) * BLOCK_N
            lo = tl.program_id(2) * per
            hi = tl.minimum(hi, lo + per)
        m_i = tl.full([M], float("-inf"), tl.float32)
        l_i = tl.zeros([M], tl.float32)
        acc = tl.zeros([M, DP], tl.float32)
        n = tl.arange(0, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            keys = n0 + n
            k_ok = keys < hi
            blk = tl.load(table_ptr + c.to(tl.int64) * max_blocks + keys // BS, mask=k_ok, other=0)
            kr = blk.to(tl.int64) * BS + keys % BS
            kv_off = kr[:, None] * sk_r + h * sk_h + d[None, :]
            kv_ok = k_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_ok, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where((keys[None, :] <= last[:, None]) & k_ok[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row with no key yet: nothing to rescale
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + kv_off, mask=kv_ok, other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        if SPLITS > 1:
            base = _partials(ws_ptr, tl.program_id(2), T, M, DP)
            tl.store(base + i, m_i)
            tl.store(base + M + i, l_i)
            tl.store(base + 2 * M + i[:, None] * DP + d[None, :], acc)
        else:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(o_ptr + rows[:, None] * so_l + heads[:, None] * so_h + d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _combine_splits_kernel(o_ptr, ws_ptr, tiles_ptr, cq_ptr, T, C, so_l, so_h,
                               G: tl.constexpr, GP: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
                               DP: tl.constexpr, SPLITS: tl.constexpr):
        """out = the splits' partials merged: flash-decoding's reduction (a program per tile and kv head)."""
        _, _, _, _, _, rows, heads, row_ok = _tile(tiles_ptr, cq_ptr, T, C, G, GP, R)
        M: tl.constexpr = R * GP
        i = tl.arange(0, M)
        d = tl.arange(0, DP)
        m = tl.full([M], float("-inf"), tl.float32)
        for s in range(SPLITS):
            m = tl.maximum(m, tl.load(_partials(ws_ptr, s, T, M, DP) + i))
        m_use = tl.where(m == float("-inf"), 0.0, m)
        l_sum = tl.zeros([M], tl.float32)
        acc = tl.zeros([M, DP], tl.float32)
        for s in range(SPLITS):
            base = _partials(ws_ptr, s, T, M, DP)
            w = tl.exp(tl.load(base + i) - m_use)      # 0 for a split that saw no key
            l_sum += w * tl.load(base + M + i)
            acc += w[:, None] * tl.load(base + 2 * M + i[:, None] * DP + d[None, :])
        out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
        tl.store(o_ptr + rows[:, None] * so_l + heads[:, None] * so_h + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (d < D)[None, :])


def split_count(tiles: int, kv_heads: int, max_keys: int) -> int:
    """Key splits of a decode-only step (flash-decoding): enough programs to fill a GPU (~256: an H100 has 132
    SMs) when tiles x kv heads are few, each split >= 2 BLOCK_N keys, at most 16. A function of static shapes
    only (tiles, the table's width), so a captured decode graph keeps its split count."""
    want = -(-256 // max(1, tiles * kv_heads))
    return max(1, min(16, _next_pow2(want), max_keys // (2 * BLOCK_N)))


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, out: torch.Tensor,
                    tiles: torch.Tensor, cq: torch.Tensor, table: torch.Tensor, scale: float,
                    rows_per_tile: int, splits: int | None = None) -> None:
    """out (L, Hq, D) = causal attention of q (L, Hq, D; any row / head strides, unit stride in D) to the pool
    layer (NB, BS, Hkv, D) through int32 metadata on q's device: tiles (2, T) = (chunk, first row),
    cq (3, C) = (q_start, q_len, ctx), table (C, max_blocks) block ids (padding never read);
    `rows_per_tile`: the R the tile list was built with (`tile_rows`). `splits`: key splits (decode-only
    steps, R = 1; default `split_count`); with more than one, each program attends to its share of the keys
    and a second kernel merges the partials."""
    if triton is None:
        raise RuntimeError("kernels.paged_attention: triton is not importable")
    L, Hq, D = q.shape
    NB, BS, Hkv, Dk = k_pool.shape
    if Dk != D or v_pool.shape != k_pool.shape or Hq % Hkv or out.shape != q.shape:
        raise ValueError(f"paged_attention: q {tuple(q.shape)}, pools {tuple(k_pool.shape)} / "
                         f"{tuple(v_pool.shape)}, out {tuple(out.shape)} do not fit (L, Hq, D) / "
                         f"(NB, BS, Hkv, D) with Hkv | Hq")
    if q.stride(-1) != 1 or out.stride(-1) != 1 or not (k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError("paged_attention: q and out need unit stride in D, the pools must be contiguous")
    if tiles.dtype != torch.int32 or cq.dtype != torch.int32 or table.dtype != torch.int32:
        raise ValueError(f"paged_attention: metadata must be int32, got tiles {tiles.dtype}, cq {cq.dtype}, "
                         f"table {table.dtype}")
    T, C = tiles.shape[1], cq.shape[1]
    if T == 0:
        return
    if rows_per_tile not in (1, 16):
        raise ValueError(f"paged_attention: rows_per_tile must be 1 or 16 (tile_rows), got {rows_per_tile}")
    G, R = Hq // Hkv, rows_per_tile
    GP, DP = group_pad(G, R), max(16, _next_pow2(D))
    S = 1 if R != 1 else splits or split_count(T, Hkv, table.shape[1] * BS)
    ws = torch.empty(S * T * Hkv * R * GP * (DP + 2) if S > 1 else 1, dtype=torch.float32, device=q.device)
    _paged_attention_kernel[(T, Hkv, S)](
        q, k_pool, v_pool, out, ws, tiles, cq, table, T, C, table.shape[1],
        q.stride(0), q.stride(1), Hkv * D, D, out.stride(0), out.stride(1), float(scale),
        G=G, GP=GP, R=R, BLOCK_N=BLOCK_N, D=D, DP=DP, BS=BS,
        IEEE=q.dtype == torch.float32, SPLITS=S, num_warps=4 if R * GP <= 64 else 8)
    if S > 1:
        _combine_splits_kernel[(T, Hkv)](out, ws, tiles, cq, T, C, out.stride(0), out.stride(1),
                                         G=G, GP=GP, R=R, D=D, DP=DP, SPLITS=S)
