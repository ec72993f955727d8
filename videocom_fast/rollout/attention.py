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
- "triton": CUDA when flash-attn is not importable (the default there; any dtype). ONE Triton kernel per layer
  (kernels/paged_attention.py) serves every chunk of the step, reading the pool's blocks in place through
  int32 metadata on the device (tiles, per-chunk q_start / q_len / ctx, a padded block table): no host value
  sets a shape inside it. It is the `videocom::paged_attention_` op (a dispatch mode sees one op); on the
  CPU (the stand-in device's shadows) the op runs the SDPA reference below, or the kernel itself under
  TRITON_INTERPRET=1 (tests/test_paged_attention_triton.py).
Without `paged` metadata (training forwards of the same model) the call falls through to transformers'
own SDPA attention, so registering this function never changes any other forward.
"""
from __future__ import annotations

import inspect
import os
import warnings
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
LABELS = {"flash": "flash-paged", "cpp": "cpp", "sdpa": "sdpa", "triton": "triton-paged"}
BACKENDS = tuple(LABELS)


def reads_unwritten_rows(backend: str) -> bool:
    """Whether `backend` may read pool rows past a sequence's context, so that its pool must be initialized.
    The C++ kernel never does (tests/test_rollout.py poisons the pool with NaN), as long as every decode
    reaches it (CPP_MAX_QUERY_ROWS >= 1); SDPA's decode path gathers whole blocks under a mask, and a NaN
    survives a mask; flash-attn's paged path is not proven here. The Triton kernel masks every load at ctx
    (the same NaN test, under the interpreter)."""
    return not (backend == "triton" or backend == "cpp" and CPP_MAX_QUERY_ROWS >= 1)


@dataclass
class PagedBatch:
    """Per-step attention metadata (built once per step, read by every layer). Per chunk (lists or int64 numpy
    arrays): query start, length and context length; its block table from `block_tables` (a list per chunk) or
    `csr` = (table_off (C + 1,), table_ids): chunk i's table is table_ids[table_off[i]:table_off[i + 1]] (the
    engine step passes the scheduler's flat arrays so). Lists are turned into `csr`, which is what is read."""
    pool: object                      # kv_cache.PagedKVPool
    q_starts: list[int]               # offset of each chunk in the packed query
    q_lens: list[int]
    ctx_lens: list[int]               # start + n: the chunk's last row sees this many keys
    block_tables: list[list[int]] | None = None
    backend: str = "sdpa"             # "sdpa" | "flash" | "cpp"
    csr: tuple | None = None          # instead of block_tables
    _cache: dict = field(default_factory=dict)
    _views: dict | None = field(default=None, repr=False)   # device metadata (`bind` / `_device_arrays`)

    def __post_init__(self):
        if (self.block_tables is None) == (self.csr is None):
            raise ValueError("PagedBatch: give the block tables as block_tables or as csr (exactly one)")
        if self.csr is None:
            off = np.zeros(len(self.block_tables) + 1, dtype=np.int64)
            np.cumsum([len(t) for t in self.block_tables], out=off[1:])
            ids = np.fromiter(chain.from_iterable(self.block_tables), dtype=np.int64, count=int(off[-1]))
            self.csr = (off, ids)
        q = np.asarray(self.q_lens)
        short = q <= CPP_MAX_QUERY_ROWS if self.backend == "cpp" else np.zeros(len(q), dtype=bool)
        self.cpp_chunks = np.flatnonzero(short).tolist()
        # NOTE: chunks whose query is a single row at the end of their context are plain decodes
        self.decode_chunks = np.flatnonzero((q == 1) & ~short).tolist()
        self.prefill_chunks = np.flatnonzero((q != 1) & ~short).tolist()

    def table(self, i: int):
        """Chunk i's block table (a numpy view of the csr ids)."""
        off, ids = self.csr
        return ids[off[i]:off[i + 1]]

    def _decode_buckets(self) -> list[list[int]]:
        """Decode chunks grouped by similar context lengths (less padding to gather)."""
        bs = self.pool.block_size
        buckets, cur = [], []
        for i in sorted(self.decode_chunks, key=lambda i: self.ctx_lens[i]):
            # NOTE: a new bucket when padding to this length would waste over a quarter of the gather
            if cur and len(buckets) < 7 and self.ctx_lens[i] > 1.25 * self.ctx_lens[cur[0]] + bs:
                buckets.append(cur)
                cur = []
            cur.append(i)
        return buckets + [cur]

    def _host_layout(self) -> list[tuple[str, np.ndarray]]:
        """The device metadata of this batch's backend as named host arrays, in staging order: flash-attn's int32
        cu_seqlens_q/k and block table; SDPA's int64 query rows, context lengths and padded block table per decode
        bucket, then each prefill chunk's block ids. (The C++ kernel reads host arrays: none for its chunks.)"""
        if "layout" in self._cache:
            return self._cache["layout"]
        bs, out = self.pool.block_size, []
        nblk = lambda i: -(-self.ctx_lens[i] // bs)  # noqa: E731
        if self.backend == "flash":
            cu = np.zeros((2, len(self.q_lens) + 1), dtype=np.int32)
            np.cumsum(self.q_lens, out=cu[0, 1:])
            np.cumsum(self.ctx_lens, out=cu[1, 1:])
            out = [("cu_q", cu[0]), ("cu_k", cu[1]), ("table", self._padded_table())]   # padding: seqlen_k
        elif self.backend == "triton":
            out = self._triton_layout()
        else:   # SDPA: every chunk of that backend, and those the C++ backend leaves to it (CPP_MAX_QUERY_ROWS)
            for b, dec in enumerate(self._decode_buckets() if self.decode_chunks else ()):
                maxb = max(nblk(i) for i in dec)
                table = np.zeros((len(dec), maxb), dtype=np.int64)
                for r, i in enumerate(dec):
                    table[r, :nblk(i)] = self.table(i)[:nblk(i)]
                out += [(f"rows{b}", np.array([self.q_starts[i] for i in dec], dtype=np.int64)),
                        (f"ctx{b}", np.array([self.ctx_lens[i] for i in dec], dtype=np.int64)), (f"table{b}", table)]
            out += [(f"pre{i}", np.asarray(self.table(i)[:nblk(i)], dtype=np.int64))
                    for i in self.prefill_chunks]
        self._cache["layout"] = out
        return out

    def _triton_layout(self) -> list[tuple[str, np.ndarray]]:
        """int32 tiles (2, T): (chunk, first row) of every R rows of each chunk; cq (3, C): q_start, q_len,
        ctx; table (C, max blocks): each chunk's first ceil(ctx / BS) block ids, 0-padded (never read)."""
        from videocom_fast.kernels.paged_attention import tile_rows
        q, ctx = np.asarray(self.q_lens, dtype=np.int64), np.asarray(self.ctx_lens, dtype=np.int64)
        R = self._cache["rows_per_tile"] = tile_rows(int(q.max(initial=0)))
        per = -(-q // R)
        first = np.zeros(len(per), dtype=np.int64)
        np.cumsum(per[:-1], out=first[1:])
        chunk = np.repeat(np.arange(len(q)), per)
        tiles = np.stack([chunk, (np.arange(len(chunk)) - first[chunk]) * R]).astype(np.int32)
        cq = np.stack([np.asarray(self.q_starts, dtype=np.int64), q, ctx]).astype(np.int32)
        return [("tiles", tiles), ("cq", cq), ("table", self._padded_table())]

    def _padded_table(self) -> np.ndarray:
        """int32 (C, max blocks): each chunk's first ceil(ctx / BS) block ids, padded with block 0 (flash-attn
        and the Triton kernel bound their reads by the context, so the padding is never read)."""
        nb = -(-np.asarray(self.ctx_lens, dtype=np.int64) // self.pool.block_size)
        table = np.zeros((len(nb), int(nb.max(initial=1))), dtype=np.int32)
        off, ids = self.csr
        row = np.repeat(np.arange(len(nb)), nb)
        col = np.arange(int(nb.sum())) - np.repeat(np.cumsum(nb) - nb, nb)
        table[row, col] = ids[off[:-1][row] + col]
        return table

    def staged_size(self) -> int:
        """int64 slots the device metadata takes in the engine step's staging buffer (each array rounded up to
        whole 8-byte slots, so every device view starts 8-byte aligned)."""
        return sum(-(-a.nbytes // 8) for _, a in self._host_layout())

    def stage(self, buf: np.ndarray) -> None:
        """Write the device metadata into `buf` (int64, `staged_size()` slots of the step's staging buffer)."""
        o = 0
        for _, a in self._host_layout():
            n = -(-a.nbytes // 8)
            buf[o:o + n].view(np.uint8)[:a.nbytes] = a.reshape(-1).view(np.uint8)
            o += n

    def bind(self, dev: torch.Tensor) -> None:
        """Take the device metadata from `dev`, the uploaded copy of what `stage` wrote (int64, on the device):
        every device tensor the layers read is then a view of the step's one upload, none is copied per call."""
        views, o = {}, 0
        for name, a in self._host_layout():
            n = -(-a.nbytes // 8)
            t = dev[o:o + n]
            if a.dtype == np.int32:
                t = t.view(torch.int32)[:a.size]
            views[name] = t.view(a.shape)
            o += n
        self._views = views

    def _device_arrays(self, device) -> dict:
        """The device metadata: the views `bind` made, else one copy per array (callers outside the engine step)."""
        if self._views is None:
            self._views = {name: torch.from_numpy(a).to(device) for name, a in self._host_layout()}
        return self._views

    def decode_meta(self, device):
        """Per decode bucket: (query rows (n,), padded block table (n, maxb), key mask (n, 1, 1, S))."""
        if "dec" not in self._cache:
            d, out = self._device_arrays(device), []
            for b in range(len(self._decode_buckets())):
                table, ctx = d[f"table{b}"], d[f"ctx{b}"]
                S = table.shape[1] * self.pool.block_size
                mask = (torch.arange(S, device=table.device)[None, :] < ctx[:, None])[:, None, None, :]
                out.append((d[f"rows{b}"], table, mask))
            self._cache["dec"] = out
        return self._cache["dec"]

    def prefill_table(self, i: int, device) -> torch.Tensor:
        """Block ids (nb,) int64 on the device that prefill chunk i reads."""
        return self._device_arrays(device)[f"pre{i}"]

    def cpp_meta(self):
        """Chunk metadata as the C++ kernel takes it: int64 q_start/q_len/ctx_len/table_off, int32 tables."""
        if "cpp" not in self._cache:
            bs = self.pool.block_size
            idx = self.cpp_chunks
            every = len(idx) == len(self.q_lens)      # the usual case: the kernel serves every chunk
            pick = lambda xs: (np.asarray(xs, dtype=np.int64) if every  # noqa: E731
                               else np.array([xs[i] for i in idx], dtype=np.int64))
            ctx = pick(self.ctx_lens)
            nb = (ctx + bs - 1) // bs
            off = np.zeros(len(nb), dtype=np.int64)
            np.cumsum(nb[:-1], out=off[1:])
            src = self.csr[0][:-1] if every else self.csr[0][idx]   # the first nb[i] ids of each table
            tables = self.csr[1][np.arange(int(nb.sum())) + np.repeat(src - off, nb)].astype(np.int32)
            self._cache["cpp"] = (pick(self.q_starts), pick(self.q_lens), ctx, off, tables)
        return self._cache["cpp"]

    def triton_meta(self, device):
        """The Triton kernel's metadata on the device: (tiles, cq, table, rows per tile)."""
        d = self._device_arrays(device)
        return d["tiles"], d["cq"], d["table"], self._cache["rows_per_tile"]

    def flash_meta(self, device):
        """flash-attn's varlen metadata: int32 cu_seqlens_q/k (chunks + 1,), max lengths, and an int32 block
        table (chunks, max blocks) padded with block 0 (never read: seqlen_k bounds each row)."""
        d = self._device_arrays(device)
        return d["cu_q"], d["cu_k"], int(np.max(self.q_lens)), int(np.max(self.ctx_lens)), d["table"]


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


def pick_backend(choice: str, device, dtype, head_dim: int, block_size: int | None) -> str:
    """The backend RolloutEngine(attention=choice) runs: "auto" = flash-attn's paged path when it can serve
    (device, dtype, block_size or FLASH_BLOCK_SIZE), else the C++ kernel (CPU float32/float64), else the
    Triton kernel (CUDA), else SDPA; a named backend that cannot run is refused with the reason. "triton" on
    the CPU runs the op's SDPA reference (the kernel itself under TRITON_INTERPRET=1): the tests' path."""
    if choice != "auto" and choice not in BACKENDS:
        raise ValueError(f"RolloutEngine: attention must be 'auto' or one of {BACKENDS}, got {choice!r}")
    flash_why = flash_unavailable(block_size or FLASH_BLOCK_SIZE, device, dtype, head_dim)
    cpp_ok = cpp_available(device, dtype)
    if choice == "flash" and flash_why:
        raise ValueError(f"RolloutEngine: attention='flash' cannot run: {flash_why}")
    if choice == "cpp" and not cpp_ok:
        raise ValueError("RolloutEngine: attention='cpp' needs a CPU model in float32/float64 and the built "
                         "videocom_fast._C extension")
    if flash_why is None and choice in ("auto", "flash"):
        return "flash"
    if cpp_ok and choice in ("auto", "cpp"):
        return "cpp"
    on_cpu = torch.device(device).type == "cpu"
    if choice == "triton" and on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        warnings.warn("attention='triton' on the CPU runs the op's SDPA reference, a test path (the fast CPU "
                      "attention is 'cpp'; the Triton kernel runs on CUDA, or under TRITON_INTERPRET=1)",
                      stacklevel=3)
    return "triton" if choice == "triton" or choice == "auto" and triton_available(device) else "sdpa"


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
    if triton_available(device):
        return LABELS["triton"]
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


def paged_attention_ref(q, k_pool, v_pool, out, tiles, cq, table, scale, rows_per_tile=None) -> None:
    """What the Triton kernel computes (same arguments; `tiles` and `rows_per_tile` unused): per chunk, SDPA
    over its gathered blocks with the chunk's causal mask. Reads the metadata on the host: a reference."""
    BS, Hkv, D = k_pool.shape[1:]
    for c, (qs, n, ctx) in enumerate(zip(*cq.tolist())):
        if n == 0:
            continue
        idx = table[c, :-(-ctx // BS)].long()
        k, v = (p.index_select(0, idx).reshape(-1, Hkv, D)[:ctx].transpose(0, 1)[None].to(q.dtype)
                for p in (k_pool, v_pool))
        last = torch.arange(ctx - n, ctx, device=q.device)     # the last key each query row sees
        mask = torch.arange(ctx, device=q.device)[None, :] <= last[:, None]
        out[qs:qs + n] = _sdpa(q[qs:qs + n].transpose(0, 1)[None], k, v, mask, scale)[0].transpose(0, 1)


def _paged_attention_kernel(*args):
    from videocom_fast.kernels.paged_attention import paged_attention as kernel
    kernel(*args)


def _paged_attention_cpu(*args):
    # the kernel itself when interpreted (the tests), else the reference
    (_paged_attention_kernel if os.environ.get("TRITON_INTERPRET") == "1" else paged_attention_ref)(*args)


_lib = torch.library.Library("videocom", "FRAGMENT")
_lib.define("paged_attention_(Tensor q, Tensor k_pool, Tensor v_pool, Tensor(a!) out, Tensor tiles, "
            "Tensor cq, Tensor table, float scale, int rows_per_tile) -> ()")
_lib.impl("paged_attention_", _paged_attention_cpu, "CPU")
_lib.impl("paged_attention_", _paged_attention_kernel, "CUDA")
_lib.impl("paged_attention_", lambda *args: None, "Meta")


def triton_available(device) -> bool:
    """The Triton kernel serves CUDA tensors when triton is importable."""
    if torch.device(device).type != "cuda":
        return False
    from videocom_fast.kernels import paged_attention as K
    return K.triton is not None


def paged_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, paged=None,
                    **kwargs):
    """transformers attention function: query (1, Hq, L, D) -> (out (1, L, Hq, D), None)."""
    if paged is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    return attend(query[0].transpose(0, 1), module.layer_idx, paged, scaling)[None], None


def attend(q_LHD, layer: int, paged: PagedBatch, scaling=None, out=None) -> torch.Tensor:
    """Causal attention of the step's packed queries (L, Hq, D), after RoPE, to the pool's rows of `layer`
    (the step's own K/V already written there); returns (L, Hq, D), written into `out` when given (the C++
    and SDPA backends). Shared by the transformers hook above and the engine's packed forward (packed_forward.py)."""
    pool = paged.pool
    kp, vp = pool.k[layer], pool.v[layer]
    scaling = scaling if scaling is not None else q_LHD.shape[-1] ** -0.5
    if paged.backend == "flash":
        from flash_attn import flash_attn_varlen_func
        cu_q, cu_k, max_q, max_k, table = paged.flash_meta(q_LHD.device)
        q = q_LHD if q_LHD.stride(-1) == 1 else q_LHD.contiguous()
        return flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, max_q, max_k, softmax_scale=scaling, causal=True,
                                      block_table=table)
    out_LHD = out if out is not None else torch.empty(q_LHD.shape, dtype=q_LHD.dtype, device=q_LHD.device)
    if paged.backend == "triton":
        tiles, cq, table, rows = paged.triton_meta(q_LHD.device)
        torch.ops.videocom.paged_attention_(q_LHD, kp, vp, out_LHD, tiles, cq, table, scaling, rows)
        return out_LHD
    if paged.cpp_chunks:
        from videocom_fast import _C
        _C.paged_attention(q_LHD.numpy(), pool.k_np[layer], pool.v_np[layer], out_LHD.numpy(), *paged.cpp_meta(),
                           scaling)
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
        k, v = pool.gather(layer, paged.prefill_table(i, q_LHD.device), ctx)
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
