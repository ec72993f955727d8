"""Protocol parsing: the C++ core (videocom_fast._C) vs the Python twin (reference.py, the tests' oracle).

Cases (every parse returns the same actions in both implementations; asserted before timing):
  completions  64 realistic 5-round completions (a GRPO step's rewards parse G*B of them): each round is
               a few sentences of reasoning ending in an action line, the last one FINAL_ANSWER.
  adversarial  1 MB: 100k failing FIND_FRAME( heads on one line before a 500k-number list (linear in both)
  sampling     sample_frame_indices for 64 rewatches (union of segment time ranges + frame_list)
Reported: MB/s of text parsed, ms per call, and the speedup of C++ over Python.
Run: .venv/bin/pytest bench/bench_protocol.py --benchmark-only
"""
from __future__ import annotations

import random

import pytest

from videocom_fast.protocol import cpp, reference

IMPLS = ["python", pytest.param("cpp", marks=pytest.mark.skipif(not cpp.available(), reason="_C not built"))]
MOD = {"python": reference, "cpp": cpp}
_results: dict[tuple[str, str], tuple[float, float]] = {}  # (impl, case) -> (median s, MB per call)

_WORDS = ("the man in the red jacket walks toward the door while a dog runs across the yard and the camera "
          "pans left so I should check whether the cup falls before or after he opens it").split()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "."


def make_completion(rng: random.Random) -> str:
    """Five rounds as the rollout joins them: reasoning, then one action line per round."""
    rounds = []
    for r in range(5):
        text = " ".join(_sentence(rng) for _ in range(rng.randint(2, 5)))
        if r == 4:
            line = f"FINAL_ANSWER: {rng.choice('ABCD')}. {_sentence(rng)}"
        else:
            k = rng.randrange(3)
            if k == 0:
                segs = sorted(rng.sample(range(1, 11), rng.randint(1, 3)))
                line = f"FIND_SEGMENT(the man (in red) opens the door) = [{', '.join(map(str, segs))}]"
            elif k == 1:
                line = f"FIND_FRAME(the moment the cup falls) = [{rng.randint(1, 9000)}]"
            else:
                x, y = rng.randint(0, 300), rng.randint(0, 200)
                line = f"SPATIAL_ZOOM(the license plate) = [{x}, {y}, {x + 60}, {y + 40}]"
        rounds.append(f"{text}\n{line}")
    return "\n".join(rounds)


def _completions() -> list[str]:
    rng = random.Random(0)
    return [make_completion(rng) for _ in range(64)]


def _adversarial() -> list[str]:
    return ["FIND_FRAME(" * 100_000 + ") = [" + "1," * 300_000 + "1]"]


def _parse_all(impl, texts):
    return sum(len(impl.parse_actions(t)) for t in texts)


@pytest.mark.parametrize("case", ["completions", "adversarial"])
@pytest.mark.parametrize("impl", IMPLS)
def test_parse(benchmark, impl, case):
    texts = _completions() if case == "completions" else _adversarial()
    mb = sum(len(t.encode()) for t in texts) / 1e6
    if cpp.available():
        assert [cpp.parse_actions(t) for t in texts] == [reference.parse_actions(t) for t in texts]
    benchmark.group = f"protocol parse {case}"
    benchmark.extra_info["role"] = "baseline" if impl == "python" else "candidate"
    n = benchmark.pedantic(_parse_all, args=(MOD[impl], texts), rounds=5 if case == "adversarial" else 30,
                           warmup_rounds=1)
    assert n == (0 if case == "adversarial" else 64 * 5)
    median = benchmark.stats["median"]
    benchmark.extra_info["MB_per_s"] = mb / median
    _results[(impl, case)] = (median, mb)


def _rewatches():
    rng = random.Random(1)
    calls = []
    for _ in range(64):
        total, fps = rng.randint(900, 9000), rng.choice([25.0, 29.97, 30.0])
        ranges = reference.segment_ranges(total, fps)
        segs = sorted(rng.sample(range(1, len(ranges) + 1), rng.randint(1, 2)))
        tr = [{"start": s, "end": e} for s, e in reference.segment_time_ranges(total, fps, segs)]
        frames = [rng.randint(1, total) for _ in range(rng.randint(0, 3))]
        calls.append((total, fps, 16, tr, frames))
    return calls


def _sample_all(impl, calls):
    return sum(len(impl.sample_frame_indices(t, f, n, time_ranges=tr, frame_list=fl)) for t, f, n, tr, fl in calls)


@pytest.mark.parametrize("impl", IMPLS)
def test_sample_frame_indices(benchmark, impl):
    calls = _rewatches()
    benchmark.group = "protocol sample_frame_indices x64"
    benchmark.extra_info["role"] = "baseline" if impl == "python" else "candidate"
    n = benchmark.pedantic(_sample_all, args=(MOD[impl], calls), rounds=20, warmup_rounds=1)
    assert n >= 64 * 16
    _results[(impl, "sampling")] = (benchmark.stats["median"], 0.0)


@pytest.fixture(scope="module", autouse=True)
def _ratio_table(request):
    yield
    if not _results:
        return
    lines = ["", "protocol (2-core CPU)                 python ms    cpp ms   python MB/s   cpp MB/s   speedup"]
    for case in ("completions", "adversarial", "sampling"):
        py, c = _results.get(("python", case)), _results.get(("cpp", case))
        if py and c:
            mbs = f"{py[1] / py[0]:>13.1f}{c[1] / c[0]:>11.1f}" if py[1] else f"{'-':>13}{'-':>11}"
            lines.append(f"  {case:<34}{py[0] * 1e3:>10.3f}{c[0] * 1e3:>10.3f}{mbs}{py[0] / c[0]:>9.1f}x")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():  # fd capture is still on during module teardown
        print("\n".join(lines))
