"""The Video-CoM protocol in plain Python: the twin of the C++ core (csrc/protocol), and its oracle.

Everything the executor, the rewards and the data pipeline need to agree on lives here once
(../shared/spec/videocom.md sections 1, 2 and 4):

- `parse_actions(text)` / `parse_action(text)`: the manipulation grammar of the model's output.
- `segment_ranges(total_frames, fps)`: the segment partition burned into the overlay.
- `smart_resize(h, w, ...)`: Qwen2.5-VL's resize rule.
- `sample_frame_indices(...)`: which frames the main video and a rewatch show.

Grammar decisions (each fixes a numbered defect of spec section 7):
- `FIND_SEGMENT(...) = s` parses the number s, not the description (defect 2); an invalid action never
  wipes the valid ones around it.
- Actions are found anywhere in the text, in text order, so rounds joined with or without newlines parse
  the same (defect 4).
- FIND_FRAME names exactly one frame (`= n` or `= [n]`); the executor and the rewards both call this
  module, so they cannot disagree about which number was meant (defect 5).
Matching is ASCII (tool names case-insensitive, `\\s` and `\\d` ASCII only) so the C++ core can match
byte for byte; `start`/`end` are offsets in Python characters. No input raises: anything malformed,
empty, or with a number that does not fit a signed 32-bit int is simply not an action.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

INT32_MAX = 2**31 - 1
KINDS = ("segment", "frame", "zoom", "answer")
_TOOL_KIND = {"find_segment": "segment", "find_frame": "frame", "spatial_zoom": "zoom"}

# A tool head; the description runs to the first ')' that is followed by '= <value>' on the same line.
_HEAD = re.compile(r"\b(FIND_SEGMENT|FIND_FRAME|SPATIAL_ZOOM)\(|\bFINAL_ANSWER\s*:", re.I | re.A)
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


def _line_end(text: str, pos: int) -> int:
    m = _LINE_END.search(text, pos)
    return m.start() if m else len(text)


def _parse_tool(text: str, kind: str, head_end: int) -> Action | None:
    eol = _line_end(text, head_end)
    m = _DESC_END.search(text, head_end, eol)
    if m is None:
        return None
    desc, vpos = text[head_end:m.start()], m.end()
    if kind == "zoom":
        boxes, pos, end = [], vpos, vpos
        while (b := _BOX.match(text, pos, eol)) is not None:
            vals = tuple(_to_int(g) for g in b.groups())
            if None in vals:
                return None
            boxes.append(vals)
            end = b.end()
            pos = _BOX_SEP.match(text, end, eol).end()
        return Action("zoom", boxes, desc, 0, end) if boxes else None
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
    if kind == "frame" and len(nums) != 1:
        return None
    return Action(kind, nums, desc, 0, end)


def parse_actions(text: str) -> list[Action]:
    """All valid actions in `text`, in text order. Never raises."""
    if not isinstance(text, str):
        return []
    out: list[Action] = []
    pos = 0
    while True:
        h = _HEAD.search(text, pos)
        if h is None:
            return out
        if h.group(1) is None:  # FINAL_ANSWER:
            a = _ANSWER.match(text, h.end())
            if a is not None:
                eol = _line_end(text, a.end())
                out.append(Action("answer", a.group(1), text[a.end():eol].strip(), h.start(), a.end()))
                pos = a.end()
                continue
            pos = h.end()
            continue
        act = _parse_tool(text, _TOOL_KIND[h.group(1).lower()], h.end())
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


# --- segments, resize, sampling (spec sections 1 and 4) -----------------------------------------------

def num_segments(total_frames: int, fps: float, *, min_seconds: float = 10.0, max_seconds: float = 30.0) -> int:
    duration = total_frames / fps
    count = 10
    while duration / count < min_seconds and count > 1:
        count -= 1
    while duration / count > max_seconds:
        count += 1
    return count


def segment_ranges(total_frames: int, fps: float) -> list[tuple[int, int]]:
    """0-based half-open frame ranges of segments 1..count; the last one runs to `total_frames`."""
    if total_frames <= 0 or not fps > 0:
        raise ValueError(f"segment_ranges: need total_frames > 0 and fps > 0, got {total_frames}, {fps}")
    count = num_segments(total_frames, fps)
    per = total_frames // count
    return [((s - 1) * per, total_frames if s == count else s * per) for s in range(1, count + 1)]


def segment_time_ranges(total_frames: int, fps: float, segments: list[int]) -> list[tuple[float, float]]:
    """Time ranges (seconds, rounded to 2 decimals) of 1-based `segments`, as the reference computes them."""
    ranges = segment_ranges(total_frames, fps)
    return [(round(ranges[s - 1][0] / fps, 2), round(ranges[s - 1][1] / fps, 2)) for s in segments]


def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int = 4 * 28 * 28,
                 max_pixels: int = 128 * 28 * 28) -> tuple[int, int]:
    """Qwen2.5-VL's resize: sides multiples of `factor`, area within [min_pixels, max_pixels]."""
    if height <= 0 or width <= 0:
        raise ValueError(f"smart_resize: height and width must be positive, got {height}x{width}")
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
    """The reference's frame count for `nframes` requested out of `total` candidates (even, <= total)."""
    if nframes < total:
        return max(FRAME_FACTOR, round(nframes / FRAME_FACTOR) * FRAME_FACTOR)
    # Fewer candidates than requested: the reference falls back to 2 fps within [min_frames, max_frames].
    lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    hi = math.floor(min(max_frames, total) / FRAME_FACTOR) * FRAME_FACTOR
    n = min(min(max(total / fps * 2.0, lo), hi), total)
    return max(FRAME_FACTOR, math.floor(n / FRAME_FACTOR) * FRAME_FACTOR)


def sample_frame_indices(total_frames: int, fps: float, nframes: int, *, time_ranges=None,
                         frame_list=None) -> list[int]:
    """Sorted 0-based frame indices shown for the main video (`time_ranges=None`) or a rewatch.

    `time_ranges`: [(start_s, end_s)] or [{"start", "end"}]; candidates are floor(start*fps) ..
    ceil(end*fps)-1 over their union (the whole video if that is empty or shorter than 2 frames).
    `frame_list`: 1-based frames that must be included when they fall among the candidates.
    """
    if total_frames <= 0 or not fps > 0 or nframes <= 0:
        raise ValueError(f"sample_frame_indices: need positive total_frames, fps, nframes; "
                         f"got {total_frames}, {fps}, {nframes}")
    cand: list[int] = list(range(total_frames))
    if time_ranges:
        s: set[int] = set()
        for r in time_ranges:
            start, end = (r["start"], r["end"]) if isinstance(r, dict) else r
            lo = max(0, math.floor(start * fps))
            hi = min(total_frames - 1, math.ceil(end * fps) - 1)
            s.update(range(lo, hi + 1))
        if len(s) >= FRAME_FACTOR:
            cand = sorted(s)
    n = smart_nframes(nframes, len(cand), fps)
    if n > len(cand):
        n = len(cand)
    # torch.linspace(0, len-1, n).round(): float32 linspace, round half to even
    idx = _linspace_round(len(cand) - 1, n)
    picked = {cand[i] for i in idx}
    if frame_list:
        cset = set(cand)
        picked |= {f - 1 for f in frame_list if isinstance(f, int) and (f - 1) in cset}
    return sorted(picked) if frame_list else sorted(cand[i] for i in idx)


def _linspace_round(end: int, steps: int) -> list[int]:
    import torch  # the oracle is torch's own float32 arithmetic

    return torch.linspace(0, end, steps).round().long().tolist()
