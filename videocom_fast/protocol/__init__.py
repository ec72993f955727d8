"""The protocol core: C++ (videocom_fast._C) when built, else the Python twin in `reference`.

Both implement the same functions with the same results (tests/test_protocol.py proves it on hypothesis
inputs and a corpus of nasty strings); VIDEOCOM_PROTOCOL=python|cpp forces one.
"""
from __future__ import annotations

from .. import envs
from . import reference
from .reference import (FRAME_FACTOR, Action, mentioned_tool, num_segments, segment_time_ranges,
                        smart_nframes)

_impl = reference


def _select():
    global _impl
    choice = envs.protocol_impl()
    if choice == "python":
        _impl = reference
        return
    try:
        from . import cpp
        _impl = cpp if cpp.available() else reference
    except ImportError:
        _impl = reference
    if choice == "cpp" and _impl is reference:
        raise ImportError("VIDEOCOM_PROTOCOL=cpp but the C++ core (videocom_fast._C) is not built")


def implementation() -> str:
    return "cpp" if _impl is not reference else "python"


def parse_actions(text: str) -> list[Action]:
    return _impl.parse_actions(text)


def parse_action(text: str) -> Action | None:
    return _impl.parse_action(text)


def segment_ranges(total_frames: int, fps: float) -> list[tuple[int, int]]:
    return _impl.segment_ranges(total_frames, fps)


def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int = 4 * 28 * 28,
                 max_pixels: int = 128 * 28 * 28) -> tuple[int, int]:
    return _impl.smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def sample_frame_indices(total_frames: int, fps: float, nframes: int, *, time_ranges=None,
                         frame_list=None) -> list[int]:
    return _impl.sample_frame_indices(total_frames, fps, nframes, time_ranges=time_ranges,
                                      frame_list=frame_list)


_select()

__all__ = ["Action", "parse_actions", "parse_action", "mentioned_tool", "segment_ranges",
           "segment_time_ranges", "num_segments", "smart_resize", "smart_nframes", "sample_frame_indices",
           "FRAME_FACTOR", "implementation", "reference"]
