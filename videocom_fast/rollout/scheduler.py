"""Rollout scheduler: each engine step, which sequences run and how many tokens each computes.

Design note. The engine holds the model, the tokens and the KV tensors; the scheduler holds only counts and
block tables (after vLLM v1's `core/sched`, rewritten for Video-CoM's multi-turn rollouts). Two budgets bind
every step: `max_num_batched_tokens` (compute) and `num_blocks` KV blocks of `block_size` rows (memory).

    waiting -> prefill (chunked) -> decode -> awaiting observation -> prefill observation -> decode .. finished
                 ^------------ preempted: KV freed, recomputed from token 0 -------------'

A group (the G rollouts of one prompt) computes its prompt ONCE, in its leader. Followers sit in
"awaiting_fork" until the leader's prompt is in the KV; `fork_ready` then gives each follower the leader's
full prompt blocks (reference counts) plus a private copy of the last partial block (a block copy the engine
performs). This removes the reference's per-sample prompt re-prefill (spec section 8). A follower that
cannot fork (no free block, no seat, leader finished, engine skipped `fork_ready`) recomputes its prompt
itself, as does any preempted sequence: correctness never depends on sharing.

This file is the pure-Python twin of csrc/scheduler/ (videocom_fast._C.Scheduler). Both run the same
algorithm with the same block-allocation order, so their outputs are IDENTICAL step by step
(tests/test_scheduler.py simulates random rollouts on both). `make_scheduler(cfg, impl)` picks one:
"cpp", "python", or "auto" (C++ when built; env VIDEOCOM_SCHEDULER overrides "auto").

Engine contract, per step: out = schedule(); forward; update(seq_id, n) for each scheduled chunk; for each
chunk with `samples`, sample a token and append_tokens(seq_id, 1) (or await_observation / finish); after a
leader's prompt completes, fork_ready(group_id) BEFORE the next schedule().
"""
from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field

import numpy as np

# --- plain data crossing the boundary ------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048   # tokens computed per step (decodes + prefill chunks)
    max_num_seqs: int = 256              # sequences holding KV at once
    block_size: int = 16                 # KV rows per block
    num_blocks: int = 4096               # KV blocks in the pool
    max_prefill_chunk: int = 512         # largest prefill chunk of one sequence in one step


_CONFIG_FIELDS = ("max_num_batched_tokens", "max_num_seqs", "block_size", "num_blocks", "max_prefill_chunk")


@dataclass
class ScheduledSeq:
    seq_id: int
    start: int            # tokens already in the KV; this chunk computes rows [start, start + num_tokens)
    num_tokens: int
    is_prefill: bool      # False: a 1-token decode
    block_ids: list[int]  # the sequence's whole block table after allocation
    samples: bool         # the chunk reaches the last known token: sample the next one from its last row


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)  # KV freed this step; recomputed from 0 later
    finished: list[int] = field(default_factory=list)   # finished by the scheduler ("kv_budget") this step
    num_batched_tokens: int = 0


@dataclass
class ScheduleArrays:
    """One step as flat arrays (`schedule_arrays`). Legend: C scheduled chunks; the block tables concatenated
    in `table_ids`, chunk i's at table_ids[table_off[i]:table_off[i + 1]]."""
    seq_ids: np.ndarray      # (C,) int64
    starts: np.ndarray       # (C,) int64
    num_tokens: np.ndarray   # (C,) int64
    is_prefill: np.ndarray   # (C,) bool
    samples: np.ndarray      # (C,) bool
    table_off: np.ndarray    # (C + 1,) int64
    table_ids: np.ndarray    # (sum of table lengths,) int64
    preempted: list[int]
    finished: list[int]
    num_batched_tokens: int

    @classmethod
    def of(cls, out: SchedulerOutput) -> ScheduleArrays:
        sc = out.scheduled
        col = lambda f, dt=np.int64: np.array([f(c) for c in sc], dtype=dt)  # noqa: E731
        off = np.zeros(len(sc) + 1, dtype=np.int64)
        np.cumsum([len(c.block_ids) for c in sc], out=off[1:])
        ids = np.array([b for c in sc for b in c.block_ids], dtype=np.int64)
        return cls(col(lambda c: c.seq_id), col(lambda c: c.start), col(lambda c: c.num_tokens),
                   col(lambda c: c.is_prefill, bool), col(lambda c: c.samples, bool), off, ids,
                   list(out.preempted), list(out.finished), out.num_batched_tokens)


@dataclass
class Fork:
    child: int
    block_ids: list[int]
    copy_src: int   # engine copies rows [0, copy_rows) of block copy_src into copy_dst; -1: nothing to copy
    copy_dst: int
    copy_rows: int


# --- internal state ------------------------------------------------------------------------------------


class _Seq:
    __slots__ = ("seq_id", "group_id", "is_leader", "num_tokens", "num_computed", "block_ids", "resident",
                 "awaiting_obs", "awaiting_fork", "finished", "finish_reason", "sched_step", "sched_tokens",
                 "decode")

    def __init__(self, seq_id: int, group_id: int, num_tokens: int, is_leader: bool):
        self.seq_id, self.group_id, self.is_leader = seq_id, group_id, is_leader
        self.num_tokens = num_tokens     # known tokens (prompt + sampled + observations)
        self.num_computed = 0            # of which in the KV
        self.block_ids: list[int] = []
        self.resident = False            # holds KV (in `running`)
        self.awaiting_obs = False
        self.awaiting_fork = not is_leader
        self.finished = False
        self.finish_reason: str | None = None
        self.sched_step = -1             # step of the last schedule() that scheduled it
        self.sched_tokens = 0            # tokens scheduled then and not yet reported by update()
        self.decode = False              # its one pending token was just sampled (not a prompt remainder)


class _Group:
    __slots__ = ("group_id", "prompt_len", "leader", "pending")

    def __init__(self, group_id: int, prompt_len: int, leader: int, pending: list[int]):
        self.group_id, self.prompt_len, self.leader, self.pending = group_id, prompt_len, leader, pending


def _py_int(v):
    """numpy integers as Python ints (what the argument checks take); anything else as it is."""
    return int(v) if isinstance(v, np.integer) else v


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


class Scheduler:
    """Pure-Python scheduler (the twin of videocom_fast._C.Scheduler; same API, same outputs)."""

    def __init__(self, config: SchedulerConfig):
        for name in _CONFIG_FIELDS:
            _check_int(f"config.{name}", getattr(config, name), 1)
        self.config = config
        self._bs = config.block_size
        self._free: deque[int] = deque(range(config.num_blocks))  # FIFO: allocate left, release right
        self._ref = [0] * config.num_blocks
        self._seqs: list[_Seq] = []
        self._groups: dict[int, _Group] = {}
        self._forking: list[int] = []      # group ids with followers awaiting their fork, creation order
        self._running: list[int] = []      # resident seq ids in admission order (tail = most recent)
        self._waiting: deque[int] = deque()
        self._reserved = 0                 # seats held for followers of resident leaders
        self._step = 0
        self._limit_tokens = config.max_num_batched_tokens  # what the invariant check compares with
        self._limit_seqs = config.max_num_seqs
        self._stats = dict(num_steps=0, num_scheduled_tokens=0, num_prefill_tokens=0, num_decode_tokens=0,
                           num_preemptions=0, num_forks=0, num_fork_fallbacks=0, num_kv_budget_finishes=0)

    # --- public queries -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Sequences not holding KV and not finished (queued, preempted, or awaiting their fork)."""
        return sum(1 for s in self._seqs if not s.resident and not s.finished)

    def seq_state(self, seq_id: int) -> str:
        s = self._get(seq_id, "seq_state")
        if s.finished:
            return "finished"
        if s.awaiting_fork:
            return "awaiting_fork"
        if s.awaiting_obs:
            return "awaiting_observation"
        return "running" if s.resident else "waiting"

    def finish_reason(self, seq_id: int) -> str | None:
        return self._get(seq_id, "finish_reason").finish_reason

    def num_tokens(self, seq_id: int) -> int:
        return self._get(seq_id, "num_tokens").num_tokens

    def num_computed_tokens(self, seq_id: int) -> int:
        return self._get(seq_id, "num_computed_tokens").num_computed

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._get(seq_id, "block_table").block_ids)

    def block_ref_count(self, block_id: int) -> int:
        if isinstance(block_id, bool) or not isinstance(block_id, int) or not 0 <= block_id < len(self._ref):
            raise ValueError(f"block_ref_count: block_id {block_id!r} out of range [0, {len(self._ref)})")
        return self._ref[block_id]

    def stats(self) -> dict:
        return dict(self._stats, num_free_blocks=self.num_free_blocks, num_running=self.num_running,
                    num_waiting=self.num_waiting, num_finished=sum(1 for s in self._seqs if s.finished))

    # --- engine calls -----------------------------------------------------------------------------------

    def add_group(self, group_id: int, prompt_len: int, num_seqs: int) -> list[int]:
        _check_int("group_id", group_id, -(2**63))
        _check_int("prompt_len", prompt_len, 1)
        _check_int("num_seqs", num_seqs, 1)
        if group_id in self._groups:
            raise ValueError(f"add_group: duplicate group_id {group_id}")
        ids = list(range(len(self._seqs), len(self._seqs) + num_seqs))
        for i, sid in enumerate(ids):
            self._seqs.append(_Seq(sid, group_id, prompt_len, is_leader=(i == 0)))
        self._groups[group_id] = _Group(group_id, prompt_len, ids[0], ids[1:])
        if num_seqs > 1:
            self._forking.append(group_id)
        self._waiting.append(ids[0])
        return ids

    def update(self, seq_id: int, num_computed: int) -> None:
        s = self._get(seq_id, "update")
        _check_int("num_computed", num_computed, 1)
        if s.finished or s.sched_step != self._step or s.sched_tokens == 0:
            raise ValueError(f"update: seq {seq_id} has no chunk awaiting update from the last schedule()")
        if num_computed > s.sched_tokens:
            raise ValueError(f"update: num_computed={num_computed} > {s.sched_tokens} tokens scheduled for "
                             f"seq {seq_id} (pass the chunk's token count, not the total)")
        s.num_computed += num_computed
        s.sched_tokens = 0

    def fork_ready(self, group_id: int) -> list[Fork]:
        g = self._groups.get(group_id) if isinstance(group_id, int) else None
        if g is None:
            raise ValueError(f"fork_ready: unknown group_id {group_id!r}")
        if not g.pending:
            return []
        leader = self._seqs[g.leader]
        if leader.finished:
            self._release_followers(g)
            return []
        if not leader.resident or leader.num_computed < g.prompt_len:
            return []
        full, rows = divmod(g.prompt_len, self._bs)
        forks, fallback = [], []
        self._reserved -= len(g.pending)
        for cid in g.pending:
            child = self._seqs[cid]
            child.awaiting_fork = False
            if len(self._running) >= self.config.max_num_seqs or (rows and not self._free):
                fallback.append(cid)
                continue
            child.block_ids = leader.block_ids[:full]
            for b in child.block_ids:
                self._ref[b] += 1
            src = dst = -1
            if rows:
                src, dst = leader.block_ids[full], self._alloc()
                child.block_ids.append(dst)
            child.num_computed = g.prompt_len
            child.resident = True
            self._running.append(cid)
            forks.append(Fork(cid, list(child.block_ids), src, dst, rows if rows else -1))
        g.pending = []
        self._forking.remove(group_id)
        self._stats["num_forks"] += len(forks)
        self._stats["num_fork_fallbacks"] += len(fallback)
        self._waiting.extendleft(reversed(fallback))
        return forks

    def append_tokens(self, seq_id: int, n: int) -> None:
        s = self._get(seq_id, "append_tokens")
        _check_int("n", n, 1)
        self._check_live(s, "append_tokens")
        s.decode = n == 1 and s.num_tokens == s.num_computed  # a token sampled from its last computed row
        s.num_tokens += n
        s.awaiting_obs = False

    def append_one_each(self, seq_ids) -> None:
        """`append_tokens(seq_id, 1)` for each id (one call for a step's sampled tokens)."""
        if np.ndim(seq_ids) != 1:
            raise ValueError(f"append_one_each: seq_ids must be 1-d, got shape {np.shape(seq_ids)}")
        for sid in seq_ids:
            self.append_tokens(_py_int(sid), 1)

    def update_many(self, seq_ids, num_computed) -> None:
        """`update(seq_ids[i], num_computed[i])` for each i (one call for a step's chunks)."""
        if len(seq_ids) != len(num_computed):
            raise ValueError(f"update_many: {len(seq_ids)} seq_ids but {len(num_computed)} num_computed")
        for sid, n in zip(seq_ids, num_computed):
            self.update(_py_int(sid), _py_int(n))

    def schedule_arrays(self) -> ScheduleArrays:
        """`schedule()` as flat arrays (what the engine's step reads; the C++ twin: no object per chunk)."""
        return ScheduleArrays.of(self.schedule())

    def await_observation(self, seq_id: int) -> None:
        s = self._get(seq_id, "await_observation")
        self._check_live(s, "await_observation")
        s.awaiting_obs = True

    def finish(self, seq_id: int) -> None:
        s = self._get(seq_id, "finish")
        if not s.finished:
            self._finish(s, "finished")

    # --- the algorithm ----------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """One engine step.

        0. Followers whose leader finished, or whose leader's prompt is computed but was never forked, stop
           waiting for it and recompute their prompt themselves (so nothing waits forever).
        1. Decodes first (1 token each: the token the engine just sampled), running sequences in admission
           order: they keep moving.
        2. Prefill chunks of running sequences (observations, or a prompt mid-way), admission order, each at
           most max_prefill_chunk tokens and the remaining budget. A chunk short of KV blocks shrinks to the
           free rows; with no free row left it preempts the most recently admitted resident sequence not
           scheduled this step (possibly itself: then it waits) until it fits.
        3. Waiting sequences, FCFS (preempted ones at the front), while the budget lasts, a seat is free
           (a leader also needs seats for its followers) and its first chunk's blocks are free. Admission
           never preempts, and is skipped in a step that preempted (a victim would be re-admitted at once).
        A sequence whose known tokens need more blocks than the whole pool is finished ("kv_budget").
        Ends by checking the invariants (RuntimeError if broken).
        """
        self._step += 1
        out = SchedulerOutput()
        for gid in list(self._forking):
            g = self._groups[gid]
            leader = self._seqs[g.leader]
            if leader.finished or (leader.resident and leader.num_computed >= g.prompt_len):
                self._release_followers(g)
        budget = self.config.max_num_batched_tokens
        for decode_phase in (True, False):
            for sid in list(self._running):
                if budget == 0:
                    break
                s = self._seqs[sid]
                pending = s.num_tokens - s.num_computed
                if not s.resident or s.awaiting_obs or pending == 0:
                    continue
                is_decode = pending == 1 and s.decode
                if is_decode != decode_phase:
                    continue
                if self._too_big(s, out):
                    continue
                n = 1 if is_decode else min(pending, self.config.max_prefill_chunk, budget)
                n = self._make_room(s, n, shrink=not is_decode, out=out)
                if n:
                    budget -= self._schedule_chunk(s, n, not is_decode, out)
        i = 0
        while budget > 0 and not out.preempted and i < len(self._waiting):
            s = self._seqs[self._waiting[i]]
            if s.awaiting_obs:
                i += 1
                continue
            if self._too_big(s, out):  # removed from waiting; may have put followers at the front
                i = 0
                continue
            g = self._groups[s.group_id]
            seats = 1 + (len(g.pending) if s.is_leader else 0)
            if self._running and len(self._running) + self._reserved + seats > self.config.max_num_seqs:
                break
            n = min(s.num_tokens, self.config.max_prefill_chunk, budget)
            if self._blocks_for(n) > len(self._free):
                break
            del self._waiting[i]
            s.resident = True
            self._running.append(s.seq_id)
            self._reserved += seats - 1
            budget -= self._schedule_chunk(s, n, True, out)
        self._stats["num_steps"] += 1
        self._check_invariants(out)
        return out

    def _schedule_chunk(self, s: _Seq, n: int, is_prefill: bool, out: SchedulerOutput) -> int:
        start = s.num_computed
        for _ in range(self._blocks_for(start + n) - len(s.block_ids)):
            s.block_ids.append(self._alloc())
        out.scheduled.append(ScheduledSeq(s.seq_id, start, n, is_prefill, list(s.block_ids),
                                          start + n == s.num_tokens))
        out.num_batched_tokens += n
        s.sched_step, s.sched_tokens = self._step, n
        self._stats["num_scheduled_tokens"] += n
        self._stats["num_prefill_tokens" if is_prefill else "num_decode_tokens"] += n
        return n

    def _make_room(self, s: _Seq, n: int, shrink: bool, out: SchedulerOutput) -> int:
        """Tokens of `s` that fit after preempting as needed (0: `s` itself was preempted)."""
        while True:
            cap = (len(s.block_ids) + len(self._free)) * self._bs - s.num_computed
            if cap >= n:
                return n
            if shrink and cap >= 1:
                return cap
            victim = next(self._seqs[v] for v in reversed(self._running)
                          if self._seqs[v].sched_step != self._step)  # `s` itself always qualifies
            self._preempt(victim, out)
            if victim is s:
                return 0

    def _too_big(self, s: _Seq, out: SchedulerOutput) -> bool:
        if self._blocks_for(s.num_tokens) <= self.config.num_blocks:
            return False
        self._finish(s, "kv_budget")
        out.finished.append(s.seq_id)
        self._stats["num_kv_budget_finishes"] += 1
        return True

    # --- block and queue bookkeeping --------------------------------------------------------------------

    def _blocks_for(self, rows: int) -> int:
        return -(-rows // self._bs)

    def _alloc(self) -> int:
        b = self._free.popleft()
        self._ref[b] = 1
        return b

    def _free_blocks(self, s: _Seq) -> None:
        for b in s.block_ids:
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)
        s.block_ids = []

    def _evict(self, s: _Seq) -> None:
        """Drop `s`'s KV and its seat (and the seats its leader reserved)."""
        self._free_blocks(s)
        s.resident = False
        s.num_computed = 0
        s.decode = False
        self._running.remove(s.seq_id)
        if s.is_leader:
            self._reserved -= len(self._groups[s.group_id].pending)

    def _preempt(self, s: _Seq, out: SchedulerOutput) -> None:
        self._evict(s)
        self._waiting.appendleft(s.seq_id)
        out.preempted.append(s.seq_id)
        self._stats["num_preemptions"] += 1

    def _finish(self, s: _Seq, reason: str) -> None:
        if s.resident:
            self._evict(s)
        elif s.awaiting_fork:
            g = self._groups[s.group_id]
            g.pending.remove(s.seq_id)
            if self._seqs[g.leader].resident:
                self._reserved -= 1
            if not g.pending:
                self._forking.remove(g.group_id)
            s.awaiting_fork = False
        elif s.seq_id in self._waiting:
            self._waiting.remove(s.seq_id)
        s.finished, s.finish_reason, s.sched_tokens = True, reason, 0
        if s.is_leader and self._groups[s.group_id].pending:
            self._release_followers(self._groups[s.group_id])

    def _release_followers(self, g: _Group) -> None:
        """Followers stop waiting for the leader: each recomputes the prompt itself (front of the queue)."""
        if self._seqs[g.leader].resident:
            self._reserved -= len(g.pending)
        for cid in g.pending:
            self._seqs[cid].awaiting_fork = False
        self._waiting.extendleft(reversed(g.pending))
        self._stats["num_fork_fallbacks"] += len(g.pending)
        g.pending = []
        self._forking.remove(g.group_id)

    def _get(self, seq_id, what: str) -> _Seq:
        if isinstance(seq_id, bool) or not isinstance(seq_id, int) or not 0 <= seq_id < len(self._seqs):
            raise ValueError(f"{what}: unknown seq_id {seq_id!r}")
        return self._seqs[seq_id]

    def _check_live(self, s: _Seq, what: str) -> None:
        if s.finished:
            raise ValueError(f"{what}: seq {s.seq_id} is finished")
        if s.awaiting_fork:
            raise ValueError(f"{what}: seq {s.seq_id} is awaiting its fork (its first token comes with "
                             "fork_ready)")

    # --- invariants ---------------------------------------------------------------------------------------

    def _check_invariants(self, out: SchedulerOutput) -> None:
        def fail(msg: str):
            raise RuntimeError(f"scheduler invariant violated: {msg}")

        if out.num_batched_tokens > self._limit_tokens:
            fail(f"{out.num_batched_tokens} tokens scheduled > budget {self._limit_tokens}")
        if out.num_batched_tokens != sum(c.num_tokens for c in out.scheduled):
            fail("num_batched_tokens != sum of scheduled chunks")
        if len(self._running) > self._limit_seqs:
            fail(f"{len(self._running)} running > max_num_seqs {self._limit_seqs}")
        counts = [0] * len(self._ref)
        for sid in self._running:
            for b in self._seqs[sid].block_ids:
                counts[b] += 1
        if counts != self._ref:
            fail("block reference counts differ from the block tables")
        num_used = sum(1 for r in self._ref if r > 0)
        if num_used + len(self._free) != self.config.num_blocks or any(self._ref[b] for b in self._free):
            fail(f"free ({len(self._free)}) + used ({num_used}) != num_blocks ({self.config.num_blocks})")
        for c in out.scheduled:
            if len(self._seqs[c.seq_id].block_ids) * self._bs < c.start + c.num_tokens:
                fail(f"seq {c.seq_id}: block table too short for its chunk")

    def _corrupt_for_test(self, kind: str) -> None:
        """Test-only hook: break one piece of state so the next schedule() must raise."""
        if kind == "refcount":
            self._ref[0] += 1
        elif kind == "free_list":
            self._free.pop()
        elif kind == "budget":
            self._limit_tokens = 0
        elif kind == "max_num_seqs":
            self._limit_seqs = -1
        else:
            raise ValueError(f"_corrupt_for_test: unknown kind {kind!r}")


# --- dispatch -------------------------------------------------------------------------------------------


def cpp_available() -> bool:
    try:
        from .. import _C
    except ImportError:
        return False
    return hasattr(_C, "Scheduler")


def make_scheduler(config: SchedulerConfig | None = None, impl: str = "auto"):
    """The C++ scheduler ("cpp"), the Python twin ("python"), or "auto": env VIDEOCOM_SCHEDULER if set,
    else C++ when built."""
    config = config or SchedulerConfig()
    if impl == "auto":
        impl = os.environ.get("VIDEOCOM_SCHEDULER", "auto").strip().lower() or "auto"
        if impl == "auto":
            impl = "cpp" if cpp_available() else "python"
    if impl == "python":
        return Scheduler(config)
    if impl != "cpp":
        raise ValueError(f"make_scheduler: impl must be 'auto', 'cpp' or 'python', got {impl!r}")
    if not cpp_available():
        raise ImportError("make_scheduler(impl='cpp'): the C++ core (videocom_fast._C) has no Scheduler")
    from .. import _C
    c = _C.SchedulerConfig()
    for name in _CONFIG_FIELDS:
        setattr(c, name, getattr(config, name))
    return _C.Scheduler(c)


__all__ = ["SchedulerConfig", "ScheduledSeq", "SchedulerOutput", "ScheduleArrays", "Fork", "Scheduler",
           "make_scheduler", "cpp_available"]
