"""GPU preprocessing kernels against the C++ kernel, bit for bit (marker `gpu`; `make gpu-check` runs them).

The Triton and CUDA crop -> resize -> normalize -> patchify kernels must produce the very tensor the C++
kernel produces on the CPU (itself proved equal to Pillow / torchvision in test_crop_resize_patchify.py):
same uint8 arithmetic (csrc/include/crop_resize_patchify.h), the normalisation table already in the output
dtype, so equality is exact in every dtype. Fresh random frames each run, odd sizes (1x1, 97x341, a tall image
that Pillow resizes vertically first, a 1280x720 crop), odd frame counts, outputs poisoned with NaN first.
Without a CUDA device every test skips (checked when a test runs, never at import).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from videocom_fast import preprocess as P

pytestmark = pytest.mark.gpu

IMAGE_SIZES = [(97, 341), (1, 1), (120, 40), (300, 60), (720, 1280)]
IMAGE_BOXES = [None, None, (3, 5, 30, 100), None, (100, 50, 1001, 700)]   # x1, y1, x2, y2
VIDEO_SHAPES = [(5, 50, 70), (9, 360, 640)]                               # odd T repeats the last frame
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")


def _frames(g, shapes):
    return [torch.randint(0, 256, (*s, 3), dtype=torch.uint8, generator=g) for s in shapes]


def _poisoned(like: torch.Tensor, device) -> torch.Tensor:
    return torch.full(like.shape, float("nan"), dtype=like.dtype, device=device)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _check_backend(backend: str, device, dtype):
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    images, videos = _frames(g, IMAGE_SIZES), _frames(g, VIDEO_SHAPES)
    img_kw = dict(boxes=IMAGE_BOXES, max_pixels=64 * 28 * 28, dtype=dtype)
    vid_kw = dict(min_pixels=8 * 28 * 28, max_pixels=64 * 28 * 28, dtype=dtype)
    with P.force_backend("cpp"):
        want_i, grid_i = P.preprocess_images(images, **img_kw)
        want_v, grid_v = P.preprocess_video(videos, **vid_kw)
    with P.force_backend(backend):
        got_i, g_i = P.preprocess_images([x.to(device) for x in images], out=_poisoned(want_i, device), **img_kw)
        got_v, g_v = P.preprocess_video([x.to(device) for x in videos], out=_poisoned(want_v, device), **vid_kw)
    assert got_i.device.type == got_v.device.type == device.type   # frames stay on the device
    assert torch.equal(g_i, grid_i) and torch.equal(g_v, grid_v)
    for got, want, what in ((got_i, want_i, "images"), (got_v, want_v, "videos")):
        got = got.cpu()
        assert not got.isnan().any(), f"{backend} {dtype} {what}: rows left unwritten"
        bad = (_bits(got) != _bits(want)).sum().item()
        assert bad == 0, (f"{backend} {dtype} {what}: {bad} values differ from the C++ kernel, "
                          f"max |diff| {(got.float() - want.float()).abs().max().item()}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_kernel_equals_cpp_kernel(cuda, dtype):
    pytest.importorskip("triton")
    _check_backend("triton", cuda, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_kernel_equals_cpp_kernel(cuda, dtype):
    from videocom_fast import _C
    if not getattr(_C, "with_cuda", False):
        pytest.skip("videocom_fast._C was built without CUDA: rebuild with VIDEOCOM_CUDA=ON (make gpu-check does)")
    _check_backend("cuda", cuda, dtype)


def test_auto_picks_a_gpu_kernel_for_cuda_frames(cuda):
    """What the engine gets without forcing: frames on the GPU stay there and run a GPU kernel."""
    from videocom_fast import _C
    want = "cuda" if getattr(_C, "with_cuda", False) else "triton"
    assert P.select_backend(cuda) == want
