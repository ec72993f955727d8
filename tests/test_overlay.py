"""The Segment/Frame overlay: labels present and right, fps/size/frame count kept, rest of the frame kept.

Oracle for "right": the label patch rendered for the segment that protocol.segment_ranges assigns (and
for the 1-based frame number) matches the decoded label area far better than the patch of any other
segment or frame number does.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from helpers_media import make_frames, read_index, write_video
from videocom_fast import protocol
from videocom_fast.media import open_video
from videocom_fast.media.overlay import _label_patch, draw_label, font_px, label_box, overlay_video

N, FPS, H, W = 200, 8, 128, 224   # 25 s -> 2 segments of 100 frames


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("overlay")
    src = write_video(d / "in.mp4", make_frames(N, H, W, seed=random.randrange(2**31)), fps=FPS, codec="h264")
    out = d / "out.mp4"
    info = overlay_video(src, out)
    return str(src), str(out), info


def _lines(frame, size):
    """The two label lines of a decoded frame (top, bottom), as int16 arrays of the patch size."""
    h = size + 2 * max(2, size // 5)
    lw = label_box(H, W)[2]
    f = np.asarray(frame).astype(np.int16)
    return f[:h, :lw], f[h:2 * h, :lw]


def test_keeps_fps_size_and_count(pair):
    src, out, info = pair
    a, b = open_video(src), open_video(out)
    assert (b.num_frames, b.height, b.width) == (a.num_frames, a.height, a.width) == (N, H, W)
    assert b.fps == pytest.approx(a.fps) and info["num_frames"] == N and info["segments"] == 2


def test_labels_name_the_right_segment_and_frame(pair):
    src, out, _ = pair
    b = open_video(out)
    size = font_px(H)
    assert protocol.segment_ranges(N, FPS) == [(0, 100), (100, 200)]
    lw = label_box(H, W)[2]
    for i in (0, 57, 99, 100, 173, N - 1):
        top, bottom = _lines(b.get_frames([i])[0], size)
        seg = 1 if i < 100 else 2
        assert np.abs(top - _label_patch(f"Segment-{seg}", size, lw)).mean() < 6
        assert np.abs(bottom - _label_patch(f"Frame-{i + 1}", size, lw)).mean() < 6
        assert _closer(top, f"Segment-{seg}", [f"Segment-{3 - seg}", f"Segment-{seg + 2}"], size, lw)
        wrong = [f"Frame-{i + 2}", f"Frame-{i}", f"Frame-{i + 11}"]
        assert _closer(bottom, f"Frame-{i + 1}", wrong, size, lw)


def _closer(line, right, wrongs, size, lw) -> bool:
    """Where the right and a wrong label differ, the decoded line is much nearer the right one."""
    r = _label_patch(right, size, lw).astype(np.int16)
    for wrong in wrongs:
        w = _label_patch(wrong, size, lw).astype(np.int16)
        mask = (r != w).any(axis=2)
        if np.abs(line - r)[mask].mean() * 2 > np.abs(line - w)[mask].mean():
            return False
    return True


def test_label_area_changed_rest_kept(pair):
    src, out, _ = pair
    idx = [0, 120, N - 1]
    a = open_video(src).get_frames(idx).numpy().astype(np.int16)
    b = open_video(out).get_frames(idx).numpy().astype(np.int16)
    x1, y1, x2, y2 = label_box(H, W)
    assert np.abs(a[:, y1:y2, x1:x2] - b[:, y1:y2, x1:x2]).mean() > 40
    rest = np.ones((H, W), bool)
    rest[y1:y2 + 4, x1:x2 + 4] = False   # + a few pixels of codec ringing around the label
    assert np.abs(a[:, rest] - b[:, rest]).mean() < 8   # only re-encoding loss outside the label
    assert [read_index(f) for f in b] == idx   # the barcode right of the label survives


def test_vp9_output(tmp_path):
    n = 24
    src = write_video(tmp_path / "in.mp4", make_frames(n, 64, 160, seed=1), fps=6, codec="h264")
    info = overlay_video(src, tmp_path / "out.webm", codec="vp9")
    b = open_video(tmp_path / "out.webm")
    assert b.num_frames == n == info["num_frames"] and b.codec == "vp9" and b.fps == pytest.approx(6)


def test_draw_label_in_place_on_tiny_and_odd_frames():
    for h, w in ((9, 13), (37, 51), (720, 1280)):
        f = np.full((h, w, 3), 200, np.uint8)
        out = draw_label(f, 3, 12345)
        assert out is f and (f != 200).any()
        x1, y1, x2, y2 = label_box(h, w)
        assert (f[y2:, :] == 200).all() and (f[:, x2:] == 200).all()


def test_bad_inputs(tmp_path, pair):
    with pytest.raises(ValueError, match="nope.mp4"):
        overlay_video(tmp_path / "nope.mp4", tmp_path / "o.mp4")
    with pytest.raises(ValueError, match="out_path"):
        overlay_video(pair[0], pair[0])
    with pytest.raises(ValueError, match="codec"):
        overlay_video(pair[0], tmp_path / "o.mp4", codec="h266")
