"""ManipulationEnv: the protocol's replies (spec section 3) on a real barcoded video.

The video: 360 frames at 8 fps (45 s -> 4 segments of 90 frames), 96x160. Every frame carries a barcode
of its index (helpers_media.read_index), so media contents are checked against the indices independently
of the decoder. Expected indices, boxes and segment frames are written out by hand from the spec's rules.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from helpers_media import make_frames, read_index, write_video
from videocom_fast import protocol
from videocom_fast.env import (MAX_VALUES, TEXT_FRAME, TEXT_NONE, TEXT_SEGMENT, TEXT_ZOOM, ManipulationEnv,
                               MediaConfig, resized_box_to_original)
from videocom_fast.media import FrameCache, VideoError

N, FPS, H, W = 360, 8, 96, 160
RESIZED = (84, 168)   # smart_resize(96, 160, 4*28*28, 128*28*28): round to multiples of 28


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    d = tmp_path_factory.mktemp("env")
    return str(write_video(d / "v.mp4", make_frames(N, H, W, seed=random.randrange(2**31)), fps=FPS,
                           codec="h264", gop=16))


def sample_for(video, **extra):
    s = {"video": video, "conversations": [
        {"from": "human", "value": "<video>\nWhat is shown?\nOptions: A. x, B. y, C. z, D. w"},
        {"from": "gpt", "value": "A. x"}]}
    s.update(extra)
    return s


@pytest.fixture
def env(video):
    return ManipulationEnv(sample_for(video), cache=FrameCache())


def barcodes(item):
    return [read_index(f) for f in item.frames]


def test_question_and_resize_constant():
    assert protocol.smart_resize(H, W) == RESIZED


def test_question_text(env):
    assert env.question == "What is shown?\nOptions: A. x, B. y, C. z, D. w"


def test_main_video(env):
    item = env.main_video()
    expected = torch.linspace(0, N - 1, 32).round().long().tolist()
    assert item.kind == "video" and list(item.indices) == expected
    assert barcodes(item) == expected
    assert item.fps == pytest.approx(32 / N * FPS) and item.second_per_grid_t == pytest.approx(2 / item.fps)
    assert (item.min_pixels, item.max_pixels) == (128 * 28 * 28, 360 * 420)
    assert item.resized_hw == protocol.smart_resize(H, W, min_pixels=128 * 28 * 28, max_pixels=360 * 420)
    assert item.box is None and item.frames.dtype == torch.uint8 and item.frames.shape == (32, H, W, 3)
    assert env.main_video().key == item.key and hash(item.key)


def test_main_video_includes_frame_list(video):
    env = ManipulationEnv(sample_for(video, frame_list=[2, 300]))
    idx = list(env.main_video().indices)
    assert 1 in idx and 299 in idx and len(idx) == 34
    # the reference's place for it: conversations[0]["media"]["frame_list"]
    s = sample_for(video)
    s["conversations"][0]["media"] = {"frame_list": [2]}
    assert 1 in ManipulationEnv(s).main_video().indices


def test_rewatch_one_segment(env):
    obs = env.step("The tag is early on. FIND_SEGMENT(start) = [2]")
    assert (obs.text, obs.reason, obs.done) == (TEXT_SEGMENT, "ok", False) and len(obs.media) == 1
    item = obs.media[0]
    # segment 2 of 4 covers frames 90..179; 16 of its 90 frames, linspace-rounded
    expected = [90 + i for i in torch.linspace(0, 89, 16).round().long().tolist()]
    assert list(item.indices) == expected and barcodes(item) == expected
    assert item.fps == pytest.approx(16 / 90 * FPS)
    assert env.step("FIND_SEGMENT(start) = 2").media[0].key == item.key   # single-integer form (defect 2)


def test_rewatch_union_and_last_segment(env):
    item = env.step("FIND_SEGMENT(a) = [4, 1]").media[0]
    assert all(i < 90 or i >= 270 for i in item.indices) and min(item.indices) == 0
    assert max(item.indices) == N - 1 and len(item.indices) == 16


def test_rewatch_uses_segment_frame_list(video):
    """Defect 7: the annotated frames of the chosen segment are always shown (JSON keys are strings)."""
    plain = ManipulationEnv(sample_for(video)).step("FIND_SEGMENT(x) = [2]").media[0]
    assert 100 not in plain.indices
    for s in (sample_for(video, segment_frame_list={"2": [101], "3": [200]}),
              sample_for(video)):
        if "segment_frame_list" not in s:
            s["conversations"][0]["segment_frame_list"] = {"2": [101]}   # where the reference keeps it
        item = ManipulationEnv(s).step("FIND_SEGMENT(x) = [2]").media[0]
        assert 100 in item.indices and 199 not in item.indices and len(item.indices) == 17
        assert read_index(item.frames[list(item.indices).index(100)]) == 100


@pytest.mark.parametrize("text, reason", [
    ("FIND_SEGMENT(all) = [1, 2, 3, 4]", "all_segments"),
    ("FIND_SEGMENT(all) = [4, 3, 2, 1, 1]", "all_segments"),
    ("FIND_SEGMENT(none) = [0]", "unknown_segment"),
    ("FIND_SEGMENT(past) = [2, 5]", "unknown_segment"),
    ("FIND_SEGMENT(huge) = [99999999999999]", "unparsable"),
    ("FIND_SEGMENT(x) = [a, b]", "unparsable"),
])
def test_bad_rewatch_is_text_only(env, text, reason):
    obs = env.step(text)
    assert (obs.text, obs.media, obs.reason, obs.done) == (TEXT_SEGMENT, [], reason, False)


def test_absurd_lists_are_refused(env):
    many = ", ".join(str(1 + i % 3) for i in range(10**6))
    obs = env.step(f"FIND_SEGMENT(everything) = [{many}]")
    assert (obs.text, obs.media, obs.reason) == (TEXT_SEGMENT, [], "too_many_values")
    env.step("FIND_FRAME(x) = [5]")
    boxes = " ".join("[1, 1, 9, 9]" for _ in range(MAX_VALUES + 1))
    obs = env.step(f"SPATIAL_ZOOM(x) = {boxes}")
    assert (obs.text, obs.media, obs.reason) == (TEXT_ZOOM, [], "too_many_values")


@pytest.mark.parametrize("n", [1, 2, 180, N])
def test_find_frame(env, n):
    obs = env.step(f"Look closer. FIND_FRAME(the tag) = [{n}]")
    assert (obs.text, obs.reason) == (TEXT_FRAME, "ok") and len(obs.media) == 1
    item = obs.media[0]
    assert item.kind == "image" and item.indices == (n - 1,) and item.box is None and item.fps is None
    assert item.frames.shape == (1, H, W, 3) and read_index(item.frames[0]) == n - 1
    assert item.resized_hw == RESIZED and (item.min_pixels, item.max_pixels) == (4 * 28 * 28, 128 * 28 * 28)


@pytest.mark.parametrize("n", [0, N + 1, 10**9])
def test_find_frame_out_of_range(env, n):
    obs = env.step(f"FIND_FRAME(x) = [{n}]")
    assert (obs.text, obs.media, obs.reason) == (TEXT_FRAME, [], "frame_out_of_range")


def test_zoom_maps_resized_box_to_original(env):
    """Defect 6: the box is in the 84x168 frame the model saw; the crop is in 96x160 pixels."""
    env.step("FIND_FRAME(x) = [37]")
    obs = env.step("SPATIAL_ZOOM(bottom right) = [84, 42, 168, 84]")
    assert (obs.text, obs.reason) == (TEXT_ZOOM, "ok")
    (item,) = obs.media
    assert item.box == (80, 48, 160, 96)     # 84*160/168, 42*96/84, 168*160/168, 84*96/84
    assert read_index(item.frames[0]) == 36 and item.frames.shape == (1, H, W, 3)
    assert item.resized_hw == protocol.smart_resize(48, 80)
    # outward rounding: x1 = floor(10*160/168) = 9, y1 = floor(5*96/84) = 5, x2 = ceil(47.6) = 48, y2 = 38
    (item,) = env.step("SPATIAL_ZOOM(a) = [10, 5, 50, 33]").media
    assert item.box == (9, 5, 48, 38)
    assert item.key != obs.media[0].key


def test_zoom_box_covers_what_the_model_pointed_at():
    rng = random.Random()
    for _ in range(300):
        oh, ow = rng.randint(20, 1200), rng.randint(20, 1200)
        rh, rw = rng.randint(1, 40) * 28, rng.randint(1, 40) * 28
        x1, y1 = rng.randrange(rw), rng.randrange(rh)
        x2, y2 = rng.randint(x1 + 1, rw), rng.randint(y1 + 1, rh)
        got = resized_box_to_original((x1, y1, x2, y2), (rh, rw), (oh, ow))
        if got is None:   # only for crops Qwen's resize refuses
            continue
        X1, Y1, X2, Y2 = got
        assert 0 <= X1 < X2 <= ow and 0 <= Y1 < Y2 <= oh
        assert X1 * rw / ow <= x1 + 1e-9 and X2 * rw / ow >= x2 - 1e-9
        assert Y1 * rh / oh <= y1 + 1e-9 and Y2 * rh / oh >= y2 - 1e-9


@pytest.mark.parametrize("box, reason", [
    ("[50, 5, 10, 33]", "bad_box"),        # inverted
    ("[10, 10, 10, 20]", "bad_box"),       # empty
    ("[168, 0, 200, 10]", "bad_box"),      # right of the image
    ("[0, 84, 10, 90]", "bad_box"),        # below the image
])
def test_bad_boxes(env, box, reason):
    env.step("FIND_FRAME(x) = [3]")
    obs = env.step(f"SPATIAL_ZOOM(x) = {box}")
    assert (obs.text, obs.media, obs.reason) == (TEXT_ZOOM, [], reason)


def test_box_partly_outside_is_clamped_and_bad_boxes_dropped(env):
    env.step("FIND_FRAME(x) = [3]")
    obs = env.step("SPATIAL_ZOOM(x) = [100, 50, 500, 500], [9, 9, 1, 1], [0, 0, 28, 28]")
    assert obs.reason == "ok" and [m.box for m in obs.media] == [(95, 57, 160, 96), (0, 0, 27, 32)]


def test_aspect_ratio_refused():
    assert resized_box_to_original((0, 0, 2800, 1), (28, 2800), (28, 2800)) is None


def test_zoom_needs_a_valid_frame(env):
    obs = env.step("SPATIAL_ZOOM(x) = [1, 1, 20, 20]")
    assert (obs.text, obs.media, obs.reason) == (TEXT_ZOOM, [], "zoom_before_frame")
    env.step("FIND_FRAME(x) = [3]")
    assert env.step("SPATIAL_ZOOM(x) = [1, 1, 20, 20]").reason == "ok"
    env.step("FIND_FRAME(x) = [0]")   # an invalid frame clears the selection
    assert env.step("SPATIAL_ZOOM(x) = [1, 1, 20, 20]").reason == "zoom_before_frame"


class _FailingSource:
    """The real source, except that decoding frame `bad` (0-based) raises VideoError (a corrupt GOP)."""

    def __init__(self, src, bad: int):
        self._src, self._bad = src, bad

    def __getattr__(self, name):
        return getattr(self._src, name)

    def get_frames(self, indices):
        if self._bad in indices:
            raise VideoError(f"{self._src.path}: decoding frames failed (injected at frame {self._bad})")
        return self._src.get_frames(indices)


def test_failed_frame_decode_clears_the_selection(video):
    """A FIND_FRAME whose decode fails must not leave the previous frame selected: the zoom after it is
    refused, never a crop of the stale frame reported "ok"."""
    from videocom_fast.media import open_video
    env = ManipulationEnv(sample_for(video), cache=FrameCache(), source=_FailingSource(open_video(video), 99))
    assert env.step("FIND_FRAME(x) = [3]").reason == "ok"
    obs = env.step("FIND_FRAME(x) = [100]")
    assert (obs.text, obs.media, obs.reason) == (TEXT_FRAME, [], "error:VideoError")
    obs = env.step("SPATIAL_ZOOM(x) = [1, 1, 20, 20]")
    assert (obs.media, obs.reason) == ([], "zoom_before_frame")
    (item,) = env.step("FIND_FRAME(x) = [5]").media   # a later good frame selects again
    assert env.step("SPATIAL_ZOOM(x) = [1, 1, 20, 20]").media[0].indices == (4,)


def test_answer_no_action_unparsable(env):
    obs = env.step("FIND_SEGMENT(x) = [2]\nSo the answer is clear. FINAL_ANSWER: B. y")
    assert (obs.text, obs.media, obs.reason, obs.done) == ("", [], "answer", True)
    assert obs.action.kind == "answer" and obs.action.values == "B"
    obs = env.step("I think about it some more.")
    assert (obs.text, obs.media, obs.reason, obs.done) == (TEXT_NONE, [], "no_action", False)
    obs = env.step("FIND_FRAME(the tag) = [twelve]")
    assert (obs.text, obs.media, obs.reason) == (TEXT_FRAME, [], "unparsable")
    for junk in (None, 42, b"FIND_FRAME(x) = [3]", "", "\x00" * 100):
        obs = env.step(junk)
        assert obs.reason == "no_action" and obs.media == []


def test_first_tool_action_wins(env):
    obs = env.step("FIND_FRAME(a) = [12] and then FIND_SEGMENT(b) = [1]")
    assert obs.reason == "ok" and obs.media[0].indices == (11,)


def test_fork_shares_cache_not_state(video):
    cache = FrameCache()
    env = ManipulationEnv(sample_for(video), cache=cache)
    env.step("FIND_FRAME(x) = [9]")
    child = env.fork()
    assert child.source is env.source and child.cache is cache
    assert child.step("SPATIAL_ZOOM(x) = [1, 1, 20, 20]").reason == "zoom_before_frame"
    assert env.step("SPATIAL_ZOOM(x) = [1, 1, 20, 20]").reason == "ok"
    decoded = cache.stats()["decoded"]
    for e in [env.fork() for _ in range(8)]:
        e.main_video()
        e.step("FIND_SEGMENT(x) = [3]")
    once = cache.stats()["decoded"]
    assert once > decoded
    for e in [env.fork() for _ in range(8)]:
        e.main_video()
        e.step("FIND_SEGMENT(x) = [3]")
    assert cache.stats()["decoded"] == once   # the second group decodes nothing


def test_prefetch_main_video(env):
    env.prefetch().result(timeout=30)
    decoded = env.cache.stats()["decoded"]
    env.main_video()
    assert env.cache.stats()["decoded"] == decoded


def test_config_is_honoured(video):
    cfg = MediaConfig(main_nframes=8, rewatch_nframes=4, image_max_pixels=28 * 28 * 4)
    env = ManipulationEnv(sample_for(video), config=cfg)
    assert len(env.main_video().indices) == 8
    assert len(env.step("FIND_SEGMENT(x) = [1]").media[0].indices) == 4
    (item,) = env.step("FIND_FRAME(x) = [1]").media
    assert item.max_pixels == 28 * 28 * 4 and math.prod(item.resized_hw) <= 28 * 28 * 4


def test_bad_samples_fail_at_construction(tmp_path, video):
    with pytest.raises(ValueError, match="missing.mp4"):
        ManipulationEnv(sample_for(str(tmp_path / "missing.mp4")))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(open(video, "rb").read()[:5000])
    with pytest.raises(ValueError, match="cut.mp4"):
        ManipulationEnv(sample_for(str(cut)))
    with pytest.raises(ValueError, match="video"):
        ManipulationEnv({"conversations": []})
    with pytest.raises(ValueError, match="conversations"):
        ManipulationEnv({"video": video, "conversations": []})
