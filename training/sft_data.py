"""SFT examples: a Video-CoM conversation -> token ids, labels, 3-D M-RoPE positions and its media tensors.

Legend: L tokens, P patch rows, T frames, H/W pixels.

A sample (spec section 5) is `{"video": path, "conversations": [{"from": "human"|"gpt", "value", "media"?}]}`.
Turn 0 holds `<video>` and the question; later human turns may carry a `media` object:
- `{"type": "video", "time_ranges": [{"start", "end"}], "frame_list": [...]}`: a rewatch, sampled from the
  sample's video like the environment does (rewatch_nframes over the union of the ranges, spec section 4);
- `{"type": "image", "frame": n, "image"?: path, "bbox"?: [[x1, y1, x2, y2], ...]}` (synth.py's format):
  frame n (1-based) decoded from the sample's video through the frame cache (no image-file round-trip), one
  image per `bbox` crop (ORIGINAL pixels, x2/y2 exclusive), the whole frame without `bbox`;
- `{"type": "image", "image": path}` without "frame" (real Video-CoM data): the file read with PIL. With
  `reference_bbox=True` an image's `bbox` means what the reference loader made of it: original-pixel boxes
  that the NEXT gpt turn writes, rewritten to the resized image's pixels (its `int()` truncation kept).
Ids are built turn by turn by `videocom_fast.chat.ChatTokens`, the same code the rollout engine appends
with, so SFT and RL see identical layouts; labels are the assistant content + `<|im_end|>\\n`, everything
else -100. Positions are the original M-RoPE rule over the whole sequence (`videocom_fast.mrope`), fixing
reference defect 1 (spec section 7: its training forwards used 1-D positions).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from videocom_fast.chat import ChatTokens, num_media_tokens
from videocom_fast.env import MediaConfig as MediaBudget  # one budget type for SFT and rollouts
from videocom_fast.mrope import mm_token_type_ids, sequence_positions
from videocom_fast.protocol import sample_frame_indices, smart_nframes, smart_resize

IGNORE_INDEX = -100
_TAG = re.compile(r"\n?<(video|image)>\n?")


@dataclass
class MediaSpec:
    """One vision block; duck-types the env's MediaItem for `videocom_fast.preprocess.preprocess_media`."""
    kind: str                      # "video" | "image"
    frames: torch.Tensor           # uint8 (T, H, W, 3)
    box: tuple | None              # crop in original pixels (images), None = whole frame
    min_pixels: int
    max_pixels: int
    fps: float | None = None       # sampled fps of a video

    @property
    def second_per_grid_t(self) -> float:
        return 2.0 / self.fps if self.kind == "video" and self.fps else 0.0


@dataclass
class SFTExample:
    input_ids: torch.Tensor            # (L,) int64
    labels: torch.Tensor               # (L,) int64, -100 where not trained
    position_ids: torch.Tensor         # (3, L) int64
    media_kinds: list[str]             # per vision block in sequence order
    pixel_values: torch.Tensor | None  # images, (P_img, 1176), blocks in sequence order
    image_grid_thw: torch.Tensor | None
    pixel_values_videos: torch.Tensor | None
    video_grid_thw: torch.Tensor | None
    second_per_grid_ts: torch.Tensor | None
    meta: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_trained(self) -> int:
        return int((self.labels[1:] != IGNORE_INDEX).sum())

    @property
    def num_visual_tokens(self) -> int:
        return sum(num_media_tokens(g) for grid in (self.image_grid_thw, self.video_grid_thw)
                   if grid is not None for g in grid)


# --- media -----------------------------------------------------------------------------------------

def _time_candidates(total: int, fps: float, time_ranges) -> int:
    """How many frames the union of `time_ranges` spans (sample_frame_indices' candidate rule)."""
    s: set[int] = set()
    for r in time_ranges or []:
        start, end = (r["start"], r["end"]) if isinstance(r, dict) else r
        s.update(range(max(0, math.floor(start * fps)), min(total - 1, math.ceil(end * fps) - 1) + 1))
    return len(s) if len(s) >= 2 else total


def _video_spec(src, cache, nframes: int, budget: MediaBudget, time_ranges=None, frame_list=None) -> MediaSpec:
    total, fps = src.num_frames, src.fps
    frame_list = [int(f) for f in frame_list or []]
    idx = sample_frame_indices(total, fps, nframes, time_ranges=time_ranges or None, frame_list=frame_list or None)
    span = _time_candidates(total, fps, time_ranges)
    n = min(smart_nframes(nframes, span, fps), span)
    frames = cache.get_frames(src, idx) if cache is not None else src.get_frames(idx)
    return MediaSpec("video", frames, None, budget.video_min_pixels, budget.video_max_pixels, fps=n / span * fps)


def _image_from_path(path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).unsqueeze(0)


def _resolve_path(p, base: Path | None) -> str:
    path = Path(p)
    if not path.is_absolute() and base is not None and not path.exists():
        path = base / path
    return str(path)


class MediaResolver:
    """Turns a sample's media objects into MediaSpecs; one open video per sample path, frames cached.

    `reference_bbox=True` gives an image's "bbox" the reference loader's meaning (boxes that the next gpt
    turn writes in original pixels, rewritten to resized ones) instead of synth.py's (crops to show).
    """

    def __init__(self, budget: MediaBudget = MediaBudget(), cache=None, media_root=None, *,
                 reference_bbox: bool = False):
        self.budget = budget
        self.cache = cache
        self.media_root = Path(media_root) if media_root else None
        self.reference_bbox = reference_bbox
        self._sources: dict[str, object] = {}

    def source(self, path: str):
        from videocom_fast.media import open_video

        if path not in self._sources:
            self._sources[path] = open_video(path)
        return self._sources[path]

    def _frames(self, src, idx):
        return self.cache.get_frames(src, idx) if self.cache is not None else src.get_frames(idx)

    def main_video(self, sample: dict, media: dict | None) -> MediaSpec:
        src = self.source(_resolve_path(sample["video"], self.media_root))
        frame_list = sample.get("frame_list") or (media or {}).get("frame_list") or []
        return _video_spec(src, self.cache, self.budget.main_nframes, self.budget, frame_list=frame_list)

    def turn_media(self, sample: dict, media: dict, where: str) -> list[MediaSpec]:
        kind = media.get("type")
        b = self.budget
        if kind == "video":
            src = self.source(_resolve_path(sample["video"], self.media_root))
            return [_video_spec(src, self.cache, b.rewatch_nframes, b, media.get("time_ranges"),
                                media.get("frame_list"))]
        if kind != "image":
            raise ValueError(f"{where}: media type must be 'video' or 'image', got {kind!r}")
        boxes = [None] if self.reference_bbox or not media.get("bbox") else \
            [tuple(int(v) for v in bb) for bb in media["bbox"]]
        if media.get("frame") is not None and sample.get("video"):
            # the frame straight from the decoded video: no image file round-trip
            src = self.source(_resolve_path(sample["video"], self.media_root))
            f = int(media["frame"])
            if not 1 <= f <= src.num_frames:
                raise ValueError(f"{where}: frame {f} outside 1..{src.num_frames}")
            frames = self._frames(src, [f - 1])
        elif media.get("image"):
            frames = _image_from_path(_resolve_path(media["image"], self.media_root))
        else:
            raise ValueError(f"{where}: image media needs 'frame' (1-based, with the sample's video) or 'image'")
        h, w = frames.shape[1:3]
        for k, bb in enumerate(boxes):
            if bb is not None and not (0 <= bb[0] < bb[2] <= w and 0 <= bb[1] < bb[3] <= h):
                raise ValueError(f"{where}.bbox[{k}]: {bb} is not a non-empty box inside the {w}x{h} image")
        return [MediaSpec("image", frames, bb, b.image_min_pixels, b.image_max_pixels) for bb in boxes]


def preprocess_items(items: list[MediaSpec]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pixel_values, grid_thw (1, 3)) per item, by the fused kernels of videocom_fast.preprocess."""
    from videocom_fast.preprocess import preprocess_media
    return preprocess_media(items)


# --- tokenization ----------------------------------------------------------------------------------

def strip_media_tags(text: str) -> str:
    """Turn text without `<video>` / `<image>` placeholders (media go first in a user turn); stripped like
    ManipulationEnv.question so SFT ids equal the rollout engine's."""
    return _TAG.sub("", text).strip()


def _rescale_bbox_text(text: str, bboxes, orig_hw, resized_hw) -> str:
    """The reference's SFT rewrite of original-pixel boxes in a gpt turn to the resized image's pixels."""
    sy, sx = resized_hw[0] / orig_hw[0], resized_hw[1] / orig_hw[1]
    for bb in bboxes:
        x1, y1, x2, y2 = bb
        text = text.replace(str(list(bb)), str([int(x1 * sx), int(y1 * sy), int(x2 * sx), int(y2 * sy)]))
    return text


def build_example(sample: dict, chat: ChatTokens, resolver: MediaResolver, *, index: int = 0,
                  max_tokens: int | None = None) -> SFTExample:
    """Tokenize one conversation with its media (see the module note)."""
    where = f"samples[{index}]"
    convs = sample.get("conversations")
    if not convs or convs[0].get("from") != "human":
        raise ValueError(f"{where}: 'conversations' must start with a human turn")
    specs: list[MediaSpec] = []
    plan: list[tuple[str, str, int]] = []  # (role, text, number of media items of this turn)
    pending_bbox = None
    for t, turn in enumerate(convs):
        role, text = turn.get("from"), str(turn.get("value", ""))
        if role == "human":
            n0 = len(specs)
            if t == 0:
                if "video" in sample:
                    specs.append(resolver.main_video(sample, turn.get("media")))
            elif isinstance(turn.get("media"), dict):
                m = turn["media"]
                specs += resolver.turn_media(sample, m, f"{where}.conversations[{t}].media")
                if resolver.reference_bbox and m.get("bbox"):
                    spec = specs[-1]
                    h, w = spec.frames.shape[1:3]
                    pending_bbox = (m["bbox"], (h, w), smart_resize(h, w, min_pixels=spec.min_pixels,
                                                                   max_pixels=spec.max_pixels))
            plan.append(("user", strip_media_tags(text), len(specs) - n0))
        elif role == "gpt":
            if pending_bbox is not None:
                text, pending_bbox = _rescale_bbox_text(text, *pending_bbox), None
            plan.append(("assistant", text, 0))
        else:
            raise ValueError(f"{where}.conversations[{t}]: 'from' must be 'human' or 'gpt', got {role!r}")
    processed = preprocess_items(specs)
    ids, labels = list(chat.system()), [IGNORE_INDEX] * len(chat.system())
    k = 0
    for role, text, n_media in plan:
        if role == "user":
            media = [(specs[k + j].kind, num_media_tokens(processed[k + j][1][0])) for j in range(n_media)]
            k += n_media
            part = chat.user(text, media, generation_prompt=True)
            ids += part
            labels += [IGNORE_INDEX] * len(part)
        else:
            part = chat.assistant(text)
            ids += part
            labels += part
    if max_tokens is not None and len(ids) > max_tokens:
        raise ValueError(f"{where}: {len(ids)} tokens exceed max_tokens={max_tokens}")
    return _assemble(ids, labels, specs, processed, chat, meta={"index": index})


def _cat(xs):
    return torch.cat(xs) if xs else None


def _assemble(ids, labels, specs, processed, chat, meta) -> SFTExample:
    input_ids = torch.tensor(ids, dtype=torch.long)
    kinds = [s.kind for s in specs]
    img = [p for s, p in zip(specs, processed) if s.kind == "image"]
    vid = [p for s, p in zip(specs, processed) if s.kind == "video"]
    image_grid = _cat([g for _, g in img])
    video_grid = _cat([g for _, g in vid])
    sgts = torch.tensor([s.second_per_grid_t for s in specs if s.kind == "video"], dtype=torch.float32) \
        if vid else None
    types = mm_token_type_ids(input_ids, chat.image_pad, chat.video_pad)
    pos = sequence_positions(types, image_grid, video_grid, sgts)
    return SFTExample(input_ids, torch.tensor(labels, dtype=torch.long), pos, kinds,
                      _cat([p for p, _ in img]), image_grid, _cat([p for p, _ in vid]), video_grid, sgts, meta)


class SFTDataset:
    """Samples -> SFTExamples on demand, optionally memoized (a small dataset is preprocessed once)."""

    def __init__(self, samples: list[dict], tokenizer, budget: MediaBudget = MediaBudget(), *, cache=None,
                 media_root=None, memoize: bool = True, max_tokens: int | None = None,
                 reference_bbox: bool = False):
        self.samples = samples
        self.chat = ChatTokens(tokenizer)
        self.resolver = MediaResolver(budget, cache, media_root, reference_bbox=reference_bbox)
        self.memoize = memoize
        self.max_tokens = max_tokens
        self._memo: dict[int, SFTExample] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> SFTExample:
        if i in self._memo:
            return self._memo[i]
        ex = build_example(self.samples[i], self.chat, self.resolver, index=i, max_tokens=self.max_tokens)
        if self.memoize:
            self._memo[i] = ex
        return ex
