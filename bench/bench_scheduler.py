"""One rollout-scheduler step for 256 running sequences: C++ (videocom_fast._C) vs the Python twin, and the
C++ scheduler through its flat calls (what the engine step does since session 13) vs through its objects.

A step is what the engine does around each forward: schedule(), then per scheduled chunk read its block
table, update(), and append the sampled token; "cpp-flat" is the same through schedule_arrays() (numpy
arrays, the block tables concatenated), one update_many() and one append_one_each(). State: 32 groups x 8
rollouts, prompt 1500 tokens shared by prefix forking, so the 256 block tables are about 95 blocks long.
Two cases:
  decode  all 256 sequences decode one token (the common step)
  mixed   a quarter of the sequences prefill a 300-token observation in chunks, the rest decode
Run: .venv/bin/pytest bench/bench_scheduler.py --benchmark-only   (prints a table of C++/Python ratios)
"""
from __future__ import annotations

import random

import pytest

from videocom_fast.rollout.scheduler import SchedulerConfig, cpp_available, make_scheduler

CFG = SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=256, block_size=16, num_blocks=4096,
                      max_prefill_chunk=512)
NUM_GROUPS, GROUP_SIZE, PROMPT = 32, 8, 1500
_NEEDS_C = pytest.mark.skipif(not cpp_available(), reason="_C not built")
IMPLS = ["python", pytest.param("cpp", marks=_NEEDS_C), pytest.param("cpp-flat", marks=_NEEDS_C)]
_medians: dict[tuple[str, str], float] = {}


def engine_step(s) -> int:
    """What the engine does around one forward; returns the tokens computed."""
    out = s.schedule()
    for c in out.scheduled:
        _ = c.block_ids  # the engine builds its block-table tensor from these
        s.update(c.seq_id, c.num_tokens)
        if c.samples:
            s.append_tokens(c.seq_id, 1)
    return out.num_batched_tokens


def engine_step_flat(s) -> int:
    """The same step through the flat calls."""
    out = s.schedule_arrays()
    s.update_many(out.seq_ids, out.num_tokens)
    s.append_one_each(out.seq_ids[out.samples])
    return out.num_batched_tokens


def build_running(impl: str, case: str):
    """A scheduler with 256 forked sequences in decode (and, for `mixed`, 64 with an observation queued)."""
    s = make_scheduler(CFG, impl=impl.removesuffix("-flat"))
    leaders = {g: s.add_group(g, PROMPT, GROUP_SIZE)[0] for g in range(NUM_GROUPS)}
    while s.num_running < NUM_GROUPS * GROUP_SIZE:
        out = s.schedule()
        for c in out.scheduled:
            s.update(c.seq_id, c.num_tokens)
            if c.samples:
                s.append_tokens(c.seq_id, 1)
        for g, leader in leaders.items():
            if any(c.seq_id == leader and c.samples for c in out.scheduled):
                for f in s.fork_ready(g):
                    s.append_tokens(f.child, 1)
    engine_step(s)  # every sequence has a just-sampled token pending
    if case == "mixed":
        for sid in random.Random(0).sample(range(NUM_GROUPS * GROUP_SIZE), 64):
            s.append_tokens(sid, 300)  # an observation after the sampled action token
    return s


@pytest.mark.parametrize("case", ["decode", "mixed"])
@pytest.mark.parametrize("impl", IMPLS)
def test_scheduler_step(benchmark, impl, case):
    step = engine_step_flat if impl.endswith("-flat") else engine_step
    result = benchmark.pedantic(step, setup=lambda: ((build_running(impl, case),), {}), rounds=15)
    assert result > 0
    _medians[(impl, case)] = benchmark.stats["median"]


@pytest.fixture(scope="module", autouse=True)
def _ratio_table(request):
    yield
    if not _medians:
        return
    lines = ["", "scheduler step, 256 running sequences (2-core CPU)   python ms   cpp ms   speedup"
             "   cpp-flat ms   cpp / cpp-flat"]
    for case in ("decode", "mixed"):
        py, cpp, flat = (_medians.get((i, case)) for i in ("python", "cpp", "cpp-flat"))
        if py and cpp:
            tail = f"{flat * 1e3:>14.3f}{cpp / flat:>16.1f}x" if flat else ""
            lines.append(f"  {case:<50}{py * 1e3:>9.3f}{cpp * 1e3:>9.3f}{py / cpp:>9.1f}x" + tail)
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():  # fd capture is still on during module teardown
        print("\n".join(lines))
