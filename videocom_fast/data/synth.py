"""The embedded default dataset: overlayed synthetic videos whose questions need manipulations.

    paths = synthesize("data/synth", num_samples=64, seed=0)   # dict(out_dir, sft, grpo, eval, videos)

Each video (default 40 s at 4 fps: 4 segments): a textured background tinted per segment
(SEGMENT_TINTS), 2-3 coloured shapes bouncing around, 4 fixed coloured slots (SLOT_COLOURS), and the
Segment/Frame label of spec section 1 burned in (media.overlay). In ONE segment a small tag (a light square
carrying a coloured character, one of TAG_CHARS) sits in one slot for the whole segment. The question asks
which character the tag showed (with colour_questions=True, half ask for its colour); 4 options on one line,
the same for every question. Each manipulation has a cue a tiny model
can perceive (issue 17, docs/vision_demo.md): the tint of the main-video frames showing the tag gives the
segment, the slot's colour around the tag gives the zoom box (the whole slot), and the character is only
large enough to read in the zoomed crop. Deterministic per seed (one numpy generator per sample, seeded
with (seed, index); single-threaded encoders). Videos are H.264 mp4 (or VP9 webm, codec="vp9") with 2 s
GOPs so seeks are cheap; two worker processes write them.

Files written under out_dir (paths inside the JSON are relative to the JSON file's directory):
    videos/sample_0000.mp4      the overlayed video
    frames/sample_0000_f0123.png  the gold frame as decoded from the video (for image-path loaders)
    sft.json  grpo.json         the training split (same samples, two formats)
    eval.json                   held-out samples (the last `num_eval`, default max(1, n // 8)), GRPO format
    media.json                  the media contract (videocom_fast.contract): the media settings and the
                                frame size the SFT zoom boxes were written for; SFT checks it
Videos or frames of an earlier synthesis into the same directory are removed.

SFT sample (the reference's sft_dataset.py format, spec section 5):
    {"id": "sample_0000", "video": "videos/sample_0000.mp4", "conversations": [
      {"from": "human",
       "value": "<video>\\n<tool instructions>\\nQuestion: ...\\nOptions: A. x, B. y, C. z, D. w",
       "segment_frame_list": {"3": [123]}},
      {"from": "gpt",   "value": "<reasoning> FIND_SEGMENT(<desc>) = [3]"},
      {"from": "human",
       "value": "<video>\\nContinue solving the question after rewatching the selected segment.",
       "media": {"type": "video", "time_ranges": [{"start": 20.0, "end": 30.0}], "frame_list": [123]}},
      {"from": "gpt",   "value": "<reasoning> FIND_FRAME(<desc>) = [123]"},
      {"from": "human", "value": "<image>\\nContinue solving the question with the selected frame.",
       "media": {"type": "image", "image": "frames/sample_0000_f0123.png", "frame": 123}},
      {"from": "gpt",   "value": "<reasoning> SPATIAL_ZOOM(<desc>) = [x1, y1, x2, y2]"},
      {"from": "human", "value": "<image>\\nContinue solving the question by focusing on the zoomed region.",
       "media": {"type": "image", "image": "frames/sample_0000_f0123.png", "frame": 123,
                 "bbox": [[X1, Y1, X2, Y2]]}},
      {"from": "gpt",   "value": "The tag shows X, so FINAL_ANSWER: B. X"}]}
  - Rewatch media: the segment's time ranges (protocol.segment_time_ranges) and the frames that must be
    among the 16 sampled ones (1-based), exactly what ManipulationEnv.step would show.
  - Image media: "image" is the FULL frame (1-based "frame" number in the video); a zoom observation adds
    "bbox": the crop(s) in ORIGINAL pixels (x2, y2 exclusive), i.e. what ManipulationEnv.step crops for the
    SPATIAL_ZOOM box of the previous gpt turn. Loaders crop the image (or the decoded frame) to bbox.
  - The SPATIAL_ZOOM box in the gpt text is in the coordinates of the frame AS THE MODEL SEES IT:
    smart_resize(H, W, image_min_pixels, image_max_pixels) of the config (defect 6 fixed at the source).
    NOTE: the reference loader rewrote str(bbox) of an image's "bbox" in the following gpt turn into
    resized coordinates; our texts are resized already and never contain the original-pixel box.
GRPO / eval sample: {"id", "video", "conversations": [question turn (with segment_frame_list), {"from":
    "gpt", "value": "B. X"}], "valid_segments": [3], "valid_frames": [[121, 127]] (1-based inclusive),
    "valid_bounding_box": [[121, [x1, y1, x2, y2]], ...] (every frame showing the tag, original pixels),
    "answer": "B", "question_type": "character" | "colour"}.
"""
from __future__ import annotations

import functools
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .. import protocol

INSTRUCTIONS = (   # short: the tiny model reads every token of it in every training example
    "Tools: FIND_SEGMENT(d) = [s], FIND_FRAME(d) = [n], SPATIAL_ZOOM(d) = [x1, y1, x2, y2]. "
    "End with FINAL_ANSWER: <letter>. <option>."
)
CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ2345679"   # no look-alikes (0/O, 1/I, 8/B)
COLOURS = {"red": (220, 20, 20), "green": (0, 160, 0), "blue": (20, 40, 230), "orange": (255, 150, 0),
           "purple": (130, 0, 180), "black": (0, 0, 0)}   # far apart even after 4:2:0 chroma loss
LETTERS = "ABCD"
# The question's options (issue 17). The tag shows one of TAG_CHARS (4 shapes a tiny tower tells apart
# at the zoom's 56 px) in one of TAG_COLOURS. NOTE: by default the options are the same four in the same
# order for every question of a type, so the text carries no information about the answer at all; with
# shuffled options (`shuffle_options=True`) the answer letter needs an option lookup (find the seen colour
# among the options, copy its letter) that the 2-layer tiny LLM did not learn in the demo's budget
# (docs/vision_demo.md, experiment E1).
TAG_CHARS = "OXTL"
TAG_COLOURS = ["red", "green", "blue", "orange"]
_SUFFIX = {"h264": ".mp4", "vp9": ".webm"}


# --- scene ---------------------------------------------------------------------------------------
# NOTE (issue 17): every manipulation carries information a tiny model can perceive. The background of
# segment s is tinted with SEGMENT_TINTS[s-1] (the main video's 8 frames show which tint the tag sits on),
# the tag stays up for its whole segment (2 of 8 main frames show it), and it sits in one of 4 fixed slots
# whose fill colour names the slot (so its zoom box is readable from the frame image); its character is
# about 1 patch wide in the frame image and only readable in the zoomed crop. docs/vision_demo.md.
SEGMENT_TINTS = [(200, 70, 70), (70, 170, 70), (70, 90, 210), (150, 150, 150), (170, 120, 50),
                 (130, 70, 170)]          # segment s: SEGMENT_TINTS[(s - 1) % 6]
SLOT_COLOURS = [(200, 0, 200), (0, 190, 190), (210, 210, 0), (40, 40, 40)]
_SLOT_XY = [(0.45, 0.03), (0.82, 0.03), (0.22, 0.70), (0.62, 0.70)]   # top-left corners, fractions of W, H
TINT = 0.7                                # background = TINT * segment tint + (1 - TINT) * texture


def slot_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """(x1, y1, x2, y2) of the 4 tag slots (x2, y2 exclusive) in a width x height frame."""
    size = round(0.27 * height)
    return [(min(width - size, round(fx * width)), min(height - size, round(fy * height)),
             min(width - size, round(fx * width)) + size, min(height - size, round(fy * height)) + size)
            for fx, fy in _SLOT_XY]


def tag_size(height: int) -> int:
    return round(0.27 * height * 0.72)


def _smooth_texture(rng, h, w) -> np.ndarray:
    """uint8 (h, w, 3): low-frequency colour noise plus fine grain (a textured, codec-friendly background)."""
    import torch

    coarse = torch.from_numpy(rng.uniform(40, 200, size=(1, 3, h // 24 + 2, w // 24 + 2)).astype(np.float32))
    # NOTE: channels-last in and out: the interpolation's (h, w, 3) result is C order with no permuting copy
    # (a channel-strided texture made every frame's background copy ~60x slower), and torch's channels-last
    # kernel takes half the time of the planar one for the same values. The grain is normal(0, 3)'s draws
    # (0 + 3 * z); the sum, clamp and truncating cast run in place in numpy: the previous torch version's
    # bytes (tests/test_synth.py), 4.3 -> 2.8 ms for a 240 x 368 texture
    up = torch.nn.functional.interpolate(coarse.contiguous(memory_format=torch.channels_last), size=(h, w),
                                         mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    out = up.numpy()
    out += (rng.standard_normal((h, w, 1)) * 3.0).astype(np.float32)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8, order="C")   # C order whatever layout interpolate returns


def _shape_mask(kind: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    if kind == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2
    if kind == "diamond":
        return np.abs(yy - c) + np.abs(xx - c) <= size / 2
    return np.ones((size, size), dtype=bool)


def _bounce(p0: float, v: float, t: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Positions of a point moving at speed v that reflects off lo and hi."""
    span = hi - lo
    x = (p0 - lo + v * t) % (2 * span)
    return lo + np.where(x > span, 2 * span - x, x)


def tag_patch(char: str, colour, size: int) -> np.ndarray:
    """uint8 (size, size, 3), read-only: one rendering per (char, colour, size), shared by every scene."""
    return _tag_patch(char, tuple(int(c) for c in colour), size)


@functools.lru_cache(maxsize=256)
def _tag_patch(char: str, colour: tuple, size: int) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (size, size), (235, 235, 225))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=int(size * 0.8))
    l, t, r, b = draw.textbbox((0, 0), char, font=font)
    # a stroke thickens the glyph: thin coloured strokes lose their colour to 4:2:0 chroma subsampling
    draw.text(((size - (r - l)) / 2 - l, (size - (b - t)) / 2 - t), char, fill=colour, font=font,
              stroke_width=max(1, size // 16), stroke_fill=colour)
    out = np.array(img)
    out.flags.writeable = False
    return out


class Scene:
    """Frames of one planned sample, rendered in memory (the video writer and the perception warm-up)."""

    def __init__(self, plan: dict, width: int, height: int, fps: int):
        from ..media.overlay import segment_of_frames

        rng = np.random.default_rng(plan["texture_seed"])
        self.pan = 48
        self.bg = _smooth_texture(rng, height + self.pan, width + self.pan)
        n = self.n = plan["n"]
        self.plan, self.width, self.height, self.fps = plan, width, height, fps
        self.segment = segment_of_frames(n, fps)
        t = np.arange(n, dtype=np.float64)
        self.px = _bounce(0, 0.7, t, 0, self.pan).astype(int)
        self.py = _bounce(self.pan / 2, 0.4, t, 0, self.pan).astype(int)
        self.tracks = []
        for sh in plan["shapes"]:
            sz = sh["size"]
            xs = _bounce(sh["x0"], sh["vx"], t, 0, width - sz).astype(int)
            ys = _bounce(sh["y0"], sh["vy"], t, 0, height - sz).astype(int)
            self.tracks.append((_shape_mask(sh["kind"], sz), sh["colour"], xs, ys))
        self.tag = tag_patch(plan["char"], COLOURS[plan["colour"]], plan["tag"])
        self.slots = slot_boxes(width, height)
        self._blend: dict[int, np.ndarray] = {}
        self._seen: set[int] = set()

    def _background(self, i: int) -> np.ndarray:
        """Frame i's background: the panning texture's window blended with its segment's tint. From the
        second frame of a segment on, the whole texture is blended once and frames are slices of it (the
        same values: the blend is elementwise), so a video costs a copy per frame, a single frame no more."""
        seg, y, x = int(self.segment[i]), self.py[i], self.px[i]
        full = self._blend.get(seg)
        if full is None:
            tint = np.array(SEGMENT_TINTS[(seg - 1) % len(SEGMENT_TINTS)], np.float32)
            first = seg not in self._seen
            self._seen.add(seg)
            bg = self.bg[y:y + self.height, x:x + self.width] if first else self.bg
            out = (TINT * tint + (1 - TINT) * bg.astype(np.float32)).astype(np.uint8)
            if first:
                return out
            full = self._blend[seg] = out
        return full[y:y + self.height, x:x + self.width]

    def draw(self, i: int, out: np.ndarray | None = None, labels: bool = True) -> np.ndarray:
        """uint8 (H, W, 3) frame i (0-based), written into `out` if given."""
        from ..media.overlay import draw_label

        p, h, w = self.plan, self.height, self.width
        f = np.empty((h, w, 3), np.uint8) if out is None else out
        f[:] = self._background(i)
        for mask, colour, xs, ys in self.tracks:
            sz = mask.shape[0]
            f[ys[i]:ys[i] + sz, xs[i]:xs[i] + sz][mask] = colour
        for (x1, y1, x2, y2), colour in zip(self.slots, SLOT_COLOURS):
            f[y1:y2, x1:x2] = colour
        if p["start"] <= i < p["start"] + p["length"]:
            y, x, s = p["y"], p["x"], p["tag"]
            f[y:y + s, x:x + s] = self.tag
        if labels:
            draw_label(f, int(self.segment[i]), i + 1)
        return f


@functools.lru_cache(maxsize=4)
def _noise_bank(h: int, w: int, c: int, noise: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng([h, w, noise]).integers(-noise, noise + 1, (size, h, w, c), dtype=np.int16)


def add_noise(frames: np.ndarray, rng, noise: int) -> np.ndarray:
    """uint8 (..., H, W, C) frames plus uniform integer noise in [-noise, noise], clipped: a stand-in for the
    codec. Each frame gets one of a bank of 32 noise fields, picked by `rng`: fresh noise for every pixel
    was the rendered training streams' hot spot (~6x the cost)."""
    bank = _noise_bank(*frames.shape[-3:], noise)
    out = frames.astype(np.int16)
    flat = out.reshape(-1, *frames.shape[-3:])
    for f, j in zip(flat, rng.integers(0, len(bank), len(flat))):
        f += bank[j]
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


class SceneSource:
    """A planned sample as a video source (num_frames, fps, get_frames), rendered in memory, never encoded.

    The training stream of issue 17 (training/scenes.py) draws thousands of fresh episodes; encoding them
    would cost ~1 s each. A little uniform noise stands in for the codec. Held-out samples stay real videos.
    """

    def __init__(self, plan: dict, width: int = 320, height: int = 192, fps: int = 4, *, noise: int = 4,
                 seed: int = 0):
        self.scene = Scene(plan, width, height, fps)
        self.num_frames, self.fps, self.noise = plan["n"], float(fps), noise
        self.path = f"scene:{plan['index']}"
        self._rng = np.random.default_rng([seed, plan["index"]])

    def get_frames(self, indices):
        import torch

        out = np.stack([self.scene.draw(int(i)) for i in indices])
        return torch.from_numpy(add_noise(out, self._rng, self.noise) if self.noise else out)

    def close(self):
        pass


# --- one sample -----------------------------------------------------------------------------------

def _plan(index: int, seed: int, width: int, height: int, fps: int, seconds, image_hw, *,
          shuffle_options: bool = False, colour_questions: bool = False) -> dict:
    """Everything random about sample `index`, drawn from its own generator (order-independent)."""
    rng = np.random.default_rng([seed, index])
    duration = int(rng.integers(seconds[0], seconds[1] + 1))
    n = duration * fps
    segs = protocol.segment_ranges(n, fps)
    s = int(rng.integers(1, len(segs) + 1))
    a, b = segs[s - 1]
    start, length = a, b - a                                   # the tag stays up for its whole segment
    tag = tag_size(height)
    slot = int(rng.integers(0, 4))
    sx1, sy1, sx2, sy2 = slot_boxes(width, height)[slot]
    x = int(rng.integers(sx1, sx2 - tag + 1))
    y = int(rng.integers(sy1, sy2 - tag + 1))
    # the tag's character and colour are independent; the question asks for its character (only the zoom
    # shows it: the colour is readable in the FIND_FRAME image already), or with colour_questions for either
    qtype = "character" if rng.random() < 0.5 or not colour_questions else "colour"
    char, colour = str(rng.choice(list(TAG_CHARS))), str(rng.choice(TAG_COLOURS))
    options = list(TAG_CHARS) if qtype == "character" else list(TAG_COLOURS)
    if shuffle_options:
        rng.shuffle(options)
    answer = options.index(char if qtype == "character" else colour)
    shapes = []
    for _ in range(int(rng.integers(2, 4))):
        size = int(rng.integers(height // 10, height // 6))
        shapes.append(dict(kind=str(rng.choice(["circle", "square", "diamond"])), size=size,
                           colour=rng.integers(0, 256, size=3).astype(np.uint8),
                           x0=float(rng.uniform(0, width - size)), y0=float(rng.uniform(0, height - size)),
                           vx=float(rng.uniform(-3, 3)), vy=float(rng.uniform(-2, 2))))
    gold = start + length // 2                     # 0-based frame of the FIND_FRAME step: mid-segment
    rh, rw = image_hw
    # the zoom asks for the whole slot (the tag moves within it from sample to sample)
    zoom = [math.floor(sx1 * rw / width), math.floor(sy1 * rh / height),
            math.ceil(sx2 * rw / width), math.ceil(sy2 * rh / height)]
    return dict(index=index, n=n, segment=s, start=start, length=length, tag=tag, x=x, y=y, slot=slot,
                qtype=qtype, options=[str(o) for o in options], answer=answer, char=str(char),
                colour=str(colour), shapes=shapes, gold=gold, zoom=zoom,
                texture_seed=int(rng.integers(2**31)))


def _render(plan: dict, path: str, width: int, height: int, fps: int, codec: str, threads: int):
    from ..media.overlay import encode, finish, open_encoder

    scene = Scene(plan, width, height, fps)
    n = plan["n"]
    container, stream = open_encoder(path, width, height, fps, codec, gop=2 * fps)
    if threads:
        stream.codec_context.thread_count = threads
    chunk = 32
    try:
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            frames = np.empty((c1 - c0, height, width, 3), dtype=np.uint8)
            for i in range(c0, c1):
                scene.draw(i, frames[i - c0])
            encode(container, stream, frames, c0)
    finally:
        finish(container, stream)


def _make_sample(args) -> dict:
    plan, out_dir, width, height, fps, codec, threads = args
    from PIL import Image

    from ..media import open_video

    name = f"sample_{plan['index']:04d}"
    video_rel = f"videos/{name}{_SUFFIX[codec]}"
    _render(plan, os.path.join(out_dir, video_rel), width, height, fps, codec, threads)
    src = open_video(os.path.join(out_dir, video_rel), backend="pyav")
    if src.num_frames != plan["n"]:
        raise RuntimeError(f"{video_rel}: wrote {plan['n']} frames, reads back {src.num_frames}")
    frame_rel = f"frames/{name}_f{plan['gold'] + 1:04d}.png"
    Image.fromarray(src.get_frames([plan["gold"]])[0].numpy()).save(os.path.join(out_dir, frame_rel))
    src.close()
    return dict(plan=plan, name=name, video=video_rel, frame_image=frame_rel)


# --- conversations --------------------------------------------------------------------------------

def _question_turn(p: dict) -> dict:
    q = "Which character is on the tag?" if p["qtype"] == "character" else "What colour is the tag's character?"
    opts = ", ".join(f"{LETTERS[k]}. {o}" for k, o in enumerate(p["options"]))
    return {"from": "human", "value": f"<video>\n{INSTRUCTIONS}\nQuestion: {q}\nOptions: {opts}",
            "segment_frame_list": {str(p["segment"]): [p["gold"] + 1]}}


def _answer_text(p: dict) -> str:
    return f"{LETTERS[p['answer']]}. {p['options'][p['answer']]}"


def _sft_record(r: dict, fps: int, image_hw, width: int, height: int) -> dict:
    from ..env import TEXT_FRAME, TEXT_SEGMENT, TEXT_ZOOM, resized_box_to_original

    p = r["plan"]
    s, n = p["segment"], p["gold"] + 1
    (t0, t1), = protocol.segment_time_ranges(p["n"], fps, [s])
    crop = resized_box_to_original(p["zoom"], image_hw, (height, width))
    x1, y1, x2, y2 = p["zoom"]
    seen = p["char"] if p["qtype"] == "character" else p["colour"]    # the same words for both types
    # NOTE: ", so ACTION" and never ". ACTION": with ". FINAL_ANSWER" in the same round, a tiny model's
    # induction copies " FINAL" after the answer's "C." ("FINAL_ANSWER: C. FINAL_ANSWER: B. 9"); with it, the
    # only "." in assistant text is the answer's, followed by the option (docs/sft_curve.md)
    conv = [
        _question_turn(p),
        {"from": "gpt", "value": f"The tag is in segment {s}, so FIND_SEGMENT(tag) = [{s}]"},
        {"from": "human", "value": f"<video>\n{TEXT_SEGMENT}",
         "media": {"type": "video", "time_ranges": [{"start": t0, "end": t1}], "frame_list": [n]}},
        {"from": "gpt",
         "value": f"The tag is in frame {n}, so FIND_FRAME(tag) = [{n}]"},
        {"from": "human", "value": f"<image>\n{TEXT_FRAME}",
         "media": {"type": "image", "image": r["frame_image"], "frame": n}},
        {"from": "gpt", "value": f"The tag is small, so SPATIAL_ZOOM(tag) = [{x1}, {y1}, {x2}, {y2}]"},
        {"from": "human", "value": f"<image>\n{TEXT_ZOOM}",
         "media": {"type": "image", "image": r["frame_image"], "frame": n, "bbox": [list(crop)]}},
        {"from": "gpt", "value": f"The tag shows {seen}, so FINAL_ANSWER: {_answer_text(p)}"},
    ]
    return {"id": r["name"], "video": r["video"], "conversations": conv}


def _grpo_record(r: dict) -> dict:
    p = r["plan"]
    a, L, x, y, t = p["start"], p["length"], p["x"], p["y"], p["tag"]
    return {"id": r["name"], "video": r["video"],
            "conversations": [_question_turn(p), {"from": "gpt", "value": _answer_text(p)}],
            "valid_segments": [p["segment"]],
            "valid_frames": [[a + 1, a + L]],
            "valid_bounding_box": [[f + 1, [x, y, x + t, y + t]] for f in range(a, a + L)],
            "answer": LETTERS[p["answer"]], "question_type": p["qtype"]}


# --- entry point ----------------------------------------------------------------------------------

def _single_threaded_worker() -> None:
    import torch

    torch.set_num_threads(1)


def synthesize(out_dir, num_samples: int = 64, seed: int = 0, *, codec: str = "h264", width: int = 320,
               height: int = 192, fps: int = 4, seconds=(40, 40), media_config=None,
               workers: int | None = None, num_eval: int | None = None, shuffle_options: bool = False,
               colour_questions: bool = False) -> dict:
    """Write the dataset under `out_dir`; returns dict(out_dir, sft, grpo, eval, videos) of paths.
    The last `num_eval` samples (default max(1, num_samples // 8)) are held out in eval.json."""
    from ..env import MediaConfig

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
    if codec not in _SUFFIX:
        raise ValueError(f"codec: expected one of {sorted(_SUFFIX)}, got {codec!r}")
    if width % 2 or height % 2 or width < 128 or height < 96:
        raise ValueError(f"width/height: expected even sizes of at least 128x96, got {width}x{height}")
    if not isinstance(fps, int) or fps < 2:
        raise ValueError(f"fps: expected an int >= 2, got {fps!r}")
    if num_eval is not None and (isinstance(num_eval, bool) or not isinstance(num_eval, int)
                                 or not 0 <= num_eval < num_samples):
        raise ValueError(f"num_eval: expected an int in [0, num_samples), got {num_eval!r}")
    lo, hi = seconds
    if not 0 < lo <= hi:
        raise ValueError(f"seconds: expected (min, max) with 0 < min <= max, got {seconds!r}")
    cfg = media_config or MediaConfig()
    image_hw = protocol.smart_resize(height, width, min_pixels=cfg.image_min_pixels,
                                     max_pixels=cfg.image_max_pixels)
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "frames").mkdir(parents=True, exist_ok=True)
    plans = [_plan(i, seed, width, height, fps, (lo, hi), image_hw, shuffle_options=shuffle_options,
                   colour_questions=colour_questions) for i in range(num_samples)]
    workers = workers if workers is not None else min(2, os.cpu_count() or 1, num_samples)
    # NOTE: one encoder thread always: multi-threaded x264 makes different (valid) choices per core count
    jobs = [(p, str(out), width, height, fps, codec, 1) for p in plans]
    if workers > 1:
        import multiprocessing as mp

        # NOTE: a forked child of a process whose OpenMP pool already ran (any torch op in a test session or
        # trainer) deadlocks in its first parallel torch op; one intra-op thread per worker never enters an
        # OpenMP region. (spawn would avoid it too, but breaks callers whose __main__ is not a file.)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"),
                                 initializer=_single_threaded_worker) as pool:
            records = list(pool.map(_make_sample, jobs))
    else:  # same intra-op thread count as a worker, so a 1-process run renders the same pixels
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            records = [_make_sample(j) for j in jobs]
        finally:
            torch.set_num_threads(threads)
    if num_eval is None:
        num_eval = max(1, num_samples // 8) if num_samples >= 2 else 0
    train, held = records[:num_samples - num_eval], records[num_samples - num_eval:]
    files = {"sft": [_sft_record(r, fps, image_hw, width, height) for r in train],
             "grpo": [_grpo_record(r) for r in train], "eval": [_grpo_record(r) for r in held]}
    paths = {"out_dir": str(out), "videos": [str(out / r["video"]) for r in records]}
    for name, data in files.items():
        paths[name] = str(out / f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(data, f, indent=1)
    from ..contract import write_contract

    # the media contract: the SFT zoom boxes above are in the coordinates of (height, width) resized by cfg
    paths["contract"] = str(write_contract(out, "synth", cfg, frame_hw=(height, width)))
    _remove_stale(out, {r["video"] for r in records} | {r["frame_image"] for r in records})
    return paths


def _remove_stale(out: Path, written: set) -> None:
    """Delete videos/frames an earlier synthesis left in `out` (another seed, count or codec) so that the
    directory holds exactly this dataset."""
    for sub in ("videos", "frames"):
        for f in (out / sub).iterdir():
            if f.is_file() and f"{sub}/{f.name}" not in written:
                f.unlink()


__all__ = [
    "synthesize", "Scene", "SceneSource", "TAG_CHARS", "TAG_COLOURS", "slot_boxes", "tag_patch",
    "add_noise", "INSTRUCTIONS", "CHARS", "COLOURS", "SEGMENT_TINTS", "SLOT_COLOURS"
]
