"""A stand-in `flash_attn` module for machines where flash-attn cannot be installed (no GPU, no CUDA build).

`flash_attn_varlen_func` keeps flash-attn 2's Python signature (flash_attn/flash_attn_interface.py, >= 2.5.6)
and refuses what the real `mha_varlen_fwd` refuses (csrc/flash_attn/flash_api.cpp): q/k/v fp16 or bf16 and
of one dtype, int32 contiguous cu_seqlens of batch + 1 entries, an int32 block table with a contiguous last
dimension and one row per sequence, a paged K/V of shape (num_blocks, page, Hkv, D) with page % 256 == 0,
last dimensions contiguous, Hq % Hkv == 0, head dim <= 256, every tensor on q's device. It also checks what
the real kernel silently trusts (and would read out of bounds or mis-mask on): cu_seqlens start at 0, rise,
end at total_q; max_seqlen_q/k cover every sequence; every block a sequence reads is a real block. The result
is a plain reference: per sequence, its K/V rows read through the block table, float32 scores, causal mask
aligned to the bottom right as flash-attn >= 2.1 does, output in q's dtype.

    with fake_flash_attn.installed(monkeypatch) as fake:   # sys.modules["flash_attn"] + "cpu" allowed
        ...; fake.calls                                       # how many calls passed the checks
"""
from __future__ import annotations

import contextlib
import sys
import types

import torch


class FlashArgumentError(RuntimeError):
    """What the real extension raises (a RuntimeError from TORCH_CHECK)."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise FlashArgumentError(msg)


def _int32_vector(t, name: str, n: int, device) -> None:
    _check(isinstance(t, torch.Tensor), f"{name} must be a tensor")
    _check(t.dtype == torch.int32, f"{name} must have dtype int32")
    _check(t.is_contiguous(), f"{name} must be contiguous")
    _check(t.device == device, f"{name} must be on the device of q")
    _check(tuple(t.shape) == (n,), f"{name} must have shape ({n},), got {tuple(t.shape)}")


def _check_cu(cu: torch.Tensor, name: str, total: int | None, max_len: int) -> list[int]:
    v = cu.tolist()
    _check(v[0] == 0, f"{name}[0] must be 0, got {v[0]}")
    lens = [b - a for a, b in zip(v, v[1:])]
    _check(all(n >= 0 for n in lens), f"{name} must not decrease: {v}")
    if total is not None:
        _check(v[-1] == total, f"{name}[-1] = {v[-1]} must equal the packed length {total}")
    _check(max(lens) <= max_len, f"a sequence of {max(lens)} rows exceeds the max_seqlen given for {name} ({max_len})")
    return lens


class FakeFlashAttn:
    def __init__(self):
        self.calls = 0

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        _check(q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only support fp16 and bf16 data type")
        _check(k.dtype == q.dtype, "query and key must have the same dtype")
        _check(v.dtype == q.dtype, "query and value must have the same dtype")
        for name, t in (("k", k), ("v", v)):
            _check(t.device == q.device, f"{name} must be on the device of q")
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check(t.stride(-1) == 1, f"{name}: Input tensor must have contiguous last dimension")
        _check(dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None and tuple(window_size) == (-1, -1)
               and not return_attn_probs, "the fake implements plain attention only")
        _check(q.dim() == 3, f"q must be (total_q, Hq, D), got {tuple(q.shape)}")
        batch = cu_seqlens_q.numel() - 1
        _check(batch > 0, "batch size must be positive")
        _int32_vector(cu_seqlens_q, "cu_seqlens_q", batch + 1, q.device)
        _int32_vector(cu_seqlens_k, "cu_seqlens_k", batch + 1, q.device)
        total_q, Hq, D = q.shape
        _check(D <= 256, "FlashAttention forward only supports head dimension at most 256")
        _check(block_table is not None, "the fake covers the paged path only (block_table given)")
        _check(block_table.dtype == torch.int32, "block_table must have dtype torch.int32")
        _check(block_table.stride(-1) == 1, "block_table must have contiguous last dimension")
        _check(block_table.device == q.device, "block_table must be on the device of q")
        _check(k.dim() == 4 and v.dim() == 4, "paged k/v must be (num_blocks, page_block_size, Hkv, D)")
        num_blocks, page, Hkv, _ = k.shape
        _check(page % 256 == 0, "Paged KV cache block size must be divisible by 256")
        _check(tuple(k.shape) == (num_blocks, page, Hkv, D), f"k must have shape {(num_blocks, page, Hkv, D)}")
        _check(tuple(v.shape) == (num_blocks, page, Hkv, D), f"v must have shape {(num_blocks, page, Hkv, D)}")
        _check(Hq % Hkv == 0, "Number of heads in key/value must divide number of heads in query")
        _check(block_table.dim() == 2 and block_table.shape[0] == batch,
               f"block_table must be (batch {batch}, max_num_blocks_per_seq), got {tuple(block_table.shape)}")
        q_lens = _check_cu(cu_seqlens_q, "cu_seqlens_q", total_q, max_seqlen_q)
        k_lens = _check_cu(cu_seqlens_k, "cu_seqlens_k", None, max_seqlen_k)
        table = block_table.tolist()
        scale = softmax_scale if softmax_scale is not None else D ** -0.5
        out = torch.empty_like(q)
        row = 0
        for b in range(batch):
            n, s = q_lens[b], k_lens[b]
            nb = -(-s // page)
            _check(nb <= len(table[b]), f"sequence {b}: {s} keys need {nb} blocks, the table holds {len(table[b])}")
            ids = table[b][:nb]
            _check(all(0 <= i < num_blocks for i in ids), f"sequence {b}: block ids {ids} out of [0, {num_blocks})")
            idx = torch.tensor(ids, dtype=torch.long, device=q.device)
            kk = k.index_select(0, idx).reshape(-1, Hkv, D)[:s].float().repeat_interleave(Hq // Hkv, 1)
            vv = v.index_select(0, idx).reshape(-1, Hkv, D)[:s].float().repeat_interleave(Hq // Hkv, 1)
            qq = q[row:row + n].float()
            scores = torch.einsum("qhd,khd->hqk", qq, kk) * scale
            if causal:   # bottom-right aligned: query i of n sees keys j <= s - n + i
                allowed = torch.arange(s)[None, :] <= torch.arange(s - n, s)[:, None]
                scores = scores.masked_fill(~allowed.to(q.device), float("-inf"))
            out[row:row + n] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv).to(q.dtype)
            row += n
        self.calls += 1
        return out

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("flash_attn")
        mod.__version__ = "2.8.3+fake"
        mod.flash_attn_varlen_func = self.flash_attn_varlen_func
        return mod


@contextlib.contextmanager
def installed(monkeypatch):
    """`flash_attn` importable as the fake, and the CPU accepted as a flash device, inside the block."""
    from videocom_fast.rollout import attention
    fake = FakeFlashAttn()
    monkeypatch.setitem(sys.modules, "flash_attn", fake.module())
    monkeypatch.setattr(attention, "FLASH_DEVICE_TYPES", ("cuda", "cpu"))
    yield fake
