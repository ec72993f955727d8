"""Paged KV pool for the rollout engine: fixed tensors, block tables owned by the scheduler.

Legend: NB blocks, BS rows per block (block_size), Hkv key/value heads, D head dim, L packed tokens.

Per layer, keys and values live in `(NB, BS, Hkv, D)`-shaped tensors allocated once (so memory is bounded by
construction: nothing grows with the number of rollouts). Two storage layouts, chosen by the backend that reads
them (`layout`):
- "k_transposed" (CPU, the C++ kernel's): K is stored `(NB, Hkv, D, BS)`, transposed within each block, so
  the BS scores of one query vector against a block are D broadcast-FMAs over contiguous BS-wide rows
  (csrc/cpu/paged_attention.cpp). `pool.k[layer]` is the `(NB, BS, Hkv, D)` permuted VIEW of that storage,
  so every torch reader (gather, copy_rows, the SDPA fallback, tests) keeps its meaning; V stays standard.
  `write` goes through C++ (`_C.paged_kv_write`): index_put on the strided view cost 3-8 ms for a
  4500-row step, measured.
- "standard" (flash-attn's paged KV on CUDA, and any device without the extension): both `(NB, BS, Hkv, D)`.
A sequence's KV is the concatenation of the rows of its blocks, in block-table order; row `p` of a sequence
is slot `block_ids[p // BS] * BS + p % BS`.
The scheduler (videocom_fast.rollout.scheduler) decides block tables; this module only moves tensors:

- `StepCache` is the duck-typed `past_key_values` handed to the model for one packed forward. transformers
  calls `update(key, value, layer_idx)` right after RoPE (FACTS.md); we scatter the new rows into the pool
  at the step's slot mapping and return them unchanged. The attention function then reads the pool.
- `copy_rows(src, dst, rows)` copies the partial last block of a group's prompt into a forked rollout's
  private block (prefix sharing: the full blocks are shared by reference count, only the tail is copied).
"""
from __future__ import annotations

import functools

import torch

LAYOUTS = ("k_transposed", "standard")


def default_layout(device, dtype) -> str:
    """The layout the attention backend for (device, dtype) reads: transposed K wherever the C++ kernel runs."""
    from .attention import cpp_available
    return "k_transposed" if cpp_available(device, dtype) else "standard"


class PagedKVPool:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 *, dtype=torch.float32, device="cpu", layout: str = "auto", fill: float | None = 0.0):
        if layout == "auto":
            layout = default_layout(device, dtype)
        if layout not in LAYOUTS:
            raise ValueError(f"PagedKVPool: layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
        if layout == "k_transposed" and (torch.device(device).type != "cpu"
                                         or dtype not in (torch.float32, torch.float64)):
            raise ValueError("PagedKVPool: layout 'k_transposed' is the CPU kernel's (float32/float64 on the CPU); "
                             f"use 'standard' for {dtype} on {torch.device(device).type}")
        for name, v in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PagedKVPool: {name} must be a positive int, got {v!r}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.layout = layout
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # `fill` None leaves the pool uninitialized: only for readers that never look past a sequence's
        # context (the C++ kernel). SDPA's decode path gathers whole blocks and masks them, and a NaN bit
        # pattern survives a mask. On the CPU a fill is the first touch of every page: 240 ms for 256 MiB
        make = torch.empty if fill is None else functools.partial(torch.full, fill_value=fill)
        # one tensor per K and V holding every layer (`copy_rows` is then one copy each), seen per layer
        if layout == "k_transposed":   # storage (NB, Hkv, D, BS), seen as (NB, BS, Hkv, D)
            self._k = make((num_layers, num_blocks, num_kv_heads, head_dim, block_size), dtype=dtype,
                           device=device).permute(0, 1, 4, 2, 3)
        else:
            self._k = make((num_layers, *shape), dtype=dtype, device=device)
        self._v = make((num_layers, *shape), dtype=dtype, device=device)
        self.k, self.v = list(self._k.unbind(0)), list(self._v.unbind(0))
        # numpy views of a pool the C++ kernels read (CPU, float32/float64), made once: they take them every layer
        # of every step
        cpp = torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float64)
        self.k_np = [t.numpy() for t in self.k] if cpp else None
        self.v_np = [t.numpy() for t in self.v] if cpp else None

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
        """Rows key_LHD, value_LHD (L, Hkv, D) at flat slots (L,) of `layer` (every layer of every step)."""
        if self.layout == "k_transposed":
            from videocom_fast import _C
            kp, vp = self.k[layer], self.v[layer]
            k, v = key_LHD.detach().to(kp.dtype), value_LHD.detach().to(vp.dtype)   # (no copy when equal)
            k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
            # the binding checks every slot against the pool (ValueError naming the index)
            _C.paged_kv_write(self.k_np[layer], self.v_np[layer], slots_L.to(torch.int64).contiguous().numpy(),
                              k.numpy(), v.numpy())
            return
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
        for t in (self._k, self._v):
            t[:, dst, :rows].copy_(t[:, src, :rows])


class StepCache:
    """`past_key_values` for one packed forward (B = 1): writes the step's new K/V rows into the pool."""

    def __init__(self, pool: PagedKVPool, slots_L: torch.Tensor):
        self.pool = pool
        self.slots_L = slots_L

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # key_states (1, Hkv, L, D) after RoPE -> pool rows at this step's slots
        self.pool.write(layer_idx, self.slots_L, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1))
        return key_states, value_states
