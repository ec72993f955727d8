"""Tiny video writers for the media tests and benches, with frames that carry their own index.

Every frame gets a barcode of its 0-based index in the top band (16 bits, one coarse black/white block
per bit, MSB first): the barcode survives lossy coding, so `read_index(frame)` tells which frame a decoder
really returned, independently of any decoder (the oracle for "exact frames, not the nearest keyframe").
Below the band: a random texture that moves with the frame index (so neighbouring frames differ everywhere).

    frames_THWC = make_frames(40, 96, 160, seed=3)
    write_video(path, frames_THWC, fps=8, codec="h264")    # "h264" (mp4), "vp9" (webm), "mjpeg" (avi/mkv)
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

BITS = 16
BAND = 16   # barcode band height in pixels; frames must be at least BAND + 8 high and BITS * 4 wide

_CODECS = {"h264": ("libx264", ".mp4"), "vp9": ("libvpx-vp9", ".webm"), "mjpeg": ("mjpeg", ".avi"),
           "mpeg4": ("mpeg4", ".mp4")}


def make_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (T, H, W, 3): barcode of the frame index on top, a moving random texture below."""
    rng = np.random.default_rng(seed)
    tile = rng.integers(0, 256, size=(height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    tex = np.kron(tile, np.ones((8, 8, 1), dtype=np.uint8))  # 8x8 blocks: codec-friendly, still distinct
    out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        dy, dx = (3 * t) % 8 + 1, (5 * t) % 8 + 1
        out[t] = tex[dy:dy + height, dx:dx + width]
        out[t, :BAND] = barcode(t, width)
    return out


def barcode(index: int, width: int) -> np.ndarray:
    """uint8 (BAND, width, 3) band: bit b of `index` (MSB first) is the b-th block, white for 1."""
    band = np.zeros((BAND, width, 3), dtype=np.uint8)
    bw = width // BITS
    for b in range(BITS):
        if (index >> (BITS - 1 - b)) & 1:
            band[2:BAND - 2, b * bw + 1:(b + 1) * bw - 1] = 255
    return band


def read_index(frame_HWC) -> int:
    """The index encoded by `barcode` in a decoded frame (any uint8 array-like of shape (H, W, 3))."""
    f = np.asarray(frame_HWC)
    bw = f.shape[1] // BITS
    value = 0
    for b in range(BITS):
        block = f[4:BAND - 4, b * bw + 2:(b + 1) * bw - 2].astype(np.float32)
        value = (value << 1) | int(block.mean() > 127)
    return value


def write_video(path, frames_THWC, fps=8, codec: str = "h264", *, gop: int | None = None,
                crf: int = 18) -> Path:
    """Encode uint8 (T, H, W, 3) frames with PyAV; returns the path. `gop`: keyframe interval."""
    import av

    path = Path(path)
    name, _ = _CODECS[codec]
    frames_THWC = np.ascontiguousarray(frames_THWC)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(name, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames_THWC.shape[2], frames_THWC.shape[1]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        opts = {}
        if codec == "h264":
            opts = {"crf": str(crf), "preset": "veryfast"}
        elif codec == "vp9":
            opts = {"crf": "30", "b": "0", "deadline": "realtime", "cpu-used": "8"}
        elif codec == "mjpeg":
            stream.codec_context.qmin = stream.codec_context.qmax = 2  # near-lossless JPEG
        if gop is not None:
            stream.codec_context.gop_size = gop
        stream.options = opts
        for f in frames_THWC:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def default_suffix(codec: str) -> str:
    return _CODECS[codec][1]
