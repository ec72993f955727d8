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
- "flash" (reported as "flash-paged"): CUDA, fp16/bf16, flash-attn importable with a `block_table` argument.
  ONE `flash_attn_varlen_func(q, k_pool, v_pool, cu_seqlens_q, cu_seqlens_k, ..., causal=True,
  block_table=...)` per layer serves every chunk of the step, reading the pool's blocks in place. FA2's paged
  path takes only pages that are a multiple of 256 rows (flash_api.cpp: "Paged KV cache block size must be
  divisible by 256"), so the engine picks `FLASH_BLOCK_SIZE` blocks when this backend will run. Its causal
  mask is aligned to the bottom right (query row i of n sees keys j <= seqlen_k - n + i), which is exactly
  "row i of a chunk starting at `start` sees keys <= start + i" with seqlen_k = start + n.
  flash-attn cannot be installed on the CPU machines this project is built on: tests/test_flash_paged.py
  runs this path through a fake `flash_attn` module that checks the arguments as flash_api.cpp does
  (dtypes, shapes, contiguity, int32 tables and cu_seqlens, page size) and computes a plain reference.
Without `paged` metadata (training forwards of the same model) the call falls through to transformers'
own SDPA attention, so registering this function never changes any other forward.
"""
from __future__ import annotations

import inspect
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
FLASH_BLOCK_SIZE = 256              # the smallest page FA2's paged varlen path accepts
# device types the flash path may run on: CUDA only; tests add "cpu" to run it through a fake flash_attn
FLASH_DEVICE_TYPES = ("cuda",)
# what stats / build_info call each backend
LABELS = {"flash": "flash-paged", "cpp": "cpp", "sdpa": "sdpa"}


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
        """flash-attn's varlen metadata: int32 cu_seqlens_q/k (chunks + 1,), max lengths, and an int32 block
        table (chunks, max blocks) padded with block 0 (never read: seqlen_k bounds each row). Built on the
        host, then one copy per tensor to the device."""
        if "flash" not in self._cache:
            bs = self.pool.block_size
            nb = [-(-c // bs) for c in self.ctx_lens]
            cu = np.zeros((2, len(nb) + 1), dtype=np.int32)
            np.cumsum(self.q_lens, out=cu[0, 1:])
            np.cumsum(self.ctx_lens, out=cu[1, 1:])
            table = np.zeros((len(nb), max(nb)), dtype=np.int32)
            for r, (t, k) in enumerate(zip(self.block_tables, nb)):
                table[r, :k] = t[:k]
            cu_t = torch.from_numpy(cu).to(device)
            self._cache["flash"] = (cu_t[0], cu_t[1], max(self.q_lens), max(self.ctx_lens),
                                    torch.from_numpy(table).to(device))
        return self._cache["flash"]


def flash_unavailable(block_size: int, device, dtype, head_dim: int) -> str | None:
    """None when flash-attn's paged varlen path can serve a pool of `block_size` rows of `dtype` on
    `device`, else the reason it cannot (for error messages and build_info)."""
    if torch.device(device).type not in FLASH_DEVICE_TYPES:
        return f"flash-attn runs on CUDA (device {torch.device(device).type})"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes fp16/bf16 (dtype {dtype})"
    if head_dim > 256:
        return f"flash-attn takes head_dim <= 256 (head_dim {head_dim})"
    if block_size % 256:
        return f"flash-attn's paged KV needs block_size % 256 == 0 (block_size {block_size})"
    try:
        import flash_attn
    except ImportError:
        return "flash_attn is not importable"
    fn = getattr(flash_attn, "flash_attn_varlen_func", None)
    if fn is None or "block_table" not in inspect.signature(fn).parameters:
        return "this flash_attn has no flash_attn_varlen_func(..., block_table=...) (flash-attn >= 2.5.6)"
    return None


def flash_available(block_size: int, device, dtype=torch.bfloat16, head_dim: int = 128) -> bool:
    return flash_unavailable(block_size, device, dtype, head_dim) is None


def auto_label(device=None, dtype=None, head_dim: int = 128) -> str:
    """What attention="auto" runs for a model on `device` in `dtype` (default: CUDA in bf16 when a GPU is
    visible, else the CPU in float32), as stats and build_info name it."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if flash_unavailable(FLASH_BLOCK_SIZE, device, dtype, head_dim) is None:
        return LABELS["flash"]
    return LABELS["cpp"] if cpp_available(device, dtype) else LABELS["sdpa"]


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
        q = q_LHD if q_LHD.stride(-1) == 1 else q_LHD.contiguous()
        return flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, max_q, max_k, softmax_scale=scaling, causal=True,
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
