"""Fused crop -> resize -> normalize -> patchify (C++ CPU kernel) against transformers' processors, same run.

    .venv/bin/pytest bench/bench_crop_resize_patchify.py --benchmark-only -s
    ... --benchmark-timer time.process_time   # CPU time: the steadier figure on a shared machine (1-thread rows)

Cases (issue 4): (a) a 32-frame 640x360 video -> 16 x 20 x 36 grid, against Qwen2VLVideoProcessor (torchvision,
the fast one); (b) 8 crops of assorted sizes from 1280x720 frames, against Qwen2VLImageProcessor (torchvision,
fast) and Qwen2VLImageProcessorPil (PIL, slow, the exactness oracle); (b) also into a reused out= buffer.
(a) and (b) also with the kernel's hand-written SIMD loops off (`set_cpu_simd(False)`: the compiler-vectorised
portable loops, the same build): what the hand loops of this CPU's ISA (AVX-512 VBMI, AVX-512 or AVX2) bring.
Also the machine's memcpy bandwidth, and the fused kernel's achieved GB/s (uint8 bytes read + output bytes
written) as a fraction of it. Every fused output is checked equal to the processor's before timing. Baselines
come from tests/test_preprocess.py.
"""
from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_preprocess import (IMG_PIXELS, VID_PIXELS, Qwen2VLImageProcessor, Qwen2VLImageProcessorPil,  # noqa: E402
                             Qwen2VLVideoProcessor, crop, oracle_images, oracle_video)

import videocom_fast  # noqa: E402
from videocom_fast import _C  # noqa: E402
from videocom_fast import preprocess as P  # noqa: E402

_TIMES: dict[tuple[str, int], float] = {}
_BYTES: dict[str, int] = {}
ROUNDS = dict(rounds=7, iterations=1, warmup_rounds=1)
THREADS = (1, 2)


def _median(benchmark, name, threads):
    _TIMES[name, threads] = benchmark.stats.stats.median


@pytest.fixture(params=THREADS, ids=lambda n: f"{n}thr")
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def video():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (32, 360, 640, 3), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def crops():
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (8, 720, 1280, 3), dtype=torch.uint8, generator=g)
    boxes = [(0, 0, 1280, 720), (100, 100, 400, 300), (500, 200, 1200, 700), (10, 10, 50, 90),
             (640, 0, 1280, 360), (300, 300, 333, 620), (0, 0, 97, 341), (200, 100, 1000, 650)]
    return list(frames), boxes


# --- memcpy bandwidth of this machine ------------------------------------------------------------------------
def test_memcpy(benchmark):
    src = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    benchmark.pedantic(lambda: dst.copy_(src), **ROUNDS)
    _median(benchmark, "memcpy", 0)
    _BYTES["memcpy"] = 2 * src.numel()  # read + write


# --- (a) video --------------------------------------------------------------------------------------------------
def test_video_fused_cpp(benchmark, video, threads):
    want, _ = oracle_video(video)
    with P.force_backend("cpp"):
        got, _ = videocom_fast.preprocess_video(video)
        assert torch.equal(got, want)
        benchmark.pedantic(lambda: videocom_fast.preprocess_video(video), **ROUNDS)
    _median(benchmark, "video_fused", threads)
    _BYTES["video_fused"] = video.numel() + got.numel() * got.element_size()


def test_video_processor_fast(benchmark, video, threads):
    proc = Qwen2VLVideoProcessor(**VID_PIXELS)
    frames_TCHW = video.permute(0, 3, 1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        benchmark.pedantic(lambda: proc(videos=[frames_TCHW], return_tensors="pt", cap_pixels_per_frame=False),
                           **ROUNDS)
    _median(benchmark, "video_fast", threads)


@contextmanager
def _portable_loops():
    """The kernel with its hand-written SIMD loops off (the compiler-vectorised portable loops): the baseline
    of the SIMD rows, same build, same run."""
    previous = _C.set_cpu_simd(False)
    try:
        yield
    finally:
        _C.set_cpu_simd(previous)


def test_video_fused_cpp_portable(benchmark, video, threads):
    with P.force_backend("cpp"), _portable_loops():
        benchmark.pedantic(lambda: videocom_fast.preprocess_video(video), **ROUNDS)
    _median(benchmark, "video_portable", threads)


# --- (b) 8 crops from 1280x720 frames ------------------------------------------------------------------------------
def test_crops_fused_cpp(benchmark, crops, threads):
    frames, boxes = crops
    want, _ = oracle_images([crop(f, b) for f, b in zip(frames, boxes)])
    with P.force_backend("cpp"):
        got, _ = videocom_fast.preprocess_images(frames, boxes=boxes)
        assert torch.equal(got, want)
        benchmark.pedantic(lambda: videocom_fast.preprocess_images(frames, boxes=boxes), **ROUNDS)
    _median(benchmark, "crops_fused", threads)
    _BYTES["crops_fused"] = sum((b[2] - b[0]) * (b[3] - b[1]) * 3 for b in boxes) + got.numel() * got.element_size()


def test_crops_fused_cpp_out(benchmark, crops, threads):
    """The same call writing into a reused pixel_values buffer (out=): no fresh pages for the kernel to fault in."""
    frames, boxes = crops
    with P.force_backend("cpp"):
        out, _ = videocom_fast.preprocess_images(frames, boxes=boxes)
        benchmark.pedantic(lambda: videocom_fast.preprocess_images(frames, boxes=boxes, out=out), **ROUNDS)
    _median(benchmark, "crops_fused_out", threads)
    _BYTES["crops_fused_out"] = _BYTES.get("crops_fused", 0)


def test_crops_fused_cpp_portable(benchmark, crops, threads):
    frames, boxes = crops
    with P.force_backend("cpp"), _portable_loops():
        benchmark.pedantic(lambda: videocom_fast.preprocess_images(frames, boxes=boxes), **ROUNDS)
    _median(benchmark, "crops_portable", threads)


def test_crops_processor_fast(benchmark, crops, threads):
    frames, boxes = crops
    proc = Qwen2VLImageProcessor(**IMG_PIXELS)
    images = [crop(f, b).permute(2, 0, 1) for f, b in zip(frames, boxes)]
    benchmark.pedantic(lambda: proc(images=images, return_tensors="pt"), **ROUNDS)
    _median(benchmark, "crops_fast", threads)


def test_crops_processor_slow_pil(benchmark, crops, threads):
    frames, boxes = crops
    proc = Qwen2VLImageProcessorPil(**IMG_PIXELS)
    images = [np.ascontiguousarray(crop(f, b)) for f, b in zip(frames, boxes)]
    benchmark.pedantic(lambda: proc(images=images, return_tensors="pt", input_data_format="channels_last"), **ROUNDS)
    _median(benchmark, "crops_slow", threads)


# --- the table ------------------------------------------------------------------------------------------------------
def test_zz_report(benchmark):
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    names = ("video_fused", "video_fast", "video_portable", "crops_fused", "crops_fused_out", "crops_fast",
             "crops_slow", "crops_portable")
    if ("memcpy", 0) not in _TIMES or not all((k, n) in _TIMES for k in names for n in THREADS):
        pytest.skip("run the whole file to get the table")
    bw = _BYTES["memcpy"] / _TIMES["memcpy", 0] / 1e9
    lines = [f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, memcpy {bw:.1f} GB/s "
             f"(read + write), kernel SIMD loops: {_C.cpu_simd_isa()}",
             f"{'case':<34}{'thr':>4}{'fused ms':>10}{'baseline ms':>13}{'speedup':>9}{'fused GB/s':>12}{'% memcpy':>10}"]
    for n in THREADS:
        for case, fused, base in [("(a) video 32x640x360 vs fast", "video_fused", "video_fast"),
                                  ("(b) 8 crops 1280x720 vs fast", "crops_fused", "crops_fast"),
                                  ("(b) 8 crops 1280x720 vs slow PIL", "crops_fused", "crops_slow"),
                                  ("(b) same, out= reused vs slow PIL", "crops_fused_out", "crops_slow"),
                                  ("(a) video, SIMD vs portable loops", "video_fused", "video_portable"),
                                  ("(b) crops, SIMD vs portable loops", "crops_fused", "crops_portable")]:
            gbs = _BYTES[fused] / _TIMES[fused, n] / 1e9
            lines.append(f"{case:<34}{n:>4}{_TIMES[fused, n] * 1e3:>10.1f}{_TIMES[base, n] * 1e3:>13.1f}"
                         f"{_TIMES[base, n] / _TIMES[fused, n]:>8.1f}x{gbs:>12.2f}{100 * gbs / bw:>9.0f}%")
    print("\n" + "\n".join(lines))
