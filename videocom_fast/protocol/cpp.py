"""The protocol core in C++ (videocom_fast._C.protocol_*), with reference.py's signatures and return types.

The binding (csrc/protocol/bind_protocol.cpp) checks arguments with the same bounds and ValueErrors as the
Python twin and returns plain tuples; this module only turns them into `Action`s and keeps the keyword-only
signatures. tests/test_protocol.py checks that both agree on every input it can think of.
"""
from __future__ import annotations

from .reference import Action

try:
    from .. import _C
    _HAVE = hasattr(_C, "protocol_parse_actions")
except ImportError:  # the extension is not built: dispatch falls back to the Python twin
    _C = None
    _HAVE = False


def available() -> bool:
    return _HAVE


def parse_actions(text: str) -> list[Action]:
    """All valid actions in `text`, in text order. Never raises."""
    return [Action(k, v, d, s, e) for k, v, d, s, e in _C.protocol_parse_actions(text)]


def parse_action(text: str) -> Action | None:
    raw = _C.protocol_parse_actions(text)
    return Action(*raw[0]) if raw else None


def mentioned_tool(text: str) -> str | None:
    return _C.protocol_mentioned_tool(text)


def num_segments(total_frames: int, fps: float, *, min_seconds: float = 10.0, max_seconds: float = 30.0) -> int:
    return _C.protocol_num_segments(total_frames, fps, min_seconds, max_seconds)


def segment_ranges(total_frames: int, fps: float) -> list[tuple[int, int]]:
    return _C.protocol_segment_ranges(total_frames, fps)


def segment_time_ranges(total_frames: int, fps: float, segments: list[int]) -> list[tuple[float, float]]:
    from .reference import time_ranges_of

    return time_ranges_of(_C.protocol_segment_ranges(total_frames, fps), fps, segments)


def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int = 4 * 28 * 28,
                 max_pixels: int = 128 * 28 * 28) -> tuple[int, int]:
    return _C.protocol_smart_resize(height, width, factor, min_pixels, max_pixels)


def smart_nframes(nframes: int, total: int, fps: float, *, min_frames: int = 4, max_frames: int = 32) -> int:
    return _C.protocol_smart_nframes(nframes, total, fps, min_frames, max_frames)


def sample_frame_indices(total_frames: int, fps: float, nframes: int, *, time_ranges=None,
                         frame_list=None) -> list[int]:
    return _C.protocol_sample_frame_indices(total_frames, fps, nframes, time_ranges, frame_list)


def linspace_round(end: int, steps: int) -> list[int]:
    """torch.linspace(0, end, steps).round().long().tolist(), bit-exact, without torch."""
    return _C.protocol_linspace_round(end, steps)
