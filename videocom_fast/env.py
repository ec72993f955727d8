"""ManipulationEnv: executes one Video-CoM episode's manipulations on cached frames (spec sections 3, 4).

The model's text of one assistant round goes in; the next user turn comes out as an `Observation`:
media items (uint8 frames at original resolution plus the crop box and pixel limits the preprocessing
kernel needs) and the protocol's reply text. Nothing touches disk: frames come from a `FrameCache` that
the 8 rollouts of a group share (`env.fork()` per rollout), so each frame is decoded at most once.

    env = ManipulationEnv(sample, cache=cache)      # opens + checks the video now (ValueError naming it)
    prompt_video = env.main_video()                 # MediaItem: 32 uniform frames + the sample's frame_list
    obs = env.step("... FIND_SEGMENT(the tag) = [3]")   # Observation(text, media, action, reason, done)

Reply rules (spec section 3): the round's FINAL_ANSWER ends the episode; otherwise the FIRST tool action
runs; a tool that was mentioned but could not be parsed gets its text without media ("unparsable");
no action at all gets "Choose the final answer from the provided options." ("no_action"). Every bad
request gets its tool's text without media and a machine-readable `reason`; `step` never raises.

Deliberate departures from the reference (spec section 7):
- defect 6: SPATIAL_ZOOM boxes are in the coordinates of the resized frame the model saw; they are mapped
  back to original pixels before cropping (the reference cropped the full-resolution frame unscaled).
- defect 7: a rewatch always includes the sample's `segment_frame_list` frames of the chosen segments.
- FIND_FRAME uses the one grammar module (defect 5); an invalid FIND_FRAME, or one whose frame fails to
  decode ("error:VideoError"), clears the selected frame, so a following zoom is refused
  ("zoom_before_frame") instead of cropping a stale frame.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field

import torch

from . import protocol
from .media import FrameCache, open_video

TEXT_SEGMENT = "Continue solving the question after rewatching the selected segment."
TEXT_FRAME = "Continue solving the question with the selected frame."
TEXT_ZOOM = "Continue solving the question by focusing on the zoomed region."
TEXT_NONE = "Choose the final answer from the provided options."
_TOOL_TEXT = {"segment": TEXT_SEGMENT, "frame": TEXT_FRAME, "zoom": TEXT_ZOOM}

MAX_VALUES = 64   # a request naming more segments or boxes than this is refused ("too_many_values")
_VIDEO_TAG = re.compile(r"\n?<video>\n?")


@dataclass(frozen=True)
class MediaConfig:
    main_nframes: int = 32
    rewatch_nframes: int = 16
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 360 * 420
    image_min_pixels: int = 4 * 28 * 28
    image_max_pixels: int = 128 * 28 * 28


@dataclass
class MediaItem:
    kind: str                  # "video" | "image"
    frames: torch.Tensor       # uint8 (T, H, W, 3), original resolution (image: T == 1, the full frame)
    box: tuple | None          # image crop (x1, y1, x2, y2) in original pixels, x2/y2 exclusive
    min_pixels: int
    max_pixels: int
    key: tuple                 # same request -> same key (vision-output caching)
    indices: tuple             # 0-based source frame indices
    fps: float | None          # video: sample_fps = nframes / frames_in_span * video_fps; image: None
    resized_hw: tuple          # (h, w) after smart_resize of the (cropped) size

    @property
    def second_per_grid_t(self) -> float:
        return 2.0 / self.fps if self.kind == "video" and self.fps else 0.0


@dataclass
class Observation:
    text: str
    media: list = field(default_factory=list)
    action: object = None      # videocom_fast.protocol.Action | None
    reason: str = "ok"
    done: bool = False


def _frame_list(sample) -> list[int]:
    fl = sample.get("frame_list")
    if fl is None:
        conv = sample.get("conversations") or [{}]
        media = conv[0].get("media") if isinstance(conv[0], dict) else None
        fl = media.get("frame_list") if isinstance(media, dict) else None
    return [int(f) for f in fl] if fl else []


def _segment_frame_list(sample) -> dict[int, list[int]]:
    sfl = sample.get("segment_frame_list")
    if sfl is None:
        conv = sample.get("conversations") or [{}]
        sfl = conv[0].get("segment_frame_list") if isinstance(conv[0], dict) else None
    if not sfl:
        return {}
    # JSON object keys are strings; the reference looked them up by int and so never found them
    return {int(k): [int(f) for f in v] for k, v in sfl.items()}


def _question(sample) -> str:
    conv = sample.get("conversations")
    if not conv or not isinstance(conv[0], dict) or not isinstance(conv[0].get("value"), str):
        raise ValueError("sample: 'conversations'[0]['value'] must hold the question text")
    return _VIDEO_TAG.sub("", conv[0]["value"]).strip()


class ManipulationEnv:
    def __init__(self, sample: dict, cache: FrameCache | None = None, config: MediaConfig = MediaConfig(),
                 *, source=None):
        if not isinstance(sample, dict) or not isinstance(sample.get("video"), str):
            raise ValueError("sample: expected a dict with a 'video' path (as load_samples returns)")
        self.sample = sample
        self.config = config
        self.question = _question(sample)
        self.frame_list = _frame_list(sample)
        self.segment_frame_list = _segment_frame_list(sample)
        self.source = source if source is not None else open_video(sample["video"])
        self.cache = cache if cache is not None else FrameCache()
        n, fps = self.source.num_frames, self.source.fps
        self.segments = protocol.segment_ranges(n, fps)
        self._frame: int | None = None          # 0-based index of the last valid FIND_FRAME
        self._frame_hw: tuple | None = None     # the resized (h, w) the model saw it at

    # --- episode bookkeeping ----------------------------------------------------------------------

    def fork(self) -> "ManipulationEnv":
        """A new episode on the same sample: shares source, cache and config, fresh frame selection."""
        env = copy.copy(self)
        env._frame = env._frame_hw = None
        return env

    def reset(self):
        self._frame = self._frame_hw = None

    def prefetch(self):
        """Start decoding the main video's frames in the cache's background thread."""
        return self.cache.prefetch(self.source, self._main_indices())

    # --- media builders ---------------------------------------------------------------------------

    def _video_item(self, indices: list[int], nframes_sampled: int, span: int) -> MediaItem:
        cfg, src = self.config, self.source
        frames = self.cache.get_frames(src, indices)
        # sample_fps as the reference computes it: the sampled count before frame_list additions
        fps = nframes_sampled / span * src.fps
        hw = protocol.smart_resize(src.height, src.width, min_pixels=cfg.video_min_pixels,
                                   max_pixels=cfg.video_max_pixels)
        key = ("video", src.key, tuple(indices), cfg.video_min_pixels, cfg.video_max_pixels)
        return MediaItem("video", frames, None, cfg.video_min_pixels, cfg.video_max_pixels, key,
                         tuple(indices), fps, hw)

    def _image_item(self, index: int, box: tuple | None) -> MediaItem:
        cfg, src = self.config, self.source
        frames = self.cache.get_frames(src, [index])
        h, w = (src.height, src.width) if box is None else (box[3] - box[1], box[2] - box[0])
        hw = protocol.smart_resize(h, w, min_pixels=cfg.image_min_pixels, max_pixels=cfg.image_max_pixels)
        key = ("image", src.key, index, box, cfg.image_min_pixels, cfg.image_max_pixels)
        return MediaItem("image", frames, box, cfg.image_min_pixels, cfg.image_max_pixels, key, (index,),
                         None, hw)

    def _candidates(self, time_ranges) -> int:
        """How many frames the sampler chooses from (the span in sample_fps)."""
        n, fps = self.source.num_frames, self.source.fps
        if not time_ranges:
            return n
        s: set[int] = set()
        for start, end in time_ranges:
            lo, hi = max(0, math.floor(start * fps)), min(n - 1, math.ceil(end * fps) - 1)
            s.update(range(lo, hi + 1))
        return len(s) if len(s) >= protocol.FRAME_FACTOR else n

    def _sampled_video(self, nframes: int, time_ranges, frame_list) -> MediaItem:
        n, fps = self.source.num_frames, self.source.fps
        idx = protocol.sample_frame_indices(n, fps, nframes, time_ranges=time_ranges, frame_list=frame_list)
        span = self._candidates(time_ranges)
        sampled = min(protocol.smart_nframes(nframes, span, fps), span)
        return self._video_item(idx, sampled, span)

    def _main_indices(self) -> list[int]:
        return protocol.sample_frame_indices(self.source.num_frames, self.source.fps,
                                             self.config.main_nframes, frame_list=self.frame_list)

    def main_video(self) -> MediaItem:
        """The prompt's video: `main_nframes` uniform frames plus the sample's `frame_list` frames."""
        return self._sampled_video(self.config.main_nframes, None, self.frame_list)

    # --- step -------------------------------------------------------------------------------------

    def step(self, round_text: str) -> Observation:
        """Execute the first manipulation of one assistant round. Never raises."""
        try:
            return self._step(round_text)
        except Exception as e:  # noqa: BLE001 - a rollout must never die on one bad round
            kind = protocol.mentioned_tool(round_text) if isinstance(round_text, str) else None
            return Observation(_TOOL_TEXT.get(kind, TEXT_NONE), [], None, f"error:{type(e).__name__}")

    def _step(self, text) -> Observation:
        actions = protocol.parse_actions(text) if isinstance(text, str) else []
        for a in actions:
            if a.kind == "answer":
                return Observation("", [], a, "answer", True)
        if not actions:
            kind = protocol.mentioned_tool(text) if isinstance(text, str) else None
            if kind is not None:
                return Observation(_TOOL_TEXT[kind], [], None, "unparsable")
            return Observation(TEXT_NONE, [], None, "no_action")
        a = actions[0]
        if a.kind == "segment":
            return self._rewatch(a)
        if a.kind == "frame":
            return self._find_frame(a)
        return self._zoom(a)

    def _refuse(self, a, reason: str) -> Observation:
        return Observation(_TOOL_TEXT[a.kind], [], a, reason)

    def _rewatch(self, a) -> Observation:
        if len(a.values) > MAX_VALUES:
            return self._refuse(a, "too_many_values")
        segs = sorted(set(a.values))
        count = len(self.segments)
        if any(not 1 <= s <= count for s in segs):
            return self._refuse(a, "unknown_segment")
        if len(segs) == count:  # rewatching everything is not a rewatch (spec section 1)
            return self._refuse(a, "all_segments")
        n, fps = self.source.num_frames, self.source.fps
        time_ranges = protocol.segment_time_ranges(n, fps, segs)
        # defect 7: the annotated frames of the chosen segments are always among the rewatched ones
        frame_list = [f for s in segs for f in self.segment_frame_list.get(s, [])]
        item = self._sampled_video(self.config.rewatch_nframes, time_ranges, frame_list or None)
        return Observation(TEXT_SEGMENT, [item], a, "ok")

    def _find_frame(self, a) -> Observation:
        number = a.values[0]
        # NOTE: the selection is cleared before anything can fail: a refused or undecodable frame must not
        # leave the previous one selected, or the next zoom would crop a stale frame and report "ok"
        self._frame = self._frame_hw = None
        if not 1 <= number <= self.source.num_frames:   # 1-based frame numbers (spec section 1)
            return self._refuse(a, "frame_out_of_range")
        item = self._image_item(number - 1, None)
        self._frame, self._frame_hw = number - 1, item.resized_hw
        return Observation(TEXT_FRAME, [item], a, "ok")

    def _zoom(self, a) -> Observation:
        if self._frame is None:
            return self._refuse(a, "zoom_before_frame")
        if len(a.values) > MAX_VALUES:
            return self._refuse(a, "too_many_values")
        items = []
        for box in a.values:
            orig = self.box_to_original(box)
            if orig is not None:
                items.append(self._image_item(self._frame, orig))
        if not items:
            return self._refuse(a, "bad_box")
        return Observation(TEXT_ZOOM, items, a, "ok")

    def box_to_original(self, box) -> tuple | None:
        """The last frame's zoom `box` (resized coordinates) in original pixels, or None if bad."""
        return resized_box_to_original(box, self._frame_hw, (self.source.height, self.source.width))


def resized_box_to_original(box, resized_hw, original_hw) -> tuple | None:
    """Map (x1, y1, x2, y2) in the resized frame's coordinates to original pixels (defect 6).

    Outward rounding (floor the start, ceil the end), so the crop covers what the model pointed at.
    None for a bad box: inverted or empty, entirely outside the resized frame, or a crop whose aspect
    ratio Qwen's resize refuses (> 200). A box partly outside is clamped to the frame."""
    (rh, rw), (H, W) = resized_hw, original_hw
    x1, y1, x2, y2 = box
    if x1 >= x2 or y1 >= y2 or x1 >= rw or y1 >= rh:
        return None
    X1, Y1 = math.floor(x1 * W / rw), math.floor(y1 * H / rh)
    X2, Y2 = min(W, math.ceil(min(x2, rw) * W / rw)), min(H, math.ceil(min(y2, rh) * H / rh))
    if X2 <= X1 or Y2 <= Y1:
        return None
    if max(X2 - X1, Y2 - Y1) / min(X2 - X1, Y2 - Y1) > 200:
        return None
    return (X1, Y1, X2, Y2)


__all__ = ["ManipulationEnv", "MediaConfig", "MediaItem", "Observation", "TEXT_SEGMENT", "TEXT_FRAME",
           "TEXT_ZOOM", "TEXT_NONE", "MAX_VALUES", "resized_box_to_original"]
