"""The protocol core: C++ (videocom_fast._C) and the Python twin agree on every input, and both are right.

- Agreement: hypothesis on random text and on text built from grammar fragments (so actions really occur),
  plus the committed corpus tests/corpus/protocol_strings.jsonl (hand-written expectations, huge inputs).
- Correctness against oracles that are not ours: transformers' smart_resize, torch.linspace, the reference
  repo's segment loop (transcribed below), and a self-describing generator for single well-formed actions.
- Bad arguments: ValueError naming the argument, from both implementations.
"""
from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import videocom_fast.protocol as protocol
from videocom_fast.protocol import cpp, reference

CORPUS = Path(__file__).parent / "corpus" / "protocol_strings.jsonl"
IMPLS = [pytest.param(reference, id="python"),
         pytest.param(cpp, id="cpp", marks=pytest.mark.skipif(not cpp.available(), reason="_C not built"))]
needs_cpp = pytest.mark.skipif(not cpp.available(), reason="videocom_fast._C not built")
HYP = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _rows():
    return [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]


def _text(row) -> str:
    return row["text"] if "text" in row else "".join(p * n for p, n in row["parts"])


def _plain(a, text):
    values = [list(b) for b in a.values] if a.kind == "zoom" else a.values
    return [a.kind, values, a.description, text[a.start:a.end]]


# --- the corpus ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("row", _rows(), ids=lambda r: r["name"])
def test_corpus(impl, row):
    text = _text(row)
    acts = impl.parse_actions(text)
    if "expected" in row:
        assert [_plain(a, text) for a in acts] == row["expected"]
    else:
        got = [[a.kind, len(a.values), a.values[0], a.description] for a in acts]
        want = []
        for s in row["summary"]:
            want += [s[:4]] * (s[4] if len(s) > 4 else 1)
        if any(w[3] is None for w in want):
            got = [g[:3] + [None] for g in got]
        assert got == want
    for a in acts:  # offsets are Python characters and bracket the head ... value
        assert 0 <= a.start < a.end <= len(text)
        assert text[a.start:a.end].lower().startswith(("find_", "spatial_zoom", "final_answer"))


@needs_cpp
@pytest.mark.parametrize("row", _rows(), ids=lambda r: r["name"])
def test_corpus_agreement(row):
    text = _text(row)
    assert cpp.parse_actions(text) == reference.parse_actions(text)
    assert cpp.mentioned_tool(text) == reference.mentioned_tool(text)


def test_corpus_covers_what_the_brief_lists():
    names = " ".join(r["name"] for r in _rows())
    for topic in ("negative", "overflow", "unicode", "missing", "nested", "two_per_line", "embedded",
                  "million", "1mb", "surrogate"):
        assert topic in names, topic


# --- hypothesis: both implementations agree on everything ---------------------------------------------

_TOKENS = ["FIND_SEGMENT(", "find_frame(", "Find_Frame(", "SPATIAL_ZOOM(", "spatial_zoom(", "FINAL_ANSWER:",
           "final_answer :", "FIND_", ")", "(", "=", " = ", "[", "]", ",", ", ", "-", "\n", "\r", "\t", " ",
           "\x0b", "B.", "z.", " A. ", "0", "7", "42", "2147483647", "2147483648", "99999999999", "000",
           "é", "日本", "🎬", "\u2028", "\u00a0", "３", "ſ", "\ud800", "\x00", "x", "the man (in red)"]


@st.composite
def _grammarish(draw):
    return "".join(draw(st.lists(st.sampled_from(_TOKENS), max_size=60)))


def _num(rng):
    r = rng.random()
    if r < 0.75:
        return rng.randint(0, 3000)
    if r < 0.85:
        return rng.randint(-5, -1)
    return rng.choice([2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, 10**12])


def make_action_text(rng: random.Random) -> str:
    """Text made of likely actions (valid or slightly broken) joined by prose and line breaks."""
    parts = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(["seg", "frame", "zoom", "answer", "prose"])
        head = {"seg": "FIND_SEGMENT", "frame": "FIND_FRAME", "zoom": "SPATIAL_ZOOM"}.get(kind, "")
        head = "".join(c.lower() if rng.random() < 0.5 else c for c in head)
        desc = rng.choice(["x", "", "the cup (left)", "a) b", "日本 (x)", "FIND_FRAME(y"])
        eq = rng.choice([" = ", "=", " =\t", " = ", " = -", "\n= "])
        if kind in ("seg", "frame"):
            body = ", ".join(str(_num(rng)) for _ in range(rng.choice([0, 1, 1, 2, 3])))
            value = rng.choice([f"[{body}]", body, f"[{body}]", f"[{body}", f"[[{body}]]"])
            parts.append(f"{head}({desc}){eq}{value}")
        elif kind == "zoom":
            boxes = [", ".join(str(_num(rng)) for _ in range(rng.choice([3, 4, 4, 4, 5])))
                     for _ in range(rng.randint(1, 3))]
            sep = rng.choice([", ", " ", ", ", ",, ", ";"])
            parts.append(f"{head}({desc}){eq}" + sep.join(f"[{b}]" for b in boxes))
        elif kind == "answer":
            parts.append(rng.choice(["FINAL_ANSWER: ", "final_answer:", "FINAL_ANSWER :\n"])
                         + rng.choice(["A", "B", "e", "("]) + ". option text")
        else:
            parts.append("".join(rng.choice(_TOKENS[14:]) for _ in range(rng.randint(0, 8))))
        parts.append(rng.choice(["", "\n", " ", ". Then ", "\r\n"]))
    return "".join(parts)


_actions_text = st.randoms(use_true_random=False).map(make_action_text)


@needs_cpp
@HYP
@given(st.text(max_size=200))
def test_agree_on_random_text(text):
    assert cpp.parse_actions(text) == reference.parse_actions(text)
    assert cpp.mentioned_tool(text) == reference.mentioned_tool(text)


@needs_cpp
@HYP
@given(_grammarish())
def test_agree_on_grammar_fragments(text):
    assert cpp.parse_actions(text) == reference.parse_actions(text)
    assert cpp.mentioned_tool(text) == reference.mentioned_tool(text)


@needs_cpp
@HYP
@given(_actions_text)
def test_agree_on_action_like_text(text):
    assert cpp.parse_actions(text) == reference.parse_actions(text)
    assert cpp.parse_action(text) == reference.parse_action(text)


def test_action_like_text_really_produces_actions():
    # The agreement above means little if the generator never made a valid action: it must, often.
    rng = random.Random()
    rng_texts = [make_action_text(rng) for _ in range(300)]
    kinds = {a.kind for t in rng_texts for a in reference.parse_actions(t)}
    assert kinds == {"segment", "frame", "zoom", "answer"}


# --- a self-describing oracle: one well-formed action inside head-free prose --------------------------

_PROSE = st.text(st.characters(blacklist_characters="()=[]\n\r", blacklist_categories=("Cs",)), max_size=40) \
    .filter(lambda s: not re.search(r"(?i)find_|spatial_zoom|final_answer", s))


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(["segment", "frame", "zoom"]), prose=_PROSE, tail=_PROSE,
       desc=_PROSE, nums=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=8), bare=st.booleans(),
       case=st.sampled_from([str.upper, str.lower, str.title]))
def test_single_wellformed_action_is_parsed_exactly(impl, kind, prose, tail, desc, nums, bare, case):
    name = {"segment": "FIND_SEGMENT", "frame": "FIND_FRAME", "zoom": "SPATIAL_ZOOM"}[kind]
    if kind == "frame":
        nums = nums[:1]
        value = f"{nums[0]}" if bare else f"[{nums[0]}]"
        want = nums
    elif kind == "segment":
        value = f"{nums[0]}" if bare else "[" + ", ".join(map(str, nums)) + "]"
        want = nums[:1] if bare else nums
    else:
        boxes = [tuple((nums * 4)[i:i + 4]) for i in range(0, 4 * max(1, len(nums) // 4), 4)]
        value = ", ".join("[" + ", ".join(map(str, b)) + "]" for b in boxes)
        want = boxes
    action = f"{case(name)}({desc}) = {value}"
    text = f"{prose} {action} .{tail}"
    acts = impl.parse_actions(text)
    assert len(acts) == 1
    a = acts[0]
    assert (a.kind, a.values, a.description) == (kind, want, desc)
    assert text[a.start:a.end] == action and a.start == len(prose) + 1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [None, 5, 3.5, b"FIND_FRAME(x) = 3", ["FIND_FRAME(x) = 3"], object()])
def test_non_str_is_no_action(impl, bad):
    assert impl.parse_actions(bad) == []
    assert impl.parse_action(bad) is None
    assert impl.mentioned_tool(bad) is None


@pytest.mark.parametrize("impl", IMPLS)
def test_mentioned_tool_reports_invalid_requests(impl):
    assert impl.mentioned_tool("FINAL_ANSWER: A. x then spatial_zoom(bad) = [1]") == "zoom"
    assert impl.mentioned_tool("I will FIND_SEGMENT(oops") == "segment"
    assert impl.mentioned_tool("FIND_FRAME is what I need") is None  # no '(' after the name
    assert impl.mentioned_tool("FINAL_ANSWER: A. done") is None


@pytest.mark.parametrize("impl", IMPLS)
def test_str_subclass_and_offsets_in_characters(impl):
    class S(str):
        pass
    text = S("ñ" * 5 + "FIND_FRAME(é) = 1")
    (a,) = impl.parse_actions(text)
    assert (a.start, a.end, a.description) == (5, 22, "é")


# --- segments: the reference repo's loop as the oracle ------------------------------------------------

def _reference_repo_segments(total_frames, fps):
    """train/manipulation_utils.py get_segment_time_range_list, transcribed (counting one by one)."""
    duration_sec = total_frames / fps
    segment_count = 10
    while duration_sec / segment_count < 10 and segment_count > 1:
        segment_count -= 1
    while duration_sec / segment_count > 30:
        segment_count += 1
    per = total_frames // segment_count
    ranges = []
    for s in range(1, segment_count + 1):
        start = (s - 1) * per
        ranges.append((start, total_frames if s == segment_count else start + per))
    return ranges


@pytest.mark.parametrize("impl", IMPLS)
def test_segment_ranges_match_the_reference_loop(impl):
    rng = random.Random()
    cases = [(1, 30.0), (299, 30.0), (300, 30.0), (301, 30.0), (9000, 30.0), (9001, 30.0), (27000, 29.97),
             (108000, 30.0), (3_000_000, 25.0)]
    cases += [(rng.randint(1, 400_000), rng.choice([1.0, 10.0, 23.976, 24.0, 25.0, 29.97, 30.0, 59.94, 60.0,
                                                    rng.uniform(0.5, 120.0)])) for _ in range(400)]
    for n, fps in cases:
        want = _reference_repo_segments(n, fps)
        assert impl.segment_ranges(n, fps) == want, (n, fps)
        assert impl.num_segments(n, fps) == len(want)


@pytest.mark.parametrize("impl", IMPLS)
def test_segment_time_ranges(impl):
    # 900 frames at 30 fps: 30 s -> 3 segments of 300 frames, 10 s each
    assert impl.segment_time_ranges(900, 30.0, [1, 3]) == [(0.0, 10.0), (20.0, 30.0)]
    # 1001 frames at 29.97: 3 segments of 333 frames; the last runs to 1001 (33.4 s)
    assert impl.segment_time_ranges(1001, 29.97, [2, 3]) == [(11.11, 22.22), (22.22, 33.4)]
    with pytest.raises(ValueError, match=r"segments\[1\]"):
        impl.segment_time_ranges(900, 30.0, [1, 4])


# --- smart_resize: transformers as the oracle ----------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_smart_resize_matches_transformers(impl):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

    rng = random.Random()
    limits = [(4 * 28 * 28, 128 * 28 * 28), (128 * 28 * 28, 360 * 420), (56 * 56, 14 * 14 * 4 * 1280)]
    for _ in range(3000):
        h = rng.choice([rng.randint(15, 100), rng.randint(15, 2000), rng.randint(15, 8000)])
        w = rng.randint(max(15, math.ceil(h / 200)), min(200 * h, 8000))
        lo, hi = rng.choice(limits + [(rng.randint(0, 10**5), rng.randint(10**5, 10**7))])
        assert impl.smart_resize(h, w, min_pixels=lo, max_pixels=hi) == \
            hf_smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi), (h, w, lo, hi)


@pytest.mark.parametrize("impl", IMPLS)
def test_smart_resize_tiny_side_follows_qwen_vl_utils(impl):
    # round(10/28) = 0 -> 28 (qwen-vl-utils' max(factor, ...); transformers would give (28, 812) here);
    # round(2000/28) = 71 -> 1988; 28*1988 = 55664 is inside [3136, 100352]: kept.
    assert impl.smart_resize(10, 2000) == (28, 1988)
    # 14/28 = 0.5 rounds half to even (0) -> 28; 42/28 = 1.5 -> 2; 70/28 = 2.5 -> 2 (half to even)
    assert impl.smart_resize(14, 56, min_pixels=0) == (28, 56)
    assert impl.smart_resize(42, 70, min_pixels=0) == (56, 56)
    # 14x56 = 784 px is under min 3136: beta = sqrt(3136/784) = 2, ceil(28/28)*28, ceil(112/28)*28
    assert impl.smart_resize(14, 56) == (28, 112)


@needs_cpp
@HYP
@given(h=st.integers(1, 3000), w=st.integers(1, 3000), f=st.sampled_from([1, 14, 28, 32]),
       lo=st.integers(0, 10**6), span=st.integers(1, 10**7))
def test_smart_resize_agree(h, w, f, lo, span):
    def run(impl):
        try:
            return impl.smart_resize(h, w, factor=f, min_pixels=lo, max_pixels=lo + span)
        except ValueError as e:
            return type(e)
    assert run(cpp) == run(reference)


# --- frame sampling: torch.linspace and a naive set-based sampler as the oracles ----------------------

def test_linspace_round_matches_torch():
    import torch

    if not cpp.available():
        pytest.skip("_C not built")
    rng = random.Random()
    cases = [(e, s) for e in range(0, 300) for s in range(1, min(e + 1, 70) + 1)]
    cases += [(rng.randint(0, 2**24), rng.randint(1, 5000)) for _ in range(300)]
    cases += [(rng.randint(0, 5000), rng.randint(1, 40000)) for _ in range(20)]
    for end, steps in cases:
        assert cpp.linspace_round(end, steps) == torch.linspace(0, end, steps).round().long().tolist(), (end, steps)


def _naive_sample(total_frames, fps, nframes, time_ranges=None, frame_list=None):
    """The reference repo's _read_video_decord index logic, transcribed, with torch.linspace itself."""
    import torch

    idx_all = list(range(total_frames))
    seg = idx_all
    if time_ranges:
        s = []
        for r in time_ranges:
            start, end = (r["start"], r["end"]) if isinstance(r, dict) else r
            lo = max(0, int(math.floor(start * fps)))
            hi = min(total_frames - 1, int(math.ceil(end * fps)) - 1)
            if hi >= lo:
                s.extend(range(lo, hi + 1))
        seg = sorted(set(s)) or idx_all
    if len(seg) < 2:
        seg = idx_all
    n = min(reference.smart_nframes(nframes, len(seg), fps), len(seg))
    idx = [seg[i] for i in torch.linspace(0, len(seg) - 1, n).round().long().tolist()]
    inside = [f - 1 for f in (frame_list or []) if f - 1 in set(seg)]
    return sorted(set(idx) | set(inside))


@pytest.mark.parametrize("impl", IMPLS)
def test_sample_frame_indices_matches_naive(impl):
    rng = random.Random()
    for _ in range(300):
        total = rng.randint(1, 5000)
        fps = rng.choice([24.0, 25.0, 29.97, 30.0, rng.uniform(1.0, 60.0)])
        dur = total / fps
        ranges = None
        if rng.random() < 0.7:
            ranges = []
            for _ in range(rng.randint(0, 4)):
                a = rng.uniform(-2.0, dur + 2.0)
                b = a + rng.uniform(-1.0, dur / 3)
                a, b = round(a, 2), round(b, 2)
                ranges.append({"start": a, "end": b} if rng.random() < 0.5 else (a, b))
        frames = [rng.randint(-3, total + 3) for _ in range(rng.randint(0, 5))] if rng.random() < 0.5 else None
        nframes = rng.choice([16, 32, rng.randint(1, 80)])
        assert impl.sample_frame_indices(total, fps, nframes, time_ranges=ranges, frame_list=frames) == \
            _naive_sample(total, fps, nframes, ranges, frames), (total, fps, nframes, ranges, frames)


def test_sample_frame_indices_spec_example():
    # 32 frames uniform over a 300-frame video: torch.linspace(0, 299, 32).round()
    got = protocol.sample_frame_indices(300, 30.0, 32)
    assert len(got) == 32 and got[0] == 0 and got[-1] == 299
    assert got == [round(i * 299 / 31) for i in range(32)]  # no exact .5 ties at these sizes


@needs_cpp
@HYP
@given(n=st.integers(1, 10**6), t=st.integers(1, 10**6), fps=st.floats(1e-3, 1e3), lo=st.integers(0, 100),
       hi=st.integers(0, 100))
def test_smart_nframes_agree_and_even(n, t, fps, lo, hi):
    a = cpp.smart_nframes(n, t, fps, min_frames=lo, max_frames=hi)
    assert a == reference.smart_nframes(n, t, fps, min_frames=lo, max_frames=hi)
    assert a % 2 == 0 and a >= 2


# --- bad arguments ------------------------------------------------------------------------------------

_BAD = [
    ("segment_ranges", (0, 30.0), {}, "total_frames"),
    ("segment_ranges", (100, 0.0), {}, "fps"),
    ("segment_ranges", (100, float("nan")), {}, "fps"),
    ("segment_ranges", (100, "30"), {}, "fps"),
    ("segment_ranges", (2**31, 30.0), {}, "total_frames"),
    ("segment_ranges", (1.5, 30.0), {}, "total_frames"),
    ("segment_ranges", (10**6, 1e-300), {}, "segments"),
    ("num_segments", (100, 30.0), {"max_seconds": 0.0}, "max_seconds"),
    ("smart_resize", (0, 10), {}, "height"),
    ("smart_resize", (10, -1), {}, "width"),
    ("smart_resize", (10.0, 10), {}, "height"),
    ("smart_resize", (True, 10), {}, "height"),
    ("smart_resize", (2**25, 2**25), {}, "height"),
    ("smart_resize", (10, 3000), {}, "aspect"),
    ("smart_resize", (100, 100), {"factor": 0}, "factor"),
    ("smart_resize", (100, 100), {"min_pixels": 10, "max_pixels": 5}, "min_pixels"),
    ("smart_nframes", (0, 10, 30.0), {}, "nframes"),
    ("smart_nframes", (4, 0, 30.0), {}, "total"),
    ("smart_nframes", (4, 10, float("inf")), {}, "fps"),
    ("smart_nframes", (4, 10, 30.0), {"min_frames": -1}, "min_frames"),
    ("sample_frame_indices", (0, 30.0, 16), {}, "total_frames"),
    ("sample_frame_indices", (100, -1.0, 16), {}, "fps"),
    ("sample_frame_indices", (100, 30.0, 0), {}, "nframes"),
    ("sample_frame_indices", (100, 30.0, 16), {"time_ranges": 5}, "time_ranges"),
    ("sample_frame_indices", (100, 30.0, 16), {"time_ranges": [(0, 1), {"start": 1}]}, r"time_ranges\[1\]"),
    ("sample_frame_indices", (100, 30.0, 16), {"time_ranges": [(0, 1, 2)]}, r"time_ranges\[0\]"),
    ("sample_frame_indices", (100, 30.0, 16), {"time_ranges": [("a", 1)]}, r"time_ranges\[0\]\.start"),
    ("sample_frame_indices", (100, 30.0, 16), {"time_ranges": [(0, float("inf"))]}, r"time_ranges\[0\]\.end"),
    ("sample_frame_indices", (100, 30.0, 16), {"time_ranges": [(0, 1e308)]}, r"time_ranges\[0\]"),
    ("sample_frame_indices", (100, 30.0, 16), {"frame_list": [1, 2.5]}, r"frame_list\[1\]"),
    ("sample_frame_indices", (100, 30.0, 16), {"frame_list": 7}, "frame_list"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fn,args,kwargs,name", _BAD, ids=[f"{b[0]}-{b[3]}" for b in _BAD])
def test_bad_arguments_raise_value_error_naming_them(impl, fn, args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        getattr(impl, fn)(*args, **kwargs)


# --- dispatch -----------------------------------------------------------------------------------------

def test_dispatch_switches_and_restores():
    before = protocol.implementation()
    try:
        protocol.use("python")
        assert protocol.implementation() == "python"
        if cpp.available():
            protocol.use("cpp")
            assert protocol.implementation() == "cpp"
        with pytest.raises(ValueError, match="VIDEOCOM_PROTOCOL"):
            protocol.use("rust")
    finally:
        protocol.use(before)
    assert protocol.implementation() == before
