"""DALI's GPU decoder against PyAV on an H.264 file with B-frames (marker `gpu`; `make gpu-check` runs it).

What `open_video` picks on a CUDA machine is DALI's mixed (NVDEC) backend; its CPU variant refuses H.264, so
only a GPU machine can check it. Oracle: every frame carries a barcode of its own index (helpers_media), so
"the exact frames asked for" is checked independently of either decoder, in an order that jumps backwards and
repeats (B-frames are decoded out of display order: a decoder that returns frames in decode order, or the
nearest keyframe, fails here). Pixels: H.264 decoding is bit-exact by the standard, but DALI and PyAV's
swscale convert YUV 4:2:0 to RGB differently (chroma upsampling, rounding), so pixels are compared within the
tolerance test_media.py states for DALI. The video is `make gpu-carry`'s pre-made file when present (the lent
GPU machines cannot encode one), else written here with PyAV. DALI's wheel (199 MB) cannot travel to the
lent machines, so there this test skips with that reason.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_media import make_frames, read_index, write_video

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
CARRIED_VIDEO = ROOT / ".gpu-carry" / "videos" / "h264_bframes.mp4"
NUM_FRAMES = 60


def h264_with_bframes(directory: Path) -> Path:
    """An H.264 file whose stream has B-frames (libx264 veryfast: 3 B-frames between references)."""
    frames = make_frames(NUM_FRAMES, 90, 162, seed=int(np.random.default_rng().integers(1 << 31)))
    return write_video(directory / "h264_bframes.mp4", frames, fps=8, codec="h264", gop=12)


def picture_types(path) -> list[str]:
    import av
    from av.video.frame import PictureType
    with av.open(str(path)) as c:   # pict_type is a plain int in PyAV 18
        return [PictureType(int(f.pict_type)).name for f in c.decode(c.streams.video[0])]


@pytest.fixture
def video(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        pytest.skip("nvidia-dali not installed: DALI's GPU decoder cannot be checked (its 199 MB wheel does "
                    "not fit what travels to the lent GPU machines)")
    if importlib.util.find_spec("av") is None:
        pytest.skip("PyAV not installed: no oracle decoder (make gpu-carry carries its wheel)")
    return CARRIED_VIDEO if CARRIED_VIDEO.exists() else h264_with_bframes(tmp_path)


def test_dali_gpu_frames_equal_pyav_on_h264_with_bframes(video):
    from videocom_fast.media import open_video

    types = picture_types(video)
    assert "B" in types, f"{video}: no B-frames ({set(types)}); the test would not exercise reordering"
    dali, pyav = open_video(video, backend="dali"), open_video(video, backend="pyav")
    assert dali.backend == "dali" and dali.num_frames == pyav.num_frames == len(types)
    n = dali.num_frames
    idx = [n - 1, 1, 2, 2, 0, n // 2, 3, n // 2 - 1]   # backwards jumps and repeats, B-frames among them
    assert any(types[i] == "B" for i in idx)
    got = dali.get_frames(idx).cpu()                  # DALI may hand back CUDA frames
    want = pyav.get_frames(idx)
    assert got.dtype == torch.uint8 and got.shape == want.shape
    assert [read_index(f) for f in got.numpy()] == idx
    assert [read_index(f) for f in want.numpy()] == idx
    diff = np.abs(got.numpy().astype(np.int16) - want.numpy().astype(np.int16))
    # same decoded YUV, different YUV -> RGB conversion: test_media.py's measured bounds for DALI vs PyAV
    assert diff.mean() < 10
    assert diff[:, 4:12].max() <= 12
