"""Paged attention for the engine's packed forward, registered with transformers' AttentionInterface.

Legend: L packed query tokens (B = 1), Hq query heads, Hkv key/value heads, D head dim, S key rows,
Nd decode sequences, NB/BS pool blocks/rows.

One engine step runs ONE forward over all scheduled tokens concatenated (decodes of some sequences,
prefill chunks of others). transformers gives this function `query (1, Hq, L, D)` after RoPE; the new
K/V rows were already written to the pool by `kv_cache.StepCache.update`. Each chunk then attends to its
own sequence's rows [0, start + n) read through its block table, causally:
query row i of a chunk starting at `start` sees key rows j <= start + i.

Backends (one code path in the engine, chosen here):
- CPU, float32/float64 (default there): `videocom_fast._C.paged_attention`, a C++ kernel that reads the
  blocks in place (csrc/cpu/paged_attention.cpp): every decode and prefill chunk of the step, of any length,
  in one call per layer, with no gather of K/V. It reads K transposed within blocks (the pool's layout
  "k_transposed", kv_cache.py) and tiles query rows so each K/V block loaded serves many query vectors.
- `sdpa` (other dtypes/devices, or VIDEOCOM_ATTENTION=sdpa): decodes are batched into one SDPA call (block tables padded, key-length mask);
  each prefill chunk is one SDPA call on its gathered blocks (no mask when it starts at row 0).
- CUDA with flash-attn importable and a block size that flash-attn's paged KV accepts (multiple of 256):
  `flash_attn_varlen_func` with `block_table` reads the pool directly. Not exercised on this CPU machine.
Without `paged` metadata (training forwards of the same model) the call falls through to transformers'
own SDPA attention, so registering this function never changes any other forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F

ATTENTION_NAME = "videocom_paged"
# Chunks of up to this many query rows go to the C++ kernel (backend "cpp"): all of them. Measured (one chunk,
# gather + SDPA vs the kernel, fp32, BS 16, ratio = SDPA time / kernel time; 2-core CPU):
#   Hq 4, Hkv 2, D 32    1 thread             2 threads
#     keys               200   1000  4000     200   1000  4000
#     32 rows            3.3   3.0   2.7      5.9   4.4   6.2
#     128 rows           2.8   2.5   2.6      4.6   3.3   4.3
#     512 rows           -     2.9   2.1      -     3.1   2.7
#   Hq 28, Hkv 4, D 128, 2 threads: 32 rows 2.8 / 3.6 / 3.7, 128 rows 3.2 / 2.6 / 2.7, 512 rows - / 3.4 / 2.2
# so no chunk length is better served by SDPA; the limit stays as a knob for tests and benches.
CPP_MAX_QUERY_ROWS = 1 << 30


@dataclass
class PagedBatch:
    """Per-step attention metadata (built once per step, read by every layer)."""
    pool: object                      # kv_cache.PagedKVPool
    q_starts: list[int]               # offset of each chunk in the packed query
    q_lens: list[int]
    ctx_lens: list[int]               # start + n: the chunk's last row sees this many keys
    block_tables: list[list[int]]
    backend: str = "sdpa"             # "sdpa" | "flash" | "cpp"
    _cache: dict = field(default_factory=dict)

    def __post_init__(self):
        n = range(len(self.q_lens))
        self.cpp_chunks = [i for i in n if self.q_lens[i] <= CPP_MAX_QUERY_ROWS] if self.backend == "cpp" else []
        short = set(self.cpp_chunks)
        # NOTE: chunks whose query is a single row at the end of their context are plain decodes
        self.decode_chunks = [i for i in n if self.q_lens[i] == 1 and i not in short]
        self.prefill_chunks = [i for i in n if self.q_lens[i] != 1 and i not in short]

    def decode_meta(self, device):
        """Buckets of decodes with similar context lengths (less padding to gather): per bucket
        (query rows (n,), padded block table (n, maxb), key mask (n, 1, 1, S))."""
        if "dec" not in self._cache:
            bs = self.pool.block_size
            order = sorted(self.decode_chunks, key=lambda i: self.ctx_lens[i])
            buckets, cur = [], []
            for i in order:
                # NOTE: a new bucket when padding to this length would waste over a quarter of the gather
                if cur and len(buckets) < 7 and self.ctx_lens[i] > 1.25 * self.ctx_lens[cur[0]] + bs:
                    buckets.append(cur)
                    cur = []
                cur.append(i)
            buckets.append(cur)
            out = []
            for dec in buckets:
                rows = torch.tensor([self.q_starts[i] for i in dec], device=device)
                ctx = torch.tensor([self.ctx_lens[i] for i in dec], device=device)
                maxb = -(-max(self.ctx_lens[i] for i in dec) // bs)
                # one tensor from padded lists (a per-row torch.as_tensor cost ~40 us each)
                table = torch.tensor([list(self.block_tables[i][:nb]) + [0] * (maxb - nb)
                                      for i in dec for nb in (-(-self.ctx_lens[i] // bs),)], dtype=torch.long)
                mask = (torch.arange(maxb * bs, device=device)[None, :] < ctx[:, None])[:, None, None, :]
                out.append((rows, table.to(device), mask))
            self._cache["dec"] = out
        return self._cache["dec"]

    def cpp_meta(self):
        """Chunk metadata as the C++ kernel takes it: int64 q_start/q_len/ctx_len/table_off, int32 tables."""
        if "cpp" not in self._cache:
            bs = self.pool.block_size
            idx = self.cpp_chunks
            nb = [-(-self.ctx_lens[i] // bs) for i in idx]
            tables = np.array(list(chain.from_iterable(self.block_tables[i][:k] for i, k in zip(idx, nb))),
                              dtype=np.int32)
            off = np.zeros(len(nb), dtype=np.int64)
            np.cumsum(nb[:-1], out=off[1:])
            pick = lambda xs: np.fromiter((xs[i] for i in idx), dtype=np.int64, count=len(idx))  # noqa: E731
            self._cache["cpp"] = (pick(self.q_starts), pick(self.q_lens), pick(self.ctx_lens), off, tables)
        return self._cache["cpp"]

    def flash_meta(self, device):
        if "flash" not in self._cache:
            cu_q = torch.tensor([0, *torch.tensor(self.q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
            cu_k = torch.tensor([0, *torch.tensor(self.ctx_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
            maxb = max(len(t) for t in self.block_tables)
            table = torch.zeros(len(self.block_tables), maxb, dtype=torch.int32)
            for r, t in enumerate(self.block_tables):
                table[r, :len(t)] = torch.as_tensor(t)
            self._cache["flash"] = (cu_q, cu_k, max(self.q_lens), max(self.ctx_lens), table.to(device))
        return self._cache["flash"]


def flash_available(block_size: int, device) -> bool:
    if torch.device(device).type != "cuda" or block_size % 256:
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def cpp_available(device, dtype) -> bool:
    """The C++ paged kernel serves CPU tensors of float32/float64 when the extension is built."""
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.float64):
        return False
    try:
        from videocom_fast import _C
    except ImportError:
        return False
    return hasattr(_C, "paged_attention")


def _sdpa(q, k, v, mask, scaling, causal=False):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scaling,
                                          enable_gqa=q.shape[-3] != k.shape[-3])


def paged_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, paged=None,
                    **kwargs):
    """transformers attention function: query (1, Hq, L, D) -> (out (1, L, Hq, D), None)."""
    if paged is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    return attend(query[0].transpose(0, 1), module.layer_idx, paged, scaling)[None], None


def attend(q_LHD, layer: int, paged: PagedBatch, scaling=None) -> torch.Tensor:
    """Causal attention of the step's packed queries (L, Hq, D), after RoPE, to the pool's rows of `layer`
    (the step's own K/V already written there); returns (L, Hq, D). Shared by the transformers hook above
    and the engine's packed forward (packed_forward.py)."""
    pool = paged.pool
    kp, vp = pool.k[layer], pool.v[layer]
    scaling = scaling if scaling is not None else q_LHD.shape[-1] ** -0.5
    if paged.backend == "flash":
        from flash_attn import flash_attn_varlen_func
        cu_q, cu_k, max_q, max_k, table = paged.flash_meta(q_LHD.device)
        return flash_attn_varlen_func(q_LHD, kp, vp, cu_q, cu_k, max_q, max_k, softmax_scale=scaling, causal=True,
                                      block_table=table)
    out_LHD = torch.empty(q_LHD.shape, dtype=q_LHD.dtype, device=q_LHD.device)
    if paged.cpp_chunks:
        from videocom_fast import _C
        _C.paged_attention(q_LHD.numpy(), kp.numpy(), vp.numpy(), out_LHD.numpy(), *paged.cpp_meta(), scaling)
    for rows, table, mask in (paged.decode_meta(q_LHD.device) if paged.decode_chunks else ()):
        Nd, maxb = table.shape
        # index_select of whole blocks on the flat table: ~4x faster than advanced indexing kp[table] on CPU
        flat = table.view(-1)
        k = kp.index_select(0, flat).reshape(Nd, maxb * pool.block_size, pool.num_kv_heads, pool.head_dim).transpose(1, 2)
        v = vp.index_select(0, flat).reshape(Nd, maxb * pool.block_size, pool.num_kv_heads, pool.head_dim).transpose(1, 2)
        # GQA folded into the query-length axis: the g = Hq / Hkv query heads that share a kv head become g
        # query rows of it (head h -> kv head h // g, as repeat_kv), so K/V are never expanded to Hq heads
        g = q_LHD.shape[1] // pool.num_kv_heads
        q = q_LHD.index_select(0, rows).view(Nd, pool.num_kv_heads, g, pool.head_dim)
        o = _sdpa(q, k.to(q.dtype), v.to(q.dtype), mask, scaling)  # (Nd, Hkv, g, D)
        out_LHD.index_copy_(0, rows, o.reshape(Nd, q_LHD.shape[1], pool.head_dim))
    for i in paged.prefill_chunks:
        qs, n, ctx = paged.q_starts[i], paged.q_lens[i], paged.ctx_lens[i]
        k, v = pool.gather(layer, paged.block_tables[i][:-(-ctx // pool.block_size)], ctx)
        q = q_LHD[qs:qs + n].transpose(0, 1)[None]          # (1, Hq, n, D)
        k, v = k.transpose(0, 1)[None].to(q.dtype), v.transpose(0, 1)[None].to(q.dtype)
        if ctx == n:
            o = _sdpa(q, k, v, None, scaling, causal=True)
        else:  # a later chunk: rows [ctx - n, ctx) see keys up to themselves
            mask = torch.arange(ctx, device=q.device)[None, :] <= torch.arange(ctx - n, ctx, device=q.device)[:, None]
            o = _sdpa(q, k, v, mask, scaling)
        out_LHD[qs:qs + n] = o[0].transpose(0, 1)
    return out_LHD


_registered = False


def register() -> str:
    """Register `paged_attention` with transformers (idempotent); returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        AttentionInterface.register(ATTENTION_NAME, paged_attention)
        _registered = True
    return ATTENTION_NAME
