"""RA-GRPO rewards (spec section 6): accuracy, format, reasoning, and their weighted sum.

    from videocom_fast.rewards import combined_reward
    total, parts = combined_reward(completions, samples)     # parts: {"accuracy": [...], ...}

A completion is the model's text of one episode: its rounds joined by newlines (a list of round strings
is accepted too and joined here). A sample is a GRPO sample as `videocom_fast.data.load_samples(...,
kind="grpo")` returns it: `conversations` (question turn, gold answer turn starting with the letter),
`valid_segments` (ints), `valid_frames` (inclusive 1-based [start, end] ranges), `valid_bounding_box`
([frame, [x1, y1, x2, y2]] in ORIGINAL pixels), `video` (path; probed once for the frame size unless the
sample carries `frame_hw`). Gold boxes are rescaled to the resized frame the model was shown for
FIND_FRAME (smart_resize with the image pixel limits), as the reference's dataset does.

Two scoring modes, `reward_compat="fixed"` (default) and `"reference"`:
- "fixed" reads every completion with the protocol parser (`videocom_fast.protocol.parse_actions`), the
  one grammar the executor uses too (defect 5 of spec section 7), and differs from the reference in:
  1. accuracy is 0 without a FINAL_ANSWER action; the reference fell back to the first A-E letter of the
     whole text (defect 3);
  2. a list of rounds is joined with newlines; the reference joined them with nothing, so an action line
     could merge with the next round's text (defect 4);
  3. `FIND_SEGMENT(...) = s` scores segment s; the reference parsed the description as the number and the
     exception wiped every segment of the completion (defect 2);
  4. format = a FINAL_ANSWER (letter, dot, option text) with no tool call after it; repeated answer
     lines must name the same letter and the last one carries the option text; the
     reference's regex also accepted tool calls after the answer, and matched "FINAL_ANSWER" case-sensitively;
  5. boxes are unique (frame, box) pairs and every one counts once gold boxes exist (wrong if its frame has
     no gold box, or if no FIND_FRAME preceded it); the reference counted duplicates and silently skipped
     boxes on frames without a gold box;
  6. the predicted letter is that of the last FINAL_ANSWER; letters beyond E count (the reference's
     normalize_mcq only knew A-E).
  Every other difference follows from the grammar (each one checked against the reference's code on the
  strings of tests/test_rewards.py DIFFERENCES):
  - lowercase tool heads (`find_frame(...) = 42`) and a lowercase answer head (`final_answer: D. red`)
    count; the reference tested for the upper-case name with `in` before its case-insensitive regex,
    so it ignored them. A blank before the answer colon (`FINAL_ANSWER : D. red`) counts too.
  - the answer needs a capital letter and a dot: an answer letter without a dot (`FINAL_ANSWER: D`), a
    lower-case answer letter (`d. red`) or an answer in prose (`FINAL_ANSWER: Definitely red`, read by
    the reference as "D") score no accuracy; the reference took the first A-E letter, any case.
  - FIND_FRAME with a list of several numbers (`= [42, 7]`) is invalid and counts nothing; the reference
    scored every number as a frame (and zoomed on the last).
  - several calls on one line all count, in text order; the reference's `re.search` found the first
    call of each tool per line, and on a line holding both it applied the FIND_FRAME before any zoom
    (a zoom before a FIND_FRAME on its line went to the later frame).
  - only bracket boxes `[x1, y1, x2, y2]` are zooms, one or more per line: the paren zoom form
    `= (x1, y1, x2, y2)` and the bare zoom form `= x1, y1, x2, y2` are not (the executor does not run
    them either); the reference scored both, cut a zoom flat list of 8 (or 5..7) numbers into boxes of
    4, and ignored a second bracket box on the line.
  - a number over int32 invalidates its own action only; the reference scored it (a wrong frame), and a
    number over 4,300 digits (Python's int() limit) made it drop every frame, box or segment of the
    completion (its `except Exception`); a box too large for a float got IoU 0 there. Reference mode
    keeps all of these and never raises on completion text.
- "reference" transcribes the reference's reward_funcs.py / reward_utils.py logic (defects included; a
  list of rounds is joined with ""), so published numbers can be compared. Its total equals the
  reference's `reasoning_reward` (accuracy + reasoning score), the only reward its GRPO script used.

Malformed inputs raise ValueError naming the argument, the sample index and the field (e.g.
`samples[3]['valid_frames'][0]`); `completions` must be a list (a bare str would be scored per
character).
"""
from __future__ import annotations

import functools
import os
import re

from .protocol import parse_actions, smart_resize

IOU_THRESHOLD = 0.35
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 4 * 28 * 28, 128 * 28 * 28
DEFAULT_WEIGHTS = {"accuracy": 1.0, "reasoning": 1.0, "format": 0.0}
COMPAT_MODES = ("fixed", "reference")


# --- inputs ------------------------------------------------------------------------------------------

def _completion_text(c, i: int, joiner: str) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, (list, tuple)) and all(isinstance(r, str) for r in c):
        return joiner.join(c)
    raise ValueError(f"completions[{i}] must be a str or a list of round strings, got {type(c).__name__}")


def _batch(value, name: str, what: str) -> list:
    # NOTE: a bare str is a sequence too: scored as given, each CHARACTER would be one completion
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list with one {what} per episode, got a {type(value).__name__}"
                         + (f"; wrap a single one as [{name[:-1]}]" if isinstance(value, (str, dict)) else ""))
    return list(value)


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()


def _is_coord(v) -> bool:
    # finite and within int32: the IoU's float arithmetic cannot overflow on such boxes
    # (abs(v) <= 2**31 is False for nan and inf, and needs no float() of a huge int)
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= 2**31


def _check_sample(s, i: int) -> None:
    """Raise ValueError naming `samples[i]` and the field when a sample cannot be scored (the rules would
    otherwise die inside with an AttributeError/TypeError/OverflowError that names neither)."""
    where = f"samples[{i}]"
    if not isinstance(s, dict):
        raise ValueError(f"{where} must be a dict (a GRPO sample), got {type(s).__name__}")
    conv = s.get("conversations")
    if conv is not None and not (isinstance(conv, list) and all(isinstance(t, dict) for t in conv)):
        raise ValueError(f"{where}['conversations'] must be a list of turn dicts, got {_short(conv)}")
    checks = (("valid_segments", lambda v: _is_int(v), "segment numbers (ints)"),
              ("valid_frames", lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_is_int, v)),
               "[start, end] frame ranges (ints)"),
              ("valid_bounding_box", lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and _is_int(v[0])
               and isinstance(v[1], (list, tuple)) and len(v[1]) == 4 and all(map(_is_coord, v[1])),
               "[frame, [x1, y1, x2, y2]] entries (finite numbers of at most 2**31)"))
    for key, ok, what in checks:
        v = s.get(key)
        if v is None:
            continue
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"{where}[{key!r}] must be a list of {what}, got {_short(v)}")
        for k, e in enumerate(v):
            if not ok(e):
                raise ValueError(f"{where}[{key!r}][{k}] must be one of {what}, got {_short(e)}")
    hw = s.get("frame_hw")
    if hw is not None and not (isinstance(hw, (list, tuple)) and len(hw) == 2 and all(map(_is_int, hw))
                               and 0 < hw[0] <= 2**24 and 0 < hw[1] <= 2**24):
        raise ValueError(f"{where}['frame_hw'] must be [height, width] (positive ints), got {_short(hw)}")
    if s.get("valid_bounding_box") and hw is None and not isinstance(s.get("video"), (str, os.PathLike)):
        raise ValueError(f"{where}: a sample with valid_bounding_box needs 'frame_hw' or 'video' to rescale "
                         f"its boxes")


def _check(completions, samples, mode: str, *, need_samples: bool = True):
    """(texts, samples) after checking both; every error names the argument, index and field."""
    if mode not in COMPAT_MODES:
        raise ValueError(f"reward_compat must be one of {COMPAT_MODES}, got {mode!r}")
    completions = _batch(completions, "completions", "completion (a str or a list of round strings)")
    if samples is None and need_samples:
        raise ValueError("samples are required (one GRPO sample dict per completion), got None")
    if samples is not None:
        samples = _batch(samples, "samples", "sample dict")
        if len(samples) != len(completions):
            raise ValueError(f"completions and samples differ in length: {len(completions)} vs {len(samples)}")
        for i, s in enumerate(samples):
            _check_sample(s, i)
    joiner = "\n" if mode == "fixed" else ""
    return [_completion_text(c, i, joiner) for i, c in enumerate(completions)], samples


def gold_answer_text(sample: dict, i: int = 0) -> str:
    """The gold answer turn's text (GRPO: the first gpt turn; or a plain `answer` key)."""
    if isinstance(sample.get("answer"), str):
        return sample["answer"]
    for turn in sample.get("conversations", []):
        if turn.get("from") in ("gpt", "assistant"):
            return str(turn.get("value", ""))
    raise ValueError(f"samples[{i}] has no gold answer (no 'answer' key and no gpt turn in 'conversations')")


def gold_letter(sample: dict, i: int = 0) -> str:
    text = gold_answer_text(sample, i)
    acts = [a for a in parse_actions(text) if a.kind == "answer"]
    if acts:
        return acts[-1].values
    m = re.match(r"\s*([A-Za-z])(?![A-Za-z])", text)
    if m is None:
        raise ValueError(f"samples[{i}]: the gold answer {text[:40]!r} does not start with an option letter")
    return m.group(1).upper()


@functools.lru_cache(maxsize=4096)
def _probe_hw(path: str) -> tuple[int, int]:
    from .media import probe
    info = probe(path)
    return info.height, info.width


def resized_gold_boxes(sample: dict, *, min_pixels: int = IMAGE_MIN_PIXELS,
                       max_pixels: int = IMAGE_MAX_PIXELS) -> dict[int, list[int]]:
    """{frame: [x1, y1, x2, y2]} of the gold boxes in the resized frame's coordinates (as the reference:
    scale = resized / original per axis, round half to even, int)."""
    boxes = sample.get("valid_bounding_box") or []
    if not boxes:
        return {}
    hw = sample.get("frame_hw")
    if hw is None:
        if not sample.get("video"):
            raise ValueError("a sample with valid_bounding_box needs 'frame_hw' or 'video' to rescale its boxes")
        hw = _probe_hw(str(sample["video"]))
    h, w = int(hw[0]), int(hw[1])
    rh, rw = smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
    sx, sy = rw / w, rh / h
    out = {}
    for frame, (x1, y1, x2, y2) in boxes:
        out[int(frame)] = [int(round(x1 * sx)), int(round(y1 * sy)), int(round(x2 * sx)), int(round(y2 * sy))]
    return out


def box_iou(a, b) -> float:
    """IoU of two (x1, y1, x2, y2) boxes; 0 for degenerate ones (the reference's + 1e-6 guard kept)."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / float(area + 1e-6)


# --- fixed scoring (the protocol grammar) -------------------------------------------------------------

def _answers(text: str):
    return [a for a in parse_actions(text) if a.kind == "answer"]


def _fixed_accuracy(text: str, sample: dict, i: int) -> float:
    answers = _answers(text)
    return float(bool(answers) and answers[-1].values == gold_letter(sample, i))


def _fixed_format(text: str) -> float:
    # A well-formed episode commits to ONE answer letter: no tool call after the first answer, any repeated
    # answer names the same letter, and the last one carries its option text (as the spec's format regex
    # reads the end of the completion). Contradicting answers or a bare final "FINAL_ANSWER: B." are not.
    acts = parse_actions(text)
    answers = [a for a in acts if a.kind == "answer"]
    if not answers or acts[-1].kind != "answer":
        return 0.0
    first = acts.index(answers[0])
    return float(all(a.kind == "answer" for a in acts[first:])
                 and len({a.values for a in answers}) == 1 and bool(answers[-1].description.strip()))


def predicted_manipulations(text: str):
    """(segments set, frames set, [(frame | None, box)] unique in text order) by the protocol grammar."""
    segs, frames, boxes, seen = set(), set(), [], set()
    frame = None
    for a in parse_actions(text):
        if a.kind == "segment":
            segs.update(a.values)
        elif a.kind == "frame":
            frame = a.values[0]
            frames.add(frame)
        elif a.kind == "zoom":
            for b in a.values:
                key = (frame, tuple(b))
                if key not in seen:
                    seen.add(key)
                    boxes.append(key)
    return segs, frames, boxes


def manipulation_counts(text: str, sample: dict, image_pixels=None) -> dict[str, tuple[int, int, bool]]:
    """{"segment" | "frame" | "zoom": (correct, predicted, annotated)} by the fixed rules; a type counts
    toward the reasoning score only when the sample annotates it."""
    segs, frames, boxes = predicted_manipulations(text)
    valid_segments = set(int(s) for s in sample.get("valid_segments") or [])
    valid_frames = [(int(s), int(e)) for s, e in sample.get("valid_frames") or []]
    gold = resized_gold_boxes(sample, **_limits(image_pixels)) if boxes else {}
    return {
        "segment": (len(segs & valid_segments), len(segs), bool(valid_segments)),
        "frame": (sum(any(s <= f <= e for s, e in valid_frames) for f in frames), len(frames), bool(valid_frames)),
        "zoom": (sum(f in gold and box_iou(b, gold[f]) >= IOU_THRESHOLD for f, b in boxes), len(boxes), bool(gold)),
    }


def _fixed_reasoning(text: str, sample: dict, image_pixels=None) -> float:
    counts = [c for c in manipulation_counts(text, sample, image_pixels).values() if c[2]]
    total = sum(n for _, n, _ in counts)
    return sum(c for c, _, _ in counts) / total if total else 0.0


# --- reference scoring (transcribed from train/src/train/reward_{funcs,utils}.py, defects kept) -------

def _ref_normalize_mcq(ans: str) -> str:
    m = re.match(r"([A-Ea-e])", ans.strip())
    return m.group(1).upper() if m else ans.strip()


def _ref_accuracy(content: str, sol: str) -> float:
    # defect 3: without "FINAL_ANSWER:" the whole text is the "answer" and its first A-E letter counts
    pred = content.split("FINAL_ANSWER:")[-1].strip()
    return 1.0 if _ref_normalize_mcq(pred) == _ref_normalize_mcq(sol) else 0.0


def _ref_format(content: str) -> float:
    return 1.0 if re.fullmatch(r"(?s).*FINAL_ANSWER:\s*[A-Z]\.\s*.+$", content.strip()) else 0.0


def _ref_numbers(s: str) -> list[int]:
    return [int(x.strip()) for x in s.split(",") if x.strip().isdigit()]


def _ref_segments(text: str) -> list[int]:
    vals = []
    try:
        for step in text.split("\n"):
            if "FIND_SEGMENT" not in step:
                continue
            m = re.search(r"FIND_SEGMENT\((.*?)\)\s*=\s*\[([0-9,\s]+)\]", step, flags=re.IGNORECASE)
            if m:
                vals.extend(_ref_numbers(m.group(2)))
                continue
            m = re.search(r"FIND_SEGMENT\((.*?)\)\s*=\s*(\d+)", step, flags=re.IGNORECASE)
            if m:
                vals.append(int(m.group(1).strip()))  # defect 2: group(1) is the description
        return list(set(vals))
    except Exception:  # noqa: BLE001 - the reference's `except Exception`
        return []  # defect 2: one bad line wipes every segment (so does a number over 4,300 digits)


def _ref_frames(text: str) -> list[int]:
    # the reference wraps this in `except Exception: return []`: int() of a number over 4,300 digits raises
    # (Python's int/str conversion limit) and the completion then predicts no frame at all
    try:
        return _ref_frames_unguarded(text)
    except Exception:  # noqa: BLE001
        return []


def _ref_frames_unguarded(text: str) -> list[int]:
    vals = []
    for step in text.split("\n"):
        if "FIND_FRAME" not in step:
            continue
        m = re.search(r"FIND_FRAME\((.*?)\)\s*=\s*\[([0-9,\s]+)\]", step, flags=re.IGNORECASE)
        if m:
            vals.extend(_ref_numbers(m.group(2)))
            continue
        m = re.search(r"FIND_FRAME\((.*?)\)\s*=\s*(\d+)", step, flags=re.IGNORECASE)
        if m:
            vals.append(int(m.group(2).strip()))
    return list(set(vals))


def _ref_boxes(text: str) -> list[tuple]:
    if "SPATIAL_ZOOM" not in text:
        return []
    try:   # as _ref_frames: the reference's `except Exception` drops every box of the completion
        return _ref_boxes_unguarded(text)
    except Exception:  # noqa: BLE001
        return []


def _ref_boxes_unguarded(text: str) -> list[tuple]:
    pairs, frame = [], None
    for step in text.split("\n"):
        if "FIND_FRAME" in step:
            m = re.search(r"FIND_FRAME\((.*?)\)\s*=\s*\[([0-9,\s]+)\]", step, flags=re.IGNORECASE)
            if m:
                nums = _ref_numbers(m.group(2))
                if nums:
                    frame = nums[-1]  # defect 5: the executor took the first number, this the last
            else:
                m = re.search(r"FIND_FRAME\((.*?)\)\s*=\s*(\d+)", step, flags=re.IGNORECASE)
                if m:
                    frame = int(m.group(2).strip())
        if "SPATIAL_ZOOM" in step:
            m = re.search(r"SPATIAL_ZOOM\((.*?)\)\s*=\s*\[([0-9,\s]+)\]", step, flags=re.IGNORECASE)
            if m:
                nums = _ref_numbers(m.group(2))
                for k in range(0, len(nums) - 3, 4):
                    pairs.append((frame, nums[k:k + 4]))
            for pat in (r"SPATIAL_ZOOM\((.*?)\)\s*=\s*\((\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\)",
                        r"SPATIAL_ZOOM\((.*?)\)\s*=\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)"):
                m = re.search(pat, step, flags=re.IGNORECASE)
                if m:
                    pairs.append((frame, [int(m.group(g)) for g in (2, 3, 4, 5)]))
    return pairs


def _ref_iou(a, b) -> float:
    # compute_bbox_iou's `except Exception: iou = 0.0`: a box of 160-digit numbers overflows float()
    try:
        return box_iou(a, b)
    except Exception:  # noqa: BLE001
        return 0.0


def _ref_reasoning_score(content: str, gt: dict, gold_boxes: dict) -> float:
    """The reference's reasoning score without its accuracy term; `gold_boxes` already rescaled."""
    valid_segments, valid_frames = gt.get("valid_segments") or [], gt.get("valid_frames") or []
    segs, frames, boxes = _ref_segments(content), _ref_frames(content), _ref_boxes(content)
    correct = total = 0
    if valid_segments and segs:
        correct += sum(1 for s in segs if s in valid_segments)
        total += len(segs)
    if valid_frames and frames:
        correct += sum(1 for f in frames if any(s <= f <= e for s, e in valid_frames))
        total += len(frames)
    if boxes and gold_boxes:
        for frame, box in boxes:
            if frame is None or int(frame) not in gold_boxes:
                continue
            total += 1
            correct += _ref_iou(box, gold_boxes[int(frame)]) >= IOU_THRESHOLD
    return correct / total if total > 0 else 0.0


def _ref_gold_boxes(content: str, sample: dict, image_pixels=None) -> dict:
    return resized_gold_boxes(sample, **_limits(image_pixels)) if "SPATIAL_ZOOM" in content else {}


def _limits(image_pixels) -> dict:
    """resized_gold_boxes kwargs for the (min_pixels, max_pixels) the FIND_FRAME images were shown with."""
    if image_pixels is None:
        return {}
    lo, hi = image_pixels
    return {"min_pixels": int(lo), "max_pixels": int(hi)}


# --- public API --------------------------------------------------------------------------------------

def accuracy_reward(completions, samples, *, reward_compat: str = "fixed") -> list[float]:
    """1.0 when the predicted option letter equals the gold one, else 0.0."""
    texts, samples = _check(completions, samples, reward_compat)
    if reward_compat == "reference":
        return [_ref_accuracy(t, gold_answer_text(s, i)) for i, (t, s) in enumerate(zip(texts, samples))]
    return [_fixed_accuracy(t, s, i) for i, (t, s) in enumerate(zip(texts, samples))]


def format_reward(completions, samples=None, *, reward_compat: str = "fixed") -> list[float]:
    """1.0 when the episode ends in a well-formed FINAL_ANSWER (see the module note for the two rules)."""
    texts, _ = _check(completions, samples, reward_compat, need_samples=False)
    fn = _ref_format if reward_compat == "reference" else _fixed_format
    return [fn(t) for t in texts]


def reasoning_reward(completions, samples, *, reward_compat: str = "fixed", image_pixels=None) -> list[float]:
    """Correct / total over the predicted manipulations, in [0, 1] (without the accuracy term)."""
    texts, samples = _check(completions, samples, reward_compat)
    if reward_compat == "reference":
        return [_ref_reasoning_score(t, s, _ref_gold_boxes(t, s, image_pixels)) for t, s in zip(texts, samples)]
    return [_fixed_reasoning(t, s, image_pixels) for t, s in zip(texts, samples)]


REWARD_FUNCS = {"accuracy": accuracy_reward, "format": format_reward, "reasoning": reasoning_reward}


def combined_reward(completions, samples, weights: dict | None = None, *,
                    reward_compat: str = "fixed", image_pixels=None) -> tuple[list[float], dict[str, list[float]]]:
    """(total per completion, {component: per-completion values}) with total = sum_k weights[k] * part_k.

    Default weights {accuracy: 1, reasoning: 1, format: 0} give the method's reward in [0, 2]; in
    "reference" mode that total equals the reference's `reasoning_reward` exactly. Components with weight 0
    are still computed and returned for logging.
    """
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    unknown = set(weights) - set(REWARD_FUNCS)
    if unknown:
        raise ValueError(f"weights: unknown reward names {sorted(unknown)}; known: {sorted(REWARD_FUNCS)}")
    _, samples = _check(completions, samples, reward_compat)
    completions = list(completions)
    # NOTE: image_pixels = (min, max) pixel limits of the FIND_FRAME images the model saw; the gold boxes are
    # rescaled with them (default: the protocol's 4*28*28 .. 128*28*28)
    parts = {k: fn(completions, samples, reward_compat=reward_compat) for k, fn in REWARD_FUNCS.items()
             if k != "reasoning"}
    parts["reasoning"] = reasoning_reward(completions, samples, reward_compat=reward_compat,
                                          image_pixels=image_pixels)
    total = [sum(float(weights.get(k, 0.0)) * parts[k][i] for k in parts) for i in range(len(completions))]
    return total, parts
