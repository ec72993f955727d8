"""The burned-in `Segment-<s>` / `Frame-<n>` label of spec section 1, on any video or on frames in memory.

The model reads segment and frame numbers from these pixels, so the overlay and the executor must use
one partition rule: `protocol.segment_ranges(total_frames, fps)`. Frame numbers are 1-based.

    overlay_video("in.mp4", "out.mp4")      # keeps fps, size and frame count; codec "h264" | "vp9" | ...
    frames_THWC = draw_labels(frames_THWC, first_index=0, total_frames=n, fps=fps)   # in place, numpy

Rendering: PIL ImageDraw with Pillow's default font at a size proportional to the frame height, white
text on a dark box in the top-left corner. Labels are rendered once per distinct text into small patches
and pasted into the frames (a 480-frame video renders ~490 tiny patches, not 480 full PIL images).
"""
from __future__ import annotations

import os
from fractions import Fraction
from functools import lru_cache

import numpy as np

from ..protocol import segment_ranges

ENCODERS = {"h264": "libx264", "vp9": "libvpx-vp9", "mjpeg": "mjpeg", "mpeg4": "mpeg4"}


def font_px(height: int) -> int:
    """Label text height for a frame `height` pixels high (readable after Qwen's resize)."""
    return max(10, round(height / 16))


@lru_cache(maxsize=8)
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)   # FreeType build: scalable default font
    except (TypeError, OSError, ImportError):       # bitmap-only Pillow: fixed-size font
        return ImageFont.load_default()


@lru_cache(maxsize=4096)
def _label_patch(text: str, size: int, width: int) -> np.ndarray:
    """uint8 (h, width, 3) patch: `text` in white on a dark box, left-aligned."""
    from PIL import Image, ImageDraw

    pad = max(2, size // 5)
    img = Image.new("RGB", (width, size + 2 * pad), (16, 16, 16))
    ImageDraw.Draw(img).text((pad, pad), text, fill=(255, 255, 255), font=_font(size))
    return np.asarray(img)


def label_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) of the area the label covers in a `height` x `width` frame (x2, y2 exclusive)."""
    size = font_px(height)
    pad = max(2, size // 5)
    return 0, 0, min(width, _label_width(size)), min(height, 2 * (size + 2 * pad))


def _label_width(size: int) -> int:
    return int(size * 6.6) + 2 * max(2, size // 5)   # fits "Segment-10" / "Frame-99999" in the default font


def draw_label(frame_HWC: np.ndarray, segment: int, frame_number: int) -> np.ndarray:
    """Paint the two-line label into `frame_HWC` (uint8, modified in place) and return it."""
    h, w = frame_HWC.shape[:2]
    size = font_px(h)
    lw = min(w, _label_width(size))
    top = _label_patch(f"Segment-{segment}", size, lw)
    bottom = _label_patch(f"Frame-{frame_number}", size, lw)
    rows = min(h, top.shape[0])
    frame_HWC[:rows, :lw] = top[:rows]
    rows2 = min(h - rows, bottom.shape[0])
    if rows2 > 0:
        frame_HWC[rows:rows + rows2, :lw] = bottom[:rows2]
    return frame_HWC


def segment_of_frames(total_frames: int, fps: float) -> np.ndarray:
    """int array (total_frames,): the 1-based segment of every 0-based frame."""
    seg = np.empty(total_frames, dtype=np.int64)
    for s, (a, b) in enumerate(segment_ranges(total_frames, fps), start=1):
        seg[a:b] = s
    return seg


def draw_labels(frames_THWC: np.ndarray, first_index: int, total_frames: int, fps: float) -> np.ndarray:
    """Label a chunk of consecutive frames (0-based `first_index` onwards) of a video of `total_frames`."""
    seg = segment_of_frames(total_frames, fps)
    for t in range(frames_THWC.shape[0]):
        i = first_index + t
        draw_label(frames_THWC[t], int(seg[i]), i + 1)
    return frames_THWC


def open_encoder(out_path, width: int, height: int, fps, codec: str = "h264", *, gop: int | None = None,
                 crf: int = 20):
    """(container, stream) of a new video file; the caller encodes frames and closes the container."""
    import av

    if codec not in ENCODERS:
        raise ValueError(f"codec: expected one of {sorted(ENCODERS)}, got {codec!r}")
    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even for yuv420p, got {width}x{height}")
    container = av.open(os.fspath(out_path), mode="w")
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    stream = container.add_stream(ENCODERS[codec], rate=rate)
    stream.width, stream.height = width, height
    stream.codec_context.time_base = 1 / rate
    stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    if gop is not None:
        stream.codec_context.gop_size = gop
    if codec == "h264":
        # NOTE: mbtree=0: with macroblock-tree rate control this libx264 encodes the same frames differently
        # in the first and later encoders of a process (measured); without it the output is reproducible
        stream.options = {"crf": str(crf), "preset": "veryfast", "x264-params": "mbtree=0"}
    elif codec == "vp9":
        stream.options = {"crf": "32", "b": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "1"}
    return container, stream


def encode(container, stream, frames_THWC: np.ndarray, first_index: int):
    """Encode frames `first_index`, `first_index + 1`, ... of the stream.

    NOTE: explicit timestamps (pts = frame index in 1/fps units): without them x264's rate control sees
    made-up times and its output varies from run to run."""
    import av

    for t, f in enumerate(frames_THWC):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
        frame.pts = first_index + t
        frame.time_base = stream.codec_context.time_base
        for packet in stream.encode(frame):
            container.mux(packet)


def finish(container, stream):
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def overlay_video(in_path, out_path, codec: str = "h264") -> dict:
    """Re-encode `in_path` to `out_path` with the Segment/Frame labels; keeps fps, size and frame count.

    Returns dict(num_frames, fps, width, height, segments). ValueError (naming the file) if the input
    cannot be read; the output is written by streaming (one frame in memory at a time)."""
    import av

    from .decode import probe

    info = probe(in_path)   # exact frame count (demux scan) for the segment partition
    if os.path.abspath(os.fspath(in_path)) == os.path.abspath(os.fspath(out_path)):
        raise ValueError("out_path must differ from in_path")
    seg = segment_of_frames(info.num_frames, info.fps)
    with av.open(info.path) as src:
        vstream = src.streams.video[0]
        rate = vstream.average_rate or Fraction(info.fps).limit_denominator(1001)
        width, height = info.width - info.width % 2, info.height - info.height % 2
        container, stream = open_encoder(out_path, width, height, rate, codec)
        try:
            n = 0
            for frame in src.decode(vstream):
                if n >= info.num_frames:
                    break
                rgb = frame.to_ndarray(format="rgb24")[:height, :width].copy()
                draw_label(rgb, int(seg[n]), n + 1)
                encode(container, stream, rgb[None], n)
                n += 1
        finally:
            finish(container, stream)
    if n != info.num_frames:
        raise ValueError(f"video {info.path!r}: decoded {n} of {info.num_frames} frames")
    return dict(num_frames=n, fps=float(rate), width=width, height=height,
                segments=len(segment_ranges(n, info.fps)))


__all__ = ["overlay_video", "draw_label", "draw_labels", "label_box", "segment_of_frames", "font_px",
           "open_encoder", "encode", "finish"]
