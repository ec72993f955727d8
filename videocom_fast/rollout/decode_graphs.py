"""CUDA graphs for the engine's decode-only steps (issue 16): one launch per step instead of ~10 per layer.

A decode-only step padded to its batch bucket (`EngineStep.decode_bucket`: B rows, its padded rows decode into
a scratch block) has a fixed shape, and with the Triton paged attention (kernels/paged_attention.py) nothing
the forward does depends on a host value: the step's ids, positions, KV slots, attention tiles, chunk lengths
and block table are device tensors. So the forward (embedding -> packed text forward over the B rows; the
lm_head runs after it, on the sampled rows) is captured once per (B, table width W) into a graph that reads
STATIC buffers; each step copies its values into them (device to device) and replays. W is the step's
block-table width rounded up to a power of two (>= 8): columns past a row's context are never read, so a
narrower table is copied into the first columns.

A captured graph holds the addresses of everything it read: the KV pool and the fused weights, which the
engine allocates per `generate`, so graphs live for one `generate` (`RolloutEngine` drops them at its end).

`record_capture` is a CUDA graph's contract on any device, for the tests: the forward's dispatched ops are
recorded once (with their tensors and their Python arguments, as a graph bakes them), and a replay re-runs
exactly those ops on those tensors, writing each result back where the recording put it. A forward that read a
host value, took a Python branch on step data, or called a kernel the dispatcher does not see (the CPU's
direct C++ calls) replays wrong or stale values, and tests/test_decode_graphs.py sees different tokens.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _StaticMeta:
    """What `attention.attend` reads of a captured step: the Triton kernel's metadata as static tensors."""
    backend = "triton"

    def __init__(self, pool, tiles, cq, table):
        self.pool, self._meta = pool, (tiles, cq, table)

    def triton_meta(self, device):
        return (*self._meta, 1)       # decode-only: one query row per tile


class _Graph:
    """One captured (B, W): its static inputs, its output (B, D) hidden states and its replay."""

    def __init__(self, B: int, W: int, device):
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.ids, self.pos, self.slots = (torch.zeros(*s, **i64) for s in ((B,), (3, B), (B,)))
        self.tiles, self.cq, self.table = (torch.zeros(*s, **i32) for s in ((2, B), (3, B), (B, W)))
        self.out, self.replay = None, None

    def load(self, ids, pos, slots, tiles, cq, table) -> None:
        pairs = (self.ids, ids), (self.pos, pos), (self.slots, slots), (self.tiles, tiles), (self.cq, cq)
        for dst, src in pairs:
            dst.copy_(src, non_blocking=True)
        self.table[:, :table.shape[1]].copy_(table, non_blocking=True)


def table_width(blocks: int) -> int:
    return max(8, 1 << max(0, (blocks - 1).bit_length()))


class DecodeGraphs:
    """`run(ids, pos, slots, meta)` -> (B, D): the captured forward of a padded decode-only step.
    `forward(ids, pos, slots, meta)` is the engine's model work on the static buffers; `capture(fn)` ->
    (replay, output): `cuda_capture` on CUDA, `record_capture` elsewhere (tests)."""

    def __init__(self, forward, pool, capture=None):
        self.forward, self.pool = forward, pool
        if capture is None:     # one memory pool for all: a replay's output is read before the next replay
            handle = torch.cuda.graph_pool_handle()
            capture = lambda fn: cuda_capture(fn, handle)  # noqa: E731
        self.capture = capture
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.captures = self.replays = 0

    def run(self, ids, pos, slots, meta) -> torch.Tensor:
        tiles, cq, table, rows = meta.triton_meta(ids.device)
        if rows != 1 or tiles.shape[1] != ids.shape[0]:
            raise ValueError(f"DecodeGraphs: a decode-only step has one row per tile, got {rows} rows per "
                             f"tile, {tiles.shape[1]} tiles for {ids.shape[0]} rows")
        key = (ids.shape[0], table_width(table.shape[1]))
        g = self.graphs.get(key)
        if g is None:
            g = _Graph(*key, ids.device)
            g.load(ids, pos, slots, tiles, cq, table)
            meta = _StaticMeta(self.pool, g.tiles, g.cq, g.table)
            g.replay, g.out = self.capture(lambda: self.forward(g.ids, g.pos, g.slots, meta))
            self.graphs[key] = g
            self.captures += 1
        else:
            g.load(ids, pos, slots, tiles, cq, table)
        g.replay()
        self.replays += 1
        return g.out


def cuda_capture(fn, pool=None):
    """torch.cuda.CUDAGraph of fn() after one eager warm-up on a side stream (Triton compiles, cuBLAS picks
    its kernels, the allocator settles), as torch's docs prescribe. The warm-up writes the step's K/V rows,
    which the replay writes again with the same values."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the engine's workers may run CUDA work of their own (decoding, preprocessing) meanwhile
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = fn()
    return graph.replay, out


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata     # the StorageImpl's identity (meta tensors all have data_ptr 0)


def _write_back(recorded, new) -> None:
    if isinstance(recorded, torch.Tensor):
        if _storage(recorded) != _storage(new):    # in-place / out= ops and views wrote (or alias) it
            recorded.copy_(new)
    elif isinstance(recorded, (tuple, list)):
        for r, n in zip(recorded, new):
            _write_back(r, n)


def record_capture(fn):
    """A graph's semantics without CUDA (see the module docstring): (replay, the recorded output)."""
    with _Recorder() as rec:
        out = fn()

    def replay():
        for func, args, kwargs, recorded in rec.ops:
            _write_back(recorded, func(*args, **kwargs))
    return replay, out
