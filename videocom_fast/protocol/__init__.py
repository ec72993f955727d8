"""The protocol core: C++ (videocom_fast._C) when built, else the Python twin in `reference`.

Both implement the same functions with the same results (tests/test_protocol.py proves it on hypothesis
inputs and a corpus of nasty strings); VIDEOCOM_PROTOCOL=python|cpp forces one, `use(name)` switches at
run time (tests, benchmarks). The grammar itself is documented once, in reference.py's docstring.
"""
from __future__ import annotations

from .. import envs
from . import reference
from .reference import FRAME_FACTOR, KINDS, Action

_impl = reference


def _select(choice: str | None = None) -> None:
    global _impl
    choice = choice or envs.protocol_impl()
    if choice not in ("auto", "cpp", "python"):
        raise ValueError(f"VIDEOCOM_PROTOCOL must be auto, cpp or python, got {choice!r}")
    if choice == "python":
        _impl = reference
        return
    from . import cpp
    _impl = cpp if cpp.available() else reference
    if choice == "cpp" and _impl is reference:
        raise ImportError("VIDEOCOM_PROTOCOL=cpp but the C++ core (videocom_fast._C) is not built")


def use(name: str) -> None:
    """Switch the implementation: "auto", "cpp" or "python" (the override hook for tests and benchmarks)."""
    _select(name)


def implementation() -> str:
    return "cpp" if _impl is not reference else "python"


def parse_actions(text: str) -> list[Action]:
    return _impl.parse_actions(text)


def parse_action(text: str) -> Action | None:
    return _impl.parse_action(text)


def mentioned_tool(text: str) -> str | None:
    return _impl.mentioned_tool(text)


def num_segments(total_frames: int, fps: float, *, min_seconds: float = 10.0, max_seconds: float = 30.0) -> int:
    return _impl.num_segments(total_frames, fps, min_seconds=min_seconds, max_seconds=max_seconds)


def segment_ranges(total_frames: int, fps: float) -> list[tuple[int, int]]:
    return _impl.segment_ranges(total_frames, fps)


def segment_time_ranges(total_frames: int, fps: float, segments: list[int]) -> list[tuple[float, float]]:
    return _impl.segment_time_ranges(total_frames, fps, segments)


def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int = 4 * 28 * 28,
                 max_pixels: int = 128 * 28 * 28) -> tuple[int, int]:
    return _impl.smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def smart_nframes(nframes: int, total: int, fps: float, *, min_frames: int = 4, max_frames: int = 32) -> int:
    return _impl.smart_nframes(nframes, total, fps, min_frames=min_frames, max_frames=max_frames)


def sample_frame_indices(total_frames: int, fps: float, nframes: int, *, time_ranges=None,
                         frame_list=None) -> list[int]:
    return _impl.sample_frame_indices(total_frames, fps, nframes, time_ranges=time_ranges,
                                      frame_list=frame_list)


_select()

__all__ = ["Action", "KINDS", "parse_actions", "parse_action", "mentioned_tool", "segment_ranges",
           "segment_time_ranges", "num_segments", "smart_resize", "smart_nframes", "sample_frame_indices",
           "FRAME_FACTOR", "implementation", "use", "reference"]
