"""Paged KV pool for the rollout engine: fixed tensors, block tables owned by the scheduler.

Legend: NB blocks, BS rows per block (block_size), Hkv key/value heads, D head dim, L packed tokens.

Per layer, keys and values live in `(NB, BS, Hkv, D)` tensors allocated once (so memory is bounded by
construction: nothing grows with the number of rollouts). A sequence's KV is the concatenation of the
rows of its blocks, in block-table order; row `p` of a sequence is slot `block_ids[p // BS] * BS + p % BS`.
The scheduler (videocom_fast.rollout.scheduler) decides block tables; this module only moves tensors:

- `StepCache` is the duck-typed `past_key_values` handed to the model for one packed forward. transformers
  calls `update(key, value, layer_idx)` right after RoPE (FACTS.md); we scatter the new rows into the pool
  at the step's slot mapping and return them unchanged. The attention function then reads the pool.
- `copy_rows(src, dst, rows)` copies the partial last block of a group's prompt into a forked rollout's
  private block (prefix sharing: the full blocks are shared by reference count, only the tail is copied).
"""
from __future__ import annotations

import torch


class PagedKVPool:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 *, dtype=torch.float32, device="cpu"):
        for name, v in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PagedKVPool: {name} must be a positive int, got {v!r}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        """Flat slot index (block * BS + row) of sequence rows [start, end)."""
        bs = self.block_size
        if end > len(block_ids) * bs or start < 0 or start > end:
            raise ValueError(f"slots: rows [{start}, {end}) do not fit {len(block_ids)} blocks of {bs}")
        p = torch.arange(start, end)
        table = torch.as_tensor(block_ids, dtype=torch.long)
        return table[p // bs] * bs + p % bs

    def write(self, layer: int, slots_L: torch.Tensor, key_LHD: torch.Tensor, value_LHD: torch.Tensor) -> None:
        self.k[layer].view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slots_L, key_LHD.to(self.k[layer].dtype))
        self.v[layer].view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slots_L, value_LHD.to(self.v[layer].dtype))

    def gather(self, layer: int, block_ids: list[int] | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of one sequence's first `length` rows: each (length, Hkv, D)."""
        idx = torch.as_tensor(block_ids, dtype=torch.long, device=self.k[layer].device)
        k = self.k[layer].index_select(0, idx).reshape(-1, self.num_kv_heads, self.head_dim)[:length]
        v = self.v[layer].index_select(0, idx).reshape(-1, self.num_kv_heads, self.head_dim)[:length]
        return k, v

    def copy_rows(self, src: int, dst: int, rows: int) -> None:
        """Copy rows [0, rows) of block `src` into block `dst` in every layer (fork of a partial block)."""
        if not (0 <= src < self.num_blocks and 0 <= dst < self.num_blocks and 0 < rows <= self.block_size):
            raise ValueError(f"copy_rows: bad src={src}, dst={dst} or rows={rows} (num_blocks "
                             f"{self.num_blocks}, block_size {self.block_size})")
        for t in (*self.k, *self.v):
            t[dst, :rows].copy_(t[src, :rows])


class StepCache:
    """`past_key_values` for one packed forward (B = 1): writes the step's new K/V rows into the pool."""

    def __init__(self, pool: PagedKVPool, slots_L: torch.Tensor):
        self.pool = pool
        self.slots_L = slots_L

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # key_states (1, Hkv, L, D) after RoPE -> pool rows at this step's slots
        self.pool.write(layer_idx, self.slots_L, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1))
        return key_states, value_states
