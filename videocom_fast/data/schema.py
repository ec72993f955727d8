"""The SFT / GRPO sample schema (spec section 5): load a JSON list or JSONL file, check every sample, resolve
media paths.

    samples = load_samples("data/synth/sft.json", kind="sft")     # -> list[dict], each with "index"

Field names are the reference's (train/src/dataset/sft_dataset.py, grpo_dataset.py):
  every sample  "video" (str | [str]) or "image" (str | [str]); "conversations": [{"from": "human"|"gpt",
                "value": str, ...}], alternating, starting with the human question turn, which carries the
                `<video>`/`<image>` tag and an `Options:` line, optionally "media": {"frame_list": [n]} and
                "segment_frame_list": {"<segment>": [n]} (also accepted at the top level)
  sft           later human turns may carry "media": {"type": "video", "time_ranges": [{"start", "end"}]
                (or "start_time"/"end_time"), "frame_list": [n]} or {"type": "image", "image": path,
                "bbox": [[x1, y1, x2, y2]], "frame": n} plus the matching tag in "value"; the last turn is
                gpt and holds FINAL_ANSWER
  grpo          turn 1 is the gpt gold answer and starts with the option letter; optional "answer" (the
                same letter), "valid_segments": [s], "valid_frames": [[start, end]] (1-based, inclusive),
                "valid_bounding_box": [[frame, [x1, y1, x2, y2]]] (original pixels)
Frame numbers are 1-based. Relative media paths are resolved against the JSON file's directory (URLs are
left alone); with check_files=True a missing local file is an error. Anything unexpected raises ValueError
naming the file, the sample index, the field and what was expected: nothing is silently dropped. Returned
samples are the original dicts (resolved paths, plus "index": position in the file).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from .. import protocol

KINDS = ("sft", "grpo")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_TAGS = ("<video>", "<image>")


class _Bad(Exception):
    def __init__(self, field: str, expected: str, got=None, show: bool = True):
        got_s = repr(got) if show else ""
        if len(got_s) > 120:
            got_s = got_s[:117] + "..."
        super().__init__(f"{field}: expected {expected}" + (f", got {got_s}" if show else ""))


# --- small checks -------------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _pos_int(field: str, v) -> int:
    if not (_is_int(v) and v >= 1):
        raise _Bad(field, "a positive integer (1-based)", v)
    return v


def _list(field: str, v, min_len: int = 0) -> list:
    if not isinstance(v, list) or len(v) < min_len:
        raise _Bad(field, f"a list{f' of at least {min_len} items' if min_len else ''}", v)
    return v


def _frames(field: str, v) -> None:
    for j, f in enumerate(_list(field, v)):
        _pos_int(f"{field}[{j}]", f)


def _box(field: str, v) -> None:
    if not (isinstance(v, list) and len(v) == 4 and all(_is_num(x) and x >= 0 for x in v)):
        raise _Bad(field, "[x1, y1, x2, y2] of 4 non-negative numbers", v)
    if not (v[2] > v[0] and v[3] > v[1]):
        raise _Bad(field, "x2 > x1 and y2 > y1", v)


def _resolve(field: str, v, base: Path, check_files: bool) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _Bad(field, "a non-empty path string", v)
    if _URL.match(v):
        return v
    p = os.path.normpath(v if os.path.isabs(v) else base / v)
    if check_files and not os.path.isfile(p):
        raise _Bad(field, f"an existing file ({p} does not exist)", v)
    return p


def _resolve_many(field: str, v, base: Path, check_files: bool):
    if isinstance(v, list):
        if not v:
            raise _Bad(field, "a path or a non-empty list of paths", v)
        return [_resolve(f"{field}[{j}]", x, base, check_files) for j, x in enumerate(v)]
    return _resolve(field, v, base, check_files)


# --- the sample ---------------------------------------------------------------------------------------

def _check_segment_frame_list(field: str, v) -> None:
    if not isinstance(v, dict):
        raise _Bad(field, 'a dict {"<segment>": [frame, ...]}', v)
    for k, frames in v.items():
        if not (_is_int(k) and k >= 1) and not (isinstance(k, str) and k.isascii() and k.isdigit() and int(k) >= 1):
            raise _Bad(f"{field} key", "a positive segment number", k)
        _frames(f"{field}[{k!r}]", frames)


def _check_question(conv: list, media_kind: str) -> None:
    q = conv[0]
    tag = f"<{media_kind}>"
    if tag not in q["value"]:
        raise _Bad("conversations[0].value", f"the question with the {tag} tag", q["value"])
    if "Options:" not in q["value"]:
        raise _Bad("conversations[0].value", "the question with an 'Options: A. ..., B. ...' line", q["value"])
    if "media" in q:
        m = q["media"]
        if not isinstance(m, dict):
            raise _Bad("conversations[0].media", "a dict", m)
        if "frame_list" in m:
            _frames("conversations[0].media.frame_list", m["frame_list"])
    if "segment_frame_list" in q:
        _check_segment_frame_list("conversations[0].segment_frame_list", q["segment_frame_list"])


def _check_turns(conv) -> None:
    _list("conversations", conv, min_len=2)
    for t, turn in enumerate(conv):
        want = "human" if t % 2 == 0 else "gpt"
        if not isinstance(turn, dict):
            raise _Bad(f"conversations[{t}]", 'a dict {"from", "value"}', turn)
        if turn.get("from") != want:
            raise _Bad(f"conversations[{t}].from", f"{want!r} (turns alternate, starting with human)",
                       turn.get("from"))
        if not isinstance(turn.get("value"), str):
            raise _Bad(f"conversations[{t}].value", "a string", turn.get("value"))
        if want == "gpt" and "media" in turn:
            raise _Bad(f"conversations[{t}].media", "no media on a gpt turn (observations are human turns)",
                       turn["media"])


def _check_later_media(t: int, turn: dict, base: Path, check_files: bool) -> None:
    field = f"conversations[{t}].media"
    value = turn["value"]
    m = turn.get("media")
    if m is None:
        for tag in _TAGS:
            if tag in value:
                raise _Bad(f"conversations[{t}].value", f"no {tag} tag in a turn without media", value)
        return
    if not isinstance(m, dict) or m.get("type") not in ("video", "image"):
        raise _Bad(field, 'a dict with "type": "video" or "image"', m)
    if f"<{m['type']}>" not in value:
        raise _Bad(f"conversations[{t}].value", f"the <{m['type']}> tag of its media", value)
    if m["type"] == "video":
        if "time_ranges" in m:
            for j, r in enumerate(_list(f"{field}.time_ranges", m["time_ranges"], min_len=1)):
                f = f"{field}.time_ranges[{j}]"
                if not isinstance(r, dict) or not (_is_num(r.get("start")) and _is_num(r.get("end"))):
                    raise _Bad(f, '{"start": seconds, "end": seconds} with finite numbers', r)
                if not 0 <= r["start"] < r["end"]:
                    raise _Bad(f, "0 <= start < end", r)
        elif "start_time" in m or "end_time" in m:
            for k in ("start_time", "end_time"):
                if k in m and not (_is_num(m[k]) and m[k] >= 0):
                    raise _Bad(f"{field}.{k}", "a finite number of seconds >= 0", m[k])
        else:
            raise _Bad(field, 'a rewatch with "time_ranges" (or "start_time"/"end_time")', m)
        if "frame_list" in m:
            _frames(f"{field}.frame_list", m["frame_list"])
    else:
        m["image"] = _resolve(f"{field}.image", m.get("image"), base, check_files)
        if "bbox" in m:
            for j, b in enumerate(_list(f"{field}.bbox", m["bbox"], min_len=1)):
                _box(f"{field}.bbox[{j}]", b)
        if "frame" in m:
            _pos_int(f"{field}.frame", m["frame"])


def _check_sft(s: dict, base: Path, check_files: bool) -> None:
    conv = s["conversations"]
    if len(conv) % 2:
        raise _Bad("conversations", "an even number of turns ending with the gpt answer", len(conv))
    for t in range(2, len(conv), 2):
        _check_later_media(t, conv[t], base, check_files)
    if not any(a.kind == "answer" for a in protocol.parse_actions(conv[-1]["value"])):
        raise _Bad(f"conversations[{len(conv) - 1}].value", "the last gpt turn to hold 'FINAL_ANSWER: <X>. ...'",
                   conv[-1]["value"])


def _check_grpo(s: dict) -> None:
    conv = s["conversations"]
    gold = conv[1]["value"].strip()
    if not re.match(r"[A-Z](\.|\s|$)", gold):
        raise _Bad("conversations[1].value", "the gold answer starting with its option letter ('B. ...')", gold)
    if "answer" in s and s["answer"] != gold[0]:
        raise _Bad("answer", f"the gold turn's letter {gold[0]!r}", s["answer"])
    for t in range(2, len(conv)):
        if "media" in conv[t]:
            raise _Bad(f"conversations[{t}].media", "no media after the gold answer in a GRPO sample", conv[t]["media"])
    if "valid_segments" in s:
        for j, v in enumerate(_list("valid_segments", s["valid_segments"])):
            _pos_int(f"valid_segments[{j}]", v)
    if "valid_frames" in s:
        for j, r in enumerate(_list("valid_frames", s["valid_frames"])):
            if not (isinstance(r, list) and len(r) == 2 and all(_is_int(x) and x >= 1 for x in r) and r[0] <= r[1]):
                raise _Bad(f"valid_frames[{j}]", "[start, end] 1-based frames with start <= end", r)
    if "valid_bounding_box" in s:
        for j, e in enumerate(_list("valid_bounding_box", s["valid_bounding_box"])):
            if not (isinstance(e, list) and len(e) == 2):
                raise _Bad(f"valid_bounding_box[{j}]", "[frame, [x1, y1, x2, y2]]", e)
            _pos_int(f"valid_bounding_box[{j}][0]", e[0])
            _box(f"valid_bounding_box[{j}][1]", e[1])


def check_sample(s, kind: str, base: Path, check_files: bool = True) -> dict:
    """Validate one sample in place (paths resolved); raises _Bad(field, expected, got)."""
    if not isinstance(s, dict):
        raise _Bad("sample", "a JSON object", s)
    if ("video" in s) == ("image" in s):
        raise _Bad("video", 'exactly one of "video" and "image"', sorted(k for k in s if k in ("video", "image")))
    media_kind = "video" if "video" in s else "image"
    s[media_kind] = _resolve_many(media_kind, s[media_kind], base, check_files)
    _check_turns(s.get("conversations"))
    _check_question(s["conversations"], media_kind)
    if "segment_frame_list" in s:
        _check_segment_frame_list("segment_frame_list", s["segment_frame_list"])
    if kind == "sft":
        _check_sft(s, base, check_files)
    else:
        _check_grpo(s)
    return s


# --- files --------------------------------------------------------------------------------------------

def _read(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    head = text.lstrip()[:1]
    if head == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return data
    if head not in ("{", ""):
        raise ValueError(f"{path}: expected a JSON list of samples or JSONL (one object per line), "
                         f"got text starting with {head!r}")
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} (sample {len(rows)}) is not valid JSON ({e})") from None
    return rows


def load_samples(path, kind: str = "sft", *, check_files: bool = True) -> list[dict]:
    """All samples of a JSON list or JSONL file, validated, paths absolute, each with "index"."""
    if kind not in KINDS:
        raise ValueError(f"load_samples: kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"load_samples: path must be a JSON or JSONL file, got {str(path)!r}")
    data = _read(path)
    if not data:
        raise ValueError(f"{path}: no samples")
    base = path.resolve().parent
    seen_ids: dict = {}
    out = []
    for i, s in enumerate(data):
        try:
            check_sample(s, kind, base, check_files)
            if "id" in s:
                if s["id"] in seen_ids:
                    raise _Bad("id", f"a unique id (sample {seen_ids[s['id']]} has it too)", s["id"])
                seen_ids[s["id"]] = i
        except _Bad as e:
            raise ValueError(f"{path}: sample {i}: {e}") from None
        except TypeError as e:  # e.g. an unhashable id
            raise ValueError(f"{path}: sample {i}: {e}") from None
        s["index"] = i
        out.append(s)
    return out
