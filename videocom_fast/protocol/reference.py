"""The Video-CoM protocol in plain Python: the twin of the C++ core (csrc/protocol), and its oracle.

Everything the executor, the rewards and the data pipeline need to agree on lives here once
(../shared/spec/videocom.md sections 1, 2 and 4):

- `parse_actions(text)` / `parse_action(text)`: the manipulation grammar of the model's output.
- `segment_ranges(total_frames, fps)`: the segment partition burned into the overlay.
- `smart_resize(h, w, ...)`: Qwen2.5-VL's resize rule.
- `sample_frame_indices(...)`: which frames the main video and a rewatch show.

The grammar, exactly (csrc/protocol/protocol.cpp implements the same steps byte for byte):
- A head is the leftmost `FIND_SEGMENT(`, `FIND_FRAME(`, `SPATIAL_ZOOM(` or `FINAL_ANSWER<ws>*:` at or after
  the scan position, ASCII case-insensitive, anywhere in the text (inside words too, as the reference's
  `re.search` finds them; tools embedded in prose or several per line all count).
- Tool: the description runs from the head to the first `)` on the same line that is followed by
  `<ws>*=<ws>*` and then `[` or a digit (so descriptions may contain parentheses). The value is
  `[n, n, ...]` (digits, commas, blanks; at least one number) or a bare `n` for FIND_SEGMENT/FIND_FRAME;
  FIND_FRAME takes exactly one number; SPATIAL_ZOOM takes one or more `[x1, y1, x2, y2]` boxes separated
  by blanks and at most one comma each. A value that is malformed, negative or does not fit a signed
  32-bit int makes the action invalid: nothing is returned for it and the scan resumes right after its
  head (so a tool named inside an invalid action's description can still be found).
- Answer: `FINAL_ANSWER<ws>*:<ws>*<A-Z>.`; the option text runs to the line end or the next head, whichever
  comes first, blanks stripped.
- A line ends at `\\n` or `\\r`; `<ws>` is ASCII whitespace (space, \\t, \\n, \\r, \\f, \\v). Offsets
  `start`/`end` are Python character offsets of the head start and the value end.

Grammar decisions (each fixes a numbered defect of spec section 7):
- `FIND_SEGMENT(...) = s` parses the number s, not the description (defect 2); an invalid action never
  wipes the valid ones around it.
- Actions are found anywhere in the text, in text order, so rounds joined with or without newlines parse
  the same (defect 4).
- FIND_FRAME names exactly one frame (`= n` or `= [n]`); the executor and the rewards both call this
  module, so they cannot disagree about which number was meant (defect 5).
No input raises: anything malformed, empty or not a str is simply not an action. Every scan is linear in
the text (adversarial inputs included): line ends, description ends and parsed values are cached so that
many failing heads on one long line never rescan it.

Numeric helpers raise ValueError naming the argument on bad input; their integer and float arithmetic is
the reference's (round() is half-to-even; `sample_frame_indices` reproduces torch.linspace in float32).
"""
from __future__ import annotations

import math
import operator
import re
from bisect import bisect_right
from dataclasses import dataclass, field

INT32_MAX = 2**31 - 1
MAX_SIDE = 2**24          # smart_resize sides: keeps h*w exact in a double (the C++ twin's arithmetic)
MAX_PIXELS_LIMIT = 2**48
MAX_FRAMES_LIMIT = 2**24  # total_frames: keeps float32 linspace end exact (no index past the end)
KINDS = ("segment", "frame", "zoom", "answer")
_TOOL_KIND = {"find_segment": "segment", "find_frame": "frame", "spatial_zoom": "zoom"}
_WS = " \t\n\r\f\v"

_HEAD = re.compile(r"(FIND_SEGMENT|FIND_FRAME|SPATIAL_ZOOM)\(|FINAL_ANSWER\s*:", re.I | re.A)
_DESC_END = re.compile(r"\)\s*=\s*(?=[\[0-9])", re.A)
_LIST = re.compile(r"\[([0-9,\s]+)\]", re.A)
_INT = re.compile(r"[0-9]+", re.A)
_BOX = re.compile(r"\[\s*([0-9]+)\s*,\s*([0-9]+)\s*,\s*([0-9]+)\s*,\s*([0-9]+)\s*\]", re.A)
_ANSWER = re.compile(r"\s*([A-Z])\.", re.A)
_LINE_END = re.compile(r"[\n\r]")
_BOX_SEP = re.compile(r"\s*,?\s*", re.A)


@dataclass
class Action:
    kind: str                      # "segment" | "frame" | "zoom" | "answer"
    values: list = field(default_factory=list)  # ints | [(x1, y1, x2, y2)] | "B"
    description: str = ""
    start: int = 0                 # character offsets of the whole match in the text
    end: int = 0


def _to_int(digits: str) -> int | None:
    # NOTE: reject before converting so a 10**6-digit number costs no bignum work.
    if len(digits) > 10:
        digits = digits.lstrip("0") or "0"
        if len(digits) > 10:
            return None
    v = int(digits)
    return v if v <= INT32_MAX else None


# --- the grammar ---------------------------------------------------------------------------------------

class _Scanner:
    """One parse of one text. Queries arrive at non-decreasing positions, which makes the caches valid."""

    def __init__(self, text: str):
        self.text = text
        self.eol = -1                  # end of the line that contains the last queried position
        self.desc_from = -1            # _DESC_END was searched from here ...
        self.desc_m = None             # ... on the line ending at desc_eol, with this first match
        self.desc_eol = -1
        self.values: dict = {}         # (value position, is_zoom) -> parsed value or None

    def line_end(self, pos: int) -> int:
        if pos > self.eol:  # NOTE: pos <= eol means no line break in [pos, eol) (pos is non-decreasing)
            m = _LINE_END.search(self.text, pos)
            self.eol = m.start() if m else len(self.text)
        return self.eol

    def desc_end(self, pos: int, eol: int):
        m = self.desc_m
        cached = eol == self.desc_eol and pos >= self.desc_from and (m is None or pos <= m.start())
        if not cached:
            m = _DESC_END.search(self.text, pos, eol)
            self.desc_from, self.desc_m, self.desc_eol = pos, m, eol
        return m

    def value(self, vpos: int, eol: int, zoom: bool):
        key = (vpos, zoom)
        if key not in self.values:
            self.values[key] = (_parse_boxes if zoom else _parse_numbers)(self.text, vpos, eol)
        return self.values[key]


def _parse_numbers(text: str, vpos: int, eol: int):
    """`[n, ...]` or `n` at vpos -> (ints, end), or None if malformed or out of int32 range."""
    lm = _LIST.match(text, vpos, eol)
    if lm is not None:
        nums = [_to_int(t) for t in _INT.findall(lm.group(1))]
        end = lm.end()
    else:
        im = _INT.match(text, vpos, eol)
        if im is None:
            return None
        nums, end = [_to_int(im.group(0))], im.end()
    if not nums or any(v is None for v in nums):
        return None
    return nums, end


def _parse_boxes(text: str, vpos: int, eol: int):
    """One or more `[x1, y1, x2, y2]` at vpos -> (boxes, end), or None."""
    boxes, pos, end = [], vpos, vpos
    while (b := _BOX.match(text, pos, eol)) is not None:
        vals = tuple(_to_int(g) for g in b.groups())
        if None in vals:
            return None
        boxes.append(vals)
        end = b.end()
        pos = _BOX_SEP.match(text, end, eol).end()
    return (boxes, end) if boxes else None


def _parse_tool(sc: _Scanner, kind: str, head_end: int) -> Action | None:
    eol = sc.line_end(head_end)
    m = sc.desc_end(head_end, eol)
    if m is None:
        return None
    parsed = sc.value(m.end(), eol, kind == "zoom")
    if parsed is None:
        return None
    vals, end = parsed
    if kind == "frame" and len(vals) != 1:
        return None
    return Action(kind, list(vals), sc.text[head_end:m.start()], 0, end)


def parse_actions(text: str) -> list[Action]:
    """All valid actions in `text`, in text order. Never raises."""
    if not isinstance(text, str):
        return []
    sc = _Scanner(text)
    out: list[Action] = []
    pos, ahead = 0, None  # ahead: the head search from pos, when an answer already did it
    while True:
        h = ahead if ahead is not None else _HEAD.search(text, pos)
        ahead = None
        if h is None:
            return out
        if h.group(1) is None:  # FINAL_ANSWER:
            a = _ANSWER.match(text, h.end())
            if a is None:
                pos = h.end()
                continue
            # The option text stops at the line end or the next head (so output stays linear in the text).
            stop = sc.line_end(a.end())
            ahead = _HEAD.search(text, a.end())
            if ahead is not None:
                stop = min(stop, ahead.start())
            out.append(Action("answer", a.group(1), text[a.end():stop].strip(_WS), h.start(), a.end()))
            pos = a.end()
            continue
        act = _parse_tool(sc, _TOOL_KIND[h.group(1).lower()], h.end())
        if act is None:
            pos = h.end()
            continue
        act.start = h.start()
        out.append(act)
        pos = act.end


def parse_action(text: str) -> Action | None:
    """The first valid action in `text`, or None."""
    acts = parse_actions(text)
    return acts[0] if acts else None


def mentioned_tool(text: str) -> str | None:
    """Kind of the first tool head in `text` even when its arguments are invalid (for the protocol's reply
    to an unparsable request), else None."""
    if not isinstance(text, str):
        return None
    for h in _HEAD.finditer(text):
        if h.group(1) is not None:
            return _TOOL_KIND[h.group(1).lower()]
    return None


# --- argument checks (the C++ binding checks the same bounds) -----------------------------------------

def _int_arg(fn: str, name: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool):
        raise ValueError(f"{fn}: {name} must be an int, got {v!r}")
    try:
        iv = operator.index(v)
    except TypeError:
        raise ValueError(f"{fn}: {name} must be an int, got {type(v).__name__} {v!r}") from None
    if not lo <= iv <= hi:
        raise ValueError(f"{fn}: {name} must be in [{lo}, {hi}], got {iv}")
    return iv


def _float_arg(fn: str, name: str, v, positive: bool = True) -> float:
    try:
        fv = float(v) if not isinstance(v, (str, bytes, bytearray)) else None
    except (TypeError, ValueError, OverflowError):
        fv = None
    if fv is None or not math.isfinite(fv) or (positive and not fv > 0):
        want = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{fn}: {name} must be {want}, got {v!r}")
    return fv


def _items(fn: str, name: str, v) -> list:
    try:
        return list(v)
    except TypeError:
        raise ValueError(f"{fn}: {name} must be a list, got {v!r}") from None


# --- segments, resize, sampling (spec sections 1 and 4) -----------------------------------------------

def num_segments(total_frames: int, fps: float, *, min_seconds: float = 10.0, max_seconds: float = 30.0) -> int:
    """Start at 10; fewer while segments are shorter than min_seconds, more while longer than max_seconds."""
    total_frames = _int_arg("num_segments", "total_frames", total_frames, 1, INT32_MAX)
    fps = _float_arg("num_segments", "fps", fps)
    min_seconds = _float_arg("num_segments", "min_seconds", min_seconds)
    max_seconds = _float_arg("num_segments", "max_seconds", max_seconds)
    duration = total_frames / fps
    if not duration / max_seconds < INT32_MAX:
        raise ValueError(f"num_segments: {total_frames} frames at fps {fps} need too many segments")
    count = 10
    while duration / count < min_seconds and count > 1:
        count -= 1
    if duration / count > max_seconds:
        # The reference counts up one by one; duration / c never rises with c, so jump near the answer and
        # settle on the same smallest count with duration / count <= max_seconds.
        c = max(count, int(duration / max_seconds))
        while c > count and duration / (c - 1) <= max_seconds:
            c -= 1
        while duration / c > max_seconds:
            c += 1
        count = c
    return count


def segment_ranges(total_frames: int, fps: float) -> list[tuple[int, int]]:
    """0-based half-open frame ranges of segments 1..count; the last one runs to `total_frames`."""
    count = num_segments(total_frames, fps)
    per = total_frames // count
    return [((s - 1) * per, total_frames if s == count else s * per) for s in range(1, count + 1)]


def segment_time_ranges(total_frames: int, fps: float, segments: list[int]) -> list[tuple[float, float]]:
    """Time ranges (seconds, rounded to 2 decimals) of 1-based `segments`, as the reference computes them."""
    return time_ranges_of(segment_ranges(total_frames, fps), fps, segments)


def time_ranges_of(ranges, fps: float, segments: list[int]) -> list[tuple[float, float]]:
    """`segments` (1-based, checked) of a partition's frame `ranges`, as rounded time ranges."""
    out = []
    for i, s in enumerate(segments):
        s = _int_arg("segment_time_ranges", f"segments[{i}]", s, 1, len(ranges))
        out.append((round(ranges[s - 1][0] / fps, 2), round(ranges[s - 1][1] / fps, 2)))
    return out


def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int = 4 * 28 * 28,
                 max_pixels: int = 128 * 28 * 28) -> tuple[int, int]:
    """Qwen2.5-VL's resize: sides multiples of `factor`, area within [min_pixels, max_pixels].

    As qwen-vl-utils (the reference's vision_process.py): a side that rounds to 0 becomes `factor` before
    the area checks; the floor branch keeps sides >= factor as transformers does.
    """
    fn = "smart_resize"
    height = _int_arg(fn, "height", height, 1, MAX_SIDE)
    width = _int_arg(fn, "width", width, 1, MAX_SIDE)
    factor = _int_arg(fn, "factor", factor, 1, 2**16)
    max_pixels = _int_arg(fn, "max_pixels", max_pixels, 1, MAX_PIXELS_LIMIT)
    min_pixels = _int_arg(fn, "min_pixels", min_pixels, 0, max_pixels)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"smart_resize: aspect ratio must be at most 200, got {height}x{width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


FRAME_FACTOR = 2


def smart_nframes(nframes: int, total: int, fps: float, *, min_frames: int = 4, max_frames: int = 32) -> int:
    """The reference's frame count for `nframes` requested out of `total` candidates (even)."""
    fn = "smart_nframes"
    nframes = _int_arg(fn, "nframes", nframes, 1, INT32_MAX)
    total = _int_arg(fn, "total", total, 1, INT32_MAX)
    fps = _float_arg(fn, "fps", fps)
    min_frames = _int_arg(fn, "min_frames", min_frames, 0, INT32_MAX)
    max_frames = _int_arg(fn, "max_frames", max_frames, 0, INT32_MAX)
    if nframes < total:
        return max(FRAME_FACTOR, round(nframes / FRAME_FACTOR) * FRAME_FACTOR)
    # Fewer candidates than requested: the reference falls back to 2 fps within [min_frames, max_frames].
    lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    hi = math.floor(min(max_frames, total) / FRAME_FACTOR) * FRAME_FACTOR
    n = min(min(max(total / fps * 2.0, lo), hi), total)
    return max(FRAME_FACTOR, math.floor(n / FRAME_FACTOR) * FRAME_FACTOR)


def _time_range(i: int, r) -> tuple[float, float]:
    fn = "sample_frame_indices"
    try:
        start, end = (r["start"], r["end"]) if isinstance(r, dict) else r
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{fn}: time_ranges[{i}] must be {{'start', 'end'}} or (start, end), got {r!r}") \
            from None
    return (_float_arg(fn, f"time_ranges[{i}].start", start, positive=False),
            _float_arg(fn, f"time_ranges[{i}].end", end, positive=False))


def candidate_intervals(total_frames: int, fps: float, time_ranges) -> list[tuple[int, int]]:
    """Sorted disjoint inclusive [lo, hi] frame intervals a rewatch samples from (the whole video when the
    union of `time_ranges` is empty or shorter than FRAME_FACTOR frames)."""
    iv = []
    for i, r in enumerate(_items("sample_frame_indices", "time_ranges", time_ranges) if time_ranges else ()):
        start, end = _time_range(i, r)
        ps, pe = start * fps, end * fps
        if not (math.isfinite(ps) and math.isfinite(pe)):
            raise ValueError(f"sample_frame_indices: time_ranges[{i}] times fps overflows: {r!r}")
        lo = max(0, math.floor(ps))
        hi = min(total_frames - 1, math.ceil(pe) - 1)
        if lo <= hi:
            iv.append((lo, hi))
    iv.sort()
    merged: list[list[int]] = []
    for lo, hi in iv:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    if sum(hi - lo + 1 for lo, hi in merged) < FRAME_FACTOR:
        return [(0, total_frames - 1)]
    return [(lo, hi) for lo, hi in merged]


def sample_frame_indices(total_frames: int, fps: float, nframes: int, *, time_ranges=None,
                         frame_list=None) -> list[int]:
    """Sorted 0-based frame indices shown for the main video (`time_ranges=None`) or a rewatch.

    `time_ranges`: [(start_s, end_s)] or [{"start", "end"}]; candidates are floor(start*fps) ..
    ceil(end*fps)-1 over their union (the whole video if that is empty or shorter than 2 frames).
    `nframes` of them are taken at torch.linspace(0, len-1, n).round() (n from smart_nframes).
    `frame_list`: 1-based frames that must be included when they fall among the candidates.
    """
    fn = "sample_frame_indices"
    total_frames = _int_arg(fn, "total_frames", total_frames, 1, MAX_FRAMES_LIMIT)
    fps = _float_arg(fn, "fps", fps)
    nframes = _int_arg(fn, "nframes", nframes, 1, INT32_MAX)
    intervals = candidate_intervals(total_frames, fps, time_ranges)
    starts, offsets, count = [], [], 0
    for lo, hi in intervals:
        starts.append(lo)
        offsets.append(count)
        count += hi - lo + 1

    def cand(k: int) -> int:  # k-th candidate frame of the sorted union
        j = bisect_right(offsets, k) - 1
        return starts[j] + k - offsets[j]

    n = min(smart_nframes(nframes, count, fps), count)
    picked = {cand(i) for i in linspace_round(count - 1, n)}
    for i, f in enumerate(_items(fn, "frame_list", frame_list) if frame_list else ()):
        f = _int_arg(fn, f"frame_list[{i}]", f, -2**63, 2**63 - 1)
        j = bisect_right(starts, f - 1) - 1
        if j >= 0 and f - 1 <= intervals[j][1]:
            picked.add(f - 1)
    return sorted(picked)


def linspace_round(end: int, steps: int) -> list[int]:
    """torch.linspace(0, end, steps).round().long() (float32, round half to even), via torch itself."""
    import torch  # the oracle is torch's own float32 arithmetic

    return torch.linspace(0, end, steps).round().long().tolist()
