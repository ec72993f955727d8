"""Rollout scheduler: budgets, chunked prefill, decode-first, prefix sharing, preemption, KV-budget finishes,
invariant checks, and a randomized rollout simulation in which the C++ and Python twins must agree step by
step while a fake KV cache proves every chunk attends to exactly its own tokens.

No model: small factories (after vLLM's tests/v1/core) build a scheduler and groups; the assertions are on
the output structs. Every test runs on both implementations ("cpp" is skipped if the extension is not built).
"""
from __future__ import annotations

import os
import random

import numpy as np
import pytest

from videocom_fast.rollout.scheduler import SchedulerConfig, cpp_available, make_scheduler

IMPLS = ["python", pytest.param("cpp", marks=pytest.mark.skipif(not cpp_available(), reason="_C not built"))]


# --- factories -----------------------------------------------------------------------------------------


def create_scheduler(impl: str, **overrides):
    base = dict(max_num_batched_tokens=64, max_num_seqs=16, block_size=4, num_blocks=64, max_prefill_chunk=16)
    return make_scheduler(SchedulerConfig(**{**base, **overrides}), impl=impl)


def create_group(s, group_id: int, prompt_len: int, num_seqs: int = 1) -> list[int]:
    return list(s.add_group(group_id, prompt_len, num_seqs))


def chunks(out) -> list[tuple]:
    """An output as plain tuples (the two twins return different classes with the same fields), from
    `schedule()` or from `schedule_arrays()` (its flat arrays read back chunk by chunk)."""
    if not hasattr(out, "scheduled"):
        o = out.table_off
        assert o.dtype == out.seq_ids.dtype == out.starts.dtype == out.num_tokens.dtype == np.int64
        assert out.is_prefill.dtype == out.samples.dtype == bool and o[0] == 0 and o[-1] == len(out.table_ids)
        return [(int(out.seq_ids[i]), int(out.starts[i]), int(out.num_tokens[i]), bool(out.is_prefill[i]),
                 out.table_ids[o[i]:o[i + 1]].tolist(), bool(out.samples[i]))
                for i in range(len(out.seq_ids))]
    return [(c.seq_id, c.start, c.num_tokens, bool(c.is_prefill), list(c.block_ids), bool(c.samples))
            for c in out.scheduled]


def step(s, *, sample: bool = True) -> list[tuple]:
    """Schedule, report every chunk computed, append one sampled token where the engine samples."""
    out = s.schedule()
    for c in out.scheduled:
        s.update(c.seq_id, c.num_tokens)
        if sample and c.samples:
            s.append_tokens(c.seq_id, 1)
    return chunks(out)


# --- validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("field", ["max_num_batched_tokens", "max_num_seqs", "block_size", "num_blocks",
                                   "max_prefill_chunk"])
def test_config_below_one_is_a_value_error_naming_the_field(impl, field):
    with pytest.raises(ValueError, match=field):
        create_scheduler(impl, **{field: random.choice([0, -3])})


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments_are_value_errors_naming_them(impl):
    s = create_scheduler(impl)
    ids = create_group(s, 5, 9, 2)
    with pytest.raises(ValueError, match="duplicate group_id 5"):
        s.add_group(5, 3, 1)
    with pytest.raises(ValueError, match="prompt_len"):
        s.add_group(6, 0, 1)
    with pytest.raises(ValueError, match="num_seqs"):
        s.add_group(7, 4, 0)
    with pytest.raises(ValueError, match="unknown seq_id 99"):
        s.append_tokens(99, 1)
    with pytest.raises(ValueError, match="unknown seq_id 99"):
        s.append_one_each([99])
    with pytest.raises(ValueError, match="unknown seq_id -1"):
        s.seq_state(-1)
    with pytest.raises(ValueError, match="n must be >= 1"):
        s.append_tokens(ids[0], -2)
    with pytest.raises(ValueError, match="awaiting its fork"):
        s.append_tokens(ids[1], 1)
    with pytest.raises(ValueError, match="unknown group_id 8"):
        s.fork_ready(8)
    with pytest.raises(ValueError, match="no chunk awaiting update"):
        s.update(ids[0], 1)
    out = s.schedule()
    with pytest.raises(ValueError, match="num_computed"):
        s.update(ids[0], out.scheduled[0].num_tokens + 1)
    with pytest.raises(ValueError, match="num_computed must be >= 1"):
        s.update(ids[0], -1)
    s.update(ids[0], out.scheduled[0].num_tokens)
    with pytest.raises(ValueError, match="no chunk awaiting update"):
        s.update(ids[0], 1)  # twice
    s.finish(ids[0])
    with pytest.raises(ValueError, match="is finished"):
        s.append_tokens(ids[0], 1)
    with pytest.raises(ValueError, match="block_id"):
        s.block_ref_count(64)


def test_make_scheduler_dispatch(monkeypatch):
    from videocom_fast.rollout.scheduler import Scheduler
    monkeypatch.setenv("VIDEOCOM_SCHEDULER", "python")
    assert isinstance(make_scheduler(SchedulerConfig(), impl="auto"), Scheduler)
    monkeypatch.delenv("VIDEOCOM_SCHEDULER")
    auto = make_scheduler(SchedulerConfig(), impl="auto")
    assert isinstance(auto, Scheduler) != cpp_available()  # C++ whenever it is built
    with pytest.raises(ValueError, match="impl"):
        make_scheduler(SchedulerConfig(), impl="rust")


@pytest.mark.parametrize("impl", IMPLS)
def test_partial_update_leaves_the_rest_pending(impl):
    s = create_scheduler(impl, max_prefill_chunk=64)
    prompt = random.randint(10, 60)
    sid = create_group(s, 0, prompt)[0]
    c = s.schedule().scheduled[0]
    done = random.randint(1, prompt - 1)
    s.update(sid, done)
    c = s.schedule().scheduled[0]
    assert (c.start, c.num_tokens, c.samples) == (done, prompt - done, True)


# --- budgets, chunking, order ------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_chunked_prefill_respects_token_budget_and_chunk_size(impl):
    budget, chunk = 37, 16
    s = create_scheduler(impl, max_num_batched_tokens=budget, max_prefill_chunk=chunk, num_blocks=256)
    prompts = [random.randint(20, 70) for _ in range(4)]
    ids = [create_group(s, g, p)[0] for g, p in enumerate(prompts)]
    computed = dict.fromkeys(ids, 0)
    for _ in range(50):
        # greedy fill: every sequence gets min(pending, chunk) until the budget runs out
        expected = min(budget, sum(min(p - computed[i], chunk) for i, p in zip(ids, prompts)))
        out = s.schedule()
        assert out.num_batched_tokens == sum(c.num_tokens for c in out.scheduled) == expected
        for c in out.scheduled:
            assert c.is_prefill and 1 <= c.num_tokens <= chunk
            assert c.start == computed[c.seq_id]
            assert c.samples == (c.start + c.num_tokens == prompts[ids.index(c.seq_id)])
            computed[c.seq_id] += c.num_tokens
            s.update(c.seq_id, c.num_tokens)
        if all(computed[i] == p for i, p in zip(ids, prompts)):
            break
    assert [computed[i] for i in ids] == prompts
    assert s.schedule().num_batched_tokens == 0  # nothing pending until a token is appended


@pytest.mark.parametrize("impl", IMPLS)
def test_decodes_come_first_then_prefill_gets_the_rest(impl):
    s = create_scheduler(impl, max_num_batched_tokens=10, max_prefill_chunk=64, num_blocks=256)
    a = [create_group(s, g, 3)[0] for g in range(4)]
    step(s)  # 4 prompts of 3 tokens: 12 > 10, the last one is chunked
    step(s)
    late = create_group(s, 9, 50)[0]
    out = step(s)
    decodes = [c for c in out if not c[3]]
    assert [c[0] for c in decodes] == a and all(c[2] == 1 for c in decodes)
    assert out[: len(decodes)] == decodes  # decodes first
    assert out[-1][0] == late and out[-1][2] == 10 - len(a)


@pytest.mark.parametrize("impl", IMPLS)
def test_max_num_seqs_limits_admission_and_counts_follower_seats(impl):
    s = create_scheduler(impl, max_num_seqs=5, num_blocks=256, max_num_batched_tokens=256)
    g0 = create_group(s, 0, 5, 3)  # needs 3 seats
    g1 = create_group(s, 1, 5, 3)  # 3 more would exceed 5: waits
    single = create_group(s, 2, 5, 1)
    out = s.schedule()
    assert [c.seq_id for c in out.scheduled] == [g0[0]]  # FCFS: g1 blocks the queue
    for c in out.scheduled:
        s.update(c.seq_id, c.num_tokens)
    forks = s.fork_ready(0)
    assert sorted(f.child for f in forks) == g0[1:]
    assert s.num_running == 3 and s.seq_state(g1[0]) == "waiting" and s.seq_state(single[0]) == "waiting"
    s.finish(g0[2])  # 2 running + 3 seats for g1 = 5: g1's leader is admitted; the single seq is not
    out = s.schedule()
    assert [c.seq_id for c in out.scheduled] == [g1[0]]
    assert s.seq_state(single[0]) == "waiting" and s.num_running == 3


# --- prefix sharing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("prompt_len", [37, 32, 3])
def test_followers_fork_from_leader_sharing_full_blocks(impl, prompt_len):
    bs, n = 4, 5
    s = create_scheduler(impl, block_size=bs, max_prefill_chunk=8, num_blocks=128)
    ids = create_group(s, 3, prompt_len, n)
    assert [s.seq_state(i) for i in ids] == ["waiting"] + ["awaiting_fork"] * (n - 1)
    free0 = s.num_free_blocks
    for _ in range(100):
        out = s.schedule()
        assert {c.seq_id for c in out.scheduled} <= {ids[0]}, "a follower ran before its fork"
        for c in out.scheduled:
            s.update(c.seq_id, c.num_tokens)
        if out.scheduled and out.scheduled[-1].samples:
            break
    leader_table = s.block_table(ids[0])
    full, rows = divmod(prompt_len, bs)
    assert len(leader_table) == -(-prompt_len // bs)
    assert free0 - s.num_free_blocks == len(leader_table)
    forks = s.fork_ready(3)
    assert [f.child for f in forks] == ids[1:]
    assert len(s.fork_ready(3)) == 0  # once only
    own = set()
    for f in forks:
        assert list(f.block_ids[:full]) == leader_table[:full]
        assert list(s.block_table(f.child)) == list(f.block_ids)
        assert s.num_computed_tokens(f.child) == prompt_len and s.seq_state(f.child) == "running"
        if rows:
            assert (f.copy_src, f.copy_rows) == (leader_table[full], rows)
            assert f.copy_dst not in leader_table and len(f.block_ids) == full + 1
            own.add(f.copy_dst)
        else:
            assert (f.copy_src, f.copy_dst, f.copy_rows) == (-1, -1, -1) and len(f.block_ids) == full
    assert len(own) == (n - 1 if rows else 0)  # each follower its own copy
    for b in leader_table[:full]:
        assert s.block_ref_count(b) == n
    if rows:
        assert s.block_ref_count(leader_table[full]) == 1
    assert free0 - s.num_free_blocks == len(leader_table) + len(own)  # the prompt's KV is stored once
    for i in ids:
        s.append_tokens(i, 1)
    out = s.schedule()
    assert sorted(c.seq_id for c in out.scheduled) == ids and all(not c.is_prefill for c in out.scheduled)
    written = [c.block_ids[c.start // bs] for c in out.scheduled]
    assert len(set(written)) == n and all(s.block_ref_count(b) == 1 for b in written)  # never a shared block
    for c in out.scheduled:
        s.update(c.seq_id, 1)
    for i in ids:
        s.finish(i)
    assert s.num_free_blocks == 128 and s.num_running == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_followers_recompute_when_engine_skips_fork_or_leader_finishes(impl):
    s = create_scheduler(impl)
    a = create_group(s, 0, 10, 3)
    assert step(s)[0][5]  # the leader's prompt is done (samples), and the engine does not call fork_ready
    out = step(s)  # no fork_ready: followers stop waiting and prefill their own prompt
    assert {c[0] for c in out if c[1] == 0 and c[3]} == set(a[1:])
    b = create_group(s, 1, 10, 2)
    s.finish(b[0])
    assert s.seq_state(b[1]) == "waiting" and s.stats()["num_fork_fallbacks"] == 3


# --- preemption and KV budget ------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_preempts_most_recent_and_recomputes_from_zero(impl):
    bs = 4
    s = create_scheduler(impl, block_size=bs, num_blocks=6, max_prefill_chunk=64)
    old = create_group(s, 0, 8, 1)[0]  # 2 blocks
    new = create_group(s, 1, 12, 1)[0]  # 3 blocks: 1 free left
    out = step(s)
    assert [c[0] for c in out] == [old, new] and s.num_free_blocks == 1
    for _ in range(2 * bs):
        out = s.schedule()
        sched = [c.seq_id for c in out.scheduled]
        assert not set(sched) & set(out.preempted), "preempted a sequence scheduled this step"
        for c in out.scheduled:
            s.update(c.seq_id, c.num_tokens)
            s.append_tokens(c.seq_id, 1)
        if out.preempted:
            break
    assert out.preempted == [new] and sched == [old]
    assert s.seq_state(new) == "waiting" and s.num_computed_tokens(new) == 0 and s.block_table(new) == []
    n_new = s.num_tokens(new)
    s.finish(old)
    out = s.schedule()
    assert [(c.seq_id, c.start, c.num_tokens, c.samples) for c in out.scheduled] == [(new, 0, n_new, True)]
    assert s.stats()["num_preemptions"] == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_preempted_follower_recomputes_its_whole_sequence_itself(impl):
    s = create_scheduler(impl, block_size=4, num_blocks=4)
    leader, child = create_group(s, 0, 8, 2)  # the prompt fills blocks 0-1 exactly: shared, nothing copied
    step(s, sample=False)
    (fork,) = s.fork_ready(0)
    shared = s.block_table(leader)
    assert list(fork.block_ids) == shared and s.block_ref_count(shared[0]) == 2
    s.append_tokens(leader, 1)
    s.append_tokens(child, 1)
    for _ in range(10):  # both decode into a block each; at row 12 the leader needs the child's
        out = s.schedule()
        if out.preempted:
            break
        for c in out.scheduled:
            s.update(c.seq_id, 1)
            s.append_tokens(c.seq_id, 1)
    assert list(out.preempted) == [child] and [c.seq_id for c in out.scheduled] == [leader]
    assert s.block_table(child) == [] and [s.block_ref_count(b) for b in shared] == [1, 1]
    s.update(leader, 1)
    s.finish(leader)
    (c,) = s.schedule().scheduled
    assert (c.seq_id, c.start, c.is_prefill, c.samples) == (child, 0, True, True)
    assert c.num_tokens == s.num_tokens(child) > 8


@pytest.mark.parametrize("impl", IMPLS)
def test_group_larger_than_kv_pool_finishes_with_kv_budget(impl):
    s = create_scheduler(impl, block_size=4, num_blocks=5, max_prefill_chunk=8)
    ids = create_group(s, 0, 21, 4)  # 6 blocks > 5
    ok = create_group(s, 1, 6, 1)[0]
    finished = []
    for _ in range(10):
        out = s.schedule()
        finished += list(out.finished)
        for c in out.scheduled:
            s.update(c.seq_id, c.num_tokens)
    assert sorted(finished) == ids
    assert [s.finish_reason(i) for i in ids] == ["kv_budget"] * 4 and s.finish_reason(ok) is None
    assert s.num_computed_tokens(ok) == 6 and s.num_waiting == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_growing_past_the_pool_finishes_with_kv_budget(impl):
    s = create_scheduler(impl, block_size=2, num_blocks=3)
    sid = create_group(s, 0, 3, 1)[0]
    for _ in range(10):
        step(s)
        if s.seq_state(sid) == "finished":
            break
    assert s.finish_reason(sid) == "kv_budget" and s.num_tokens(sid) == 7  # 7 tokens need 4 blocks > 3
    assert s.num_free_blocks == 3


@pytest.mark.parametrize("impl", IMPLS)
def test_awaiting_observation_is_not_scheduled_until_tokens_arrive(impl):
    s = create_scheduler(impl)
    sid = create_group(s, 0, 5, 1)[0]
    step(s)
    s.await_observation(sid)
    assert s.seq_state(sid) == "awaiting_observation" and step(s) == []
    obs = random.randint(2, 40)
    s.append_tokens(sid, obs)
    out = step(s)
    assert out[0][:4] == (sid, 5, min(obs + 1, 16), True)


# --- invariants ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["refcount", "free_list", "budget", "max_num_seqs"])
def test_invariant_check_fires_on_corrupted_state(impl, kind):
    s = create_scheduler(impl)
    create_group(s, 0, 9, 3)
    step(s)  # healthy state passes the check
    s._corrupt_for_test(kind)
    with pytest.raises(RuntimeError, match="invariant violated"):
        s.schedule()


# --- randomized twin simulation --------------------------------------------------------------------------


class FakeKV:
    """Token identities per KV row: a chunk may only run if its block table holds exactly its own tokens."""

    def __init__(self, num_blocks: int, bs: int):
        self.bs, self.rows = bs, [[None] * bs for _ in range(num_blocks)]

    def check(self, table, tokens, upto, where):
        got = [self.rows[table[r // self.bs]][r % self.bs] for r in range(upto)]
        assert got == tokens[:upto], f"{where}: KV rows do not hold the sequence's tokens"

    def write(self, table, tokens, start, n):
        for r in range(start, start + n):
            self.rows[table[r // self.bs]][r % self.bs] = tokens[r]


def simulate(impls, seed: int, cfg: SchedulerConfig, num_groups: int, max_steps: int = 4000):
    """Drive every scheduler in `impls` with the same random engine; return per-step records."""
    rng = random.Random(seed)
    scheds = [make_scheduler(cfg, impl=i) for i in impls]
    bs = cfg.block_size
    kv = FakeKV(cfg.num_blocks, bs)
    tokens: dict[int, list] = {}      # seq -> token identities (prompt shared within a group)
    computed: dict[int, int] = {}
    budget_left: dict[int, int] = {}  # sampled tokens before the seq finishes
    rounds_left: dict[int, int] = {}
    obs_due: dict[int, tuple[int, int]] = {}  # seq -> (step it arrives, length)
    sampled: dict[int, bool] = {}     # its one pending token is a just-sampled one (a decode)
    group_of, prompt_of, arrivals = {}, {}, sorted(rng.randrange(0, 60) for _ in range(num_groups))
    log = []

    def all_(method, *args):
        results = [getattr(s, method)(*args) for s in scheds]
        return results[0]

    for t in range(max_steps):
        while arrivals and arrivals[0] <= t:
            arrivals.pop(0)
            g = len(prompt_of)
            plen = rng.choice([1, 2, rng.randint(3, 40), rng.randint(40, 200)])
            prompt_of[g] = plen
            size = rng.randint(1, 6)
            ids = [list(s.add_group(g, plen, size)) for s in scheds]
            assert all(x == ids[0] for x in ids)
            for sid in ids[0]:
                group_of[sid] = g
                tokens[sid] = [("p", g, i) for i in range(plen)]
                computed[sid] = 0
                budget_left[sid] = rng.randint(1, 30)
                rounds_left[sid] = rng.randint(0, 3)
        for sid, (due, n) in list(obs_due.items()):
            if due <= t and not sched_finished(scheds[0], sid):
                del obs_due[sid]
                tokens[sid] += [("o", sid, len(tokens[sid]) + i) for i in range(n)]
                sampled[sid] = False
                all_("append_tokens", sid, n)
        flat = t % 2 == 1   # every other step through the engine's flat calls (schedule_arrays, update_many)
        outs = [s.schedule_arrays() if flat else s.schedule() for s in scheds]
        rec = (chunks(outs[0]), list(outs[0].preempted), list(outs[0].finished), outs[0].num_batched_tokens)
        for o in outs[1:]:
            assert (chunks(o), list(o.preempted), list(o.finished), o.num_batched_tokens) == rec, \
                f"twins diverge at step {t} (seed {seed})"
        log.append(rec)
        s0 = scheds[0]
        for sid in rec[1]:
            computed[sid], sampled[sid] = 0, False
        for sid in rec[2]:
            assert s0.finish_reason(sid) == "kv_budget" and -(-len(tokens[sid]) // bs) > cfg.num_blocks
        assert rec[3] <= cfg.max_num_batched_tokens and s0.num_running <= cfg.max_num_seqs
        for sid, start, n, is_prefill, table, samples in rec[0]:
            assert start == computed[sid] and start + n <= len(tokens[sid]), (t, sid)
            assert samples == (start + n == len(tokens[sid]))
            assert is_prefill == (not (sampled.get(sid) and len(tokens[sid]) - start == 1))
            assert n == 1 or is_prefill
            assert n <= cfg.max_prefill_chunk or not is_prefill
            for b in {table[r // bs] for r in range(start, start + n)}:
                assert s0.block_ref_count(b) == 1, f"step {t}: seq {sid} writes a shared block {b}"
            kv.check(table, tokens[sid], start, f"step {t} seq {sid}")
        for sid, start, n, _, table, _ in rec[0]:
            kv.write(table, tokens[sid], start, n)
        if flat:
            all_("update_many", np.array([c[0] for c in rec[0]], dtype=np.int64),
                 np.array([c[2] for c in rec[0]], dtype=np.int64))
        for sid, start, n, _, _, samples in rec[0]:
            if not flat:
                all_("update", sid, n)
            computed[sid] += n
        plain = []
        for sid, start, n, _, _, samples in rec[0]:
            if not samples:
                continue
            g = group_of[sid]
            new = [sid]
            if len(tokens[sid]) == prompt_of[g]:  # a prompt just completed: fork the group (maybe nothing)
                forks = [[(f.child, list(f.block_ids), f.copy_src, f.copy_dst, f.copy_rows)
                          for f in s.fork_ready(g)] for s in scheds]
                assert all(f == forks[0] for f in forks), f"forks diverge at step {t}"
                for child, table, src, dst, nrows in forks[0]:
                    if nrows > 0:
                        kv.rows[dst][:nrows] = kv.rows[src][:nrows]
                    kv.check(table, tokens[child], prompt_of[g], f"fork of {child}")
                    computed[child] = prompt_of[g]
                    new.append(child)
            for x in new:
                if rng.random() < 0.03 or budget_left[x] == 0:
                    all_("finish", x)
                    continue
                budget_left[x] -= 1
                sampled[x] = computed[x] == len(tokens[x])
                tokens[x].append(("s", x, len(tokens[x])))
                if rounds_left[x] and rng.random() < 0.15:
                    all_("append_tokens", x, 1)
                    rounds_left[x] -= 1
                    all_("await_observation", x)
                    obs_due[x] = (t + rng.randint(0, 3), rng.randint(1, 3 * bs + 5))
                else:   # as the engine does: tokens that end nothing, announced in one call after the step
                    plain.append(x)
        all_("append_one_each", np.array(plain, dtype=np.int64) if flat else plain)
        if rng.random() < 0.01 and tokens:  # the engine aborts a random live sequence
            victim = rng.choice(sorted(tokens))
            if not sched_finished(s0, victim):
                all_("finish", victim)
        states = [[s.seq_state(i) for i in sorted(tokens)] for s in scheds]
        assert all(x == states[0] for x in states), f"states diverge at step {t}"
        assert all(s.num_free_blocks == s0.num_free_blocks for s in scheds)
        if not arrivals and all(st == "finished" for st in states[0]):
            break
    else:
        raise AssertionError(f"seed {seed}: not every sequence finished in {max_steps} steps")
    for s in scheds:
        assert s.num_free_blocks == cfg.num_blocks and s.num_running == 0 and s.num_waiting == 0
    stats = [s.stats() for s in scheds]
    assert all(dict(x) == dict(stats[0]) for x in stats)
    return log, stats[0]


def sched_finished(s, sid) -> bool:
    return s.seq_state(sid) == "finished"


SIM_CONFIGS = [  # (tokens, seats, block size, blocks, chunk): tight pools preempt, small budgets queue
    SchedulerConfig(*c) for c in [(64, 8, 4, 40, 16), (7, 3, 1, 120, 5), (256, 32, 16, 24, 97), (33, 2, 2, 60, 64),
                                  (512, 64, 8, 400, 128)]
]


@pytest.mark.parametrize("cfg_index", range(len(SIM_CONFIGS)))
def test_random_rollouts_twins_identical_and_everything_finishes(cfg_index):
    impls = ["python", "cpp"] if cpp_available() else ["python"]
    seed = int.from_bytes(os.urandom(4), "little")
    log, stats = simulate(impls, seed, SIM_CONFIGS[cfg_index], num_groups=12)
    assert stats["num_scheduled_tokens"] > 0 and len(log) > 5, f"seed {seed}"


def test_random_rollouts_exercise_preemption_forks_and_kv_budget():
    """Across seeds, the tight configs really hit the paths the simulation is meant to check. (Measured: one
    seed of config 0 finishes nothing on the KV budget ~29% of the time; 3 seeds failed 1 run in 40, 8 make it
    ~5e-5.)"""
    impls = ["python", "cpp"] if cpp_available() else ["python"]
    total = dict(num_preemptions=0, num_forks=0, num_fork_fallbacks=0, num_kv_budget_finishes=0)
    base = int.from_bytes(os.urandom(4), "little")
    for k in range(16):
        _, stats = simulate(impls, base + k, SIM_CONFIGS[(0, 2)[k % 2]], num_groups=10)
        for key in total:
            total[key] += stats[key]
    assert all(v > 0 for v in total.values()), (base, total)


def test_random_configs_twins_identical_and_everything_finishes():
    """Fresh random budgets each run, down to one token, one seat or one KV block: never a hang."""
    impls = ["python", "cpp"] if cpp_available() else ["python"]
    base = int.from_bytes(os.urandom(4), "little")
    for k in range(25):
        r = random.Random(base + k)
        cfg = SchedulerConfig(max_num_batched_tokens=r.randint(1, 300), max_num_seqs=r.randint(1, 20),
                              block_size=r.choice([1, 2, 3, 4, 16]), num_blocks=r.randint(1, 150),
                              max_prefill_chunk=r.randint(1, 100))
        simulate(impls, base + k, cfg, num_groups=r.randint(1, 12), max_steps=20000)


@pytest.mark.parametrize("impl", IMPLS)
def test_flat_calls_name_a_length_mismatch(impl):
    s = create_scheduler(impl)
    a = create_group(s, 0, 10, 1)[0]
    out = s.schedule_arrays()
    with pytest.raises(ValueError, match="update_many"):
        s.update_many(out.seq_ids, np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="append_one_each"):
        s.append_one_each(np.zeros((1, 1), dtype=np.int64))
    s.update_many(out.seq_ids, out.num_tokens)
    assert s.num_computed_tokens(a) == 10
