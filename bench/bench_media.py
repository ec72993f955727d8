"""Media-path benchmarks: ours against the reference's way, measured in the same run (2-core CPU).

1. frame+zoom  FIND_FRAME then SPATIAL_ZOOM on a 640x360 H.264 video, up to `pixel_values`:
               reference = OpenCV open + seek + read, cv2.imwrite JPEG, PIL re-read, crop via cv2.imread +
               cv2.imwrite, PIL re-read of both, resize (qwen-vl-utils fetch_image), transformers'
               Qwen2VLImageProcessor (train/manipulation_utils.py + vision_process.py);
               ours = ManipulationEnv.step x2 on cached frames + videocom_fast.preprocess_media (fused kernel;
               transformers' processor on the crops if the kernel is not importable). "cold" adds the decode.
2. rewatch     a group of 8 rollouts each rewatching the same 16-frame segment: a new decoder per request
               (open + sorted-pass decode, PyAV) vs ManipulationEnv forks sharing one FrameCache.
3. decode      frames/s per backend, 16 random indices vs 16 contiguous frames (no cache).
Run: .venv/bin/pytest bench/bench_media.py --benchmark-only   (prints a ratio table at the end)
"""
from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers_media import make_frames, write_video  # noqa: E402

from videocom_fast import protocol  # noqa: E402
from videocom_fast.env import ManipulationEnv  # noqa: E402
from videocom_fast.media import FrameCache, open_video  # noqa: E402

H, W, FPS = 360, 640, 24
IMG_MIN, IMG_MAX = 4 * 28 * 28, 128 * 28 * 28
_results: dict[str, float] = {}
_extra: dict[str, str] = {}


@pytest.fixture(scope="module")
def files():
    d = tempfile.mkdtemp(prefix="bench_media_")
    frames = make_frames(20 * FPS, H, W, seed=0)
    out = {"h264": str(write_video(os.path.join(d, "v.mp4"), frames, fps=FPS, codec="h264")),  # x264 GOP 250
           "h264_gop48": str(write_video(os.path.join(d, "g.mp4"), frames, fps=FPS, codec="h264", gop=48))}
    short = frames[:8 * FPS]
    out["vp9"] = str(write_video(os.path.join(d, "v.webm"), short, fps=FPS, codec="vp9", gop=48))
    out["mjpeg"] = str(write_video(os.path.join(d, "v.avi"), short, fps=FPS, codec="mjpeg"))
    out["dir"] = d
    yield out
    shutil.rmtree(d, ignore_errors=True)


def _sample(path):
    return {"video": path, "conversations": [{"from": "human", "value": "<video>\nWhat does the tag say?"}]}


# --- 1. FIND_FRAME + SPATIAL_ZOOM ------------------------------------------------------------------

FRAME, BOX_RESIZED = 211, (150, 80, 260, 170)   # box in the 224x420 resized frame the model saw


def _processor():
    from transformers import Qwen2VLImageProcessor
    return Qwen2VLImageProcessor(min_pixels=IMG_MIN, max_pixels=IMG_MAX)


def reference_frame_zoom(path, workdir, k, processor):
    """The reference's path (manipulation_utils.get_image_from_video + crop_bbox_image + fetch_image)."""
    import cv2
    from PIL import Image

    image_path = os.path.join(workdir, f"frame_{k}.jpg")
    cap = cv2.VideoCapture(path)
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    assert 0 < FRAME < total
    cap.set(cv2.CAP_PROP_POS_FRAMES, FRAME - 1)
    ok, frame = cap.read()
    cap.release()
    cv2.imwrite(image_path, frame)
    crop_path = image_path.replace(".jpg", "_crop.jpg")
    img = cv2.imread(image_path)
    x1, y1, x2, y2 = BOX_RESIZED   # the reference applied the resized-frame box unscaled (defect 6)
    cv2.imwrite(crop_path, img[y1:y2, x1:x2])
    images = []
    for p in (image_path, crop_path):   # fetch_image: PIL open, RGB, smart_resize, PIL resize
        im = Image.open(p).convert("RGB")
        h, w = protocol.smart_resize(im.height, im.width, min_pixels=IMG_MIN, max_pixels=IMG_MAX)
        images.append(im.resize((w, h)))
    out = processor(images=images, return_tensors="pt")
    return out["pixel_values"]


def ours_frame_zoom(env, preprocess, processor):
    a = env.step(f"FIND_FRAME(the tag) = [{FRAME}]")
    b = env.step("SPATIAL_ZOOM(the tag) = [{}, {}, {}, {}]".format(*BOX_RESIZED))
    items = a.media + b.media
    if preprocess is not None:
        return preprocess(items)
    crops = []
    for it in items:   # fallback while the fused kernel is missing: the processor on the uint8 crop
        f = it.frames[0]
        if it.box is not None:
            x1, y1, x2, y2 = it.box
            f = f[y1:y2, x1:x2]
        crops.append(f.permute(2, 0, 1))
    return processor(images=crops, return_tensors="pt")["pixel_values"]


def _preprocess():
    try:
        from videocom_fast.preprocess import preprocess_media
        return preprocess_media
    except ImportError:
        return None


@pytest.mark.benchmark(group="frame+zoom 640x360 h264")
def test_frame_zoom_reference(benchmark, files):
    processor = _processor()
    counter = iter(range(10**6))
    benchmark.extra_info["role"] = "baseline"
    def ref():
        return reference_frame_zoom(files["h264"], files["dir"], next(counter), processor)

    out = benchmark.pedantic(ref, rounds=12, warmup_rounds=1)
    assert out.shape[1] == 1176
    _results["frame_zoom_ref"] = benchmark.stats["median"]


@pytest.mark.benchmark(group="frame+zoom 640x360 h264")
def test_frame_zoom_ours_cached(benchmark, files):
    env = ManipulationEnv(_sample(files["h264"]), cache=FrameCache())
    pre, proc = _preprocess(), None if _preprocess() else _processor()
    ours_frame_zoom(env, pre, proc)   # the first rollout of the group decoded the frame
    out = benchmark.pedantic(lambda: ours_frame_zoom(env.fork(), pre, proc), rounds=50, warmup_rounds=2)
    assert len(out) == 2
    benchmark.extra_info["preprocess"] = "fused" if pre else "transformers"
    _results["frame_zoom_ours"] = benchmark.stats["median"]


@pytest.mark.benchmark(group="frame+zoom 640x360 h264")
def test_frame_zoom_ours_cold(benchmark, files):
    env = ManipulationEnv(_sample(files["h264"]), cache=FrameCache())
    pre, proc = _preprocess(), None if _preprocess() else _processor()

    def cold():
        e = env.fork()
        e.cache = FrameCache()   # nothing cached: includes seek + decode of the frame
        return ours_frame_zoom(e, pre, proc)

    benchmark.pedantic(cold, rounds=8, warmup_rounds=1)
    _results["frame_zoom_cold"] = benchmark.stats["median"]


# --- 2. a group of 8 rollouts rewatching one segment ----------------------------------------------

GROUP = 8


def _rewatch_indices(src, segment=2):
    tr = protocol.segment_time_ranges(src.num_frames, src.fps, [segment])
    return protocol.sample_frame_indices(src.num_frames, src.fps, 16, time_ranges=tr)


@pytest.mark.benchmark(group="rewatch x8, 16 frames")
def test_rewatch_new_decoder_per_request(benchmark, files):
    path = files["h264_gop48"]
    idx = _rewatch_indices(open_video(path))

    def group():
        for _ in range(GROUP):
            src = open_video(path, backend="pyav", verify="none")
            src.get_frames(idx)
            src.close()

    benchmark.extra_info["role"] = "baseline"
    benchmark.pedantic(group, rounds=4, warmup_rounds=1)
    _results["rewatch_ref"] = benchmark.stats["median"]


@pytest.mark.benchmark(group="rewatch x8, 16 frames")
def test_rewatch_shared_cache(benchmark, files):
    env = ManipulationEnv(_sample(files["h264_gop48"]), cache=FrameCache())

    def group():
        env.cache = FrameCache()   # a new group: nothing cached yet
        for e in [env.fork() for _ in range(GROUP)]:
            obs = e.step("FIND_SEGMENT(the tag) = [2]")
            assert obs.reason == "ok" and len(obs.media[0].indices) == 16
        return env.cache.stats()

    st = benchmark.pedantic(group, rounds=4, warmup_rounds=1)
    assert st["decoded"] == 16 and st["hits"] == 16 * (GROUP - 1)
    _results["rewatch_ours"] = benchmark.stats["median"]


# --- 3. decode throughput per backend -------------------------------------------------------------

def _backends(codec):
    out = ["pyav"]
    if codec in ("vp9", "mjpeg"):
        try:
            import nvidia.dali  # noqa: F401
            out.append("dali")
        except ImportError:
            pass
    try:
        import torchcodec.decoders  # noqa: F401
        out.append("torchcodec")
    except ImportError:
        pass
    return out


CASES = [(c, b, pat) for c in ("h264", "h264_gop48", "vp9", "mjpeg") for b in _backends(c)
         for pat in ("random", "contiguous")]


@pytest.mark.parametrize("codec, backend, pattern", CASES)
def test_decode_throughput(benchmark, files, codec, backend, pattern):
    benchmark.group = f"decode 640x360 {codec}"
    src = open_video(files[codec], backend=backend)
    rng = random.Random(0)
    n = src.num_frames

    def request():
        if pattern == "random":
            idx = rng.sample(range(n), 16)
        else:
            s = rng.randrange(n - 16)
            idx = list(range(s, s + 16))
        return src.get_frames(idx)

    out = benchmark.pedantic(request, rounds=3, warmup_rounds=1)
    assert out.shape == (16, H, W, 3)
    fps = 16 / benchmark.stats["median"]
    benchmark.extra_info["frames_per_s"] = round(fps, 1)
    _results[f"decode {codec} {backend} {pattern}"] = fps


# --- the table ------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _ratio_table(request):
    yield
    if not _results:
        return
    r = _results
    lines = ["", "media benchmarks (2-core CPU, medians)"]
    if "frame_zoom_ref" in r and "frame_zoom_ours" in r:
        ref, ours = r["frame_zoom_ref"], r["frame_zoom_ours"]
        line = (f"  FIND_FRAME+SPATIAL_ZOOM 640x360: reference {ref * 1e3:.1f} ms, "
                f"ours cached {ours * 1e3:.2f} ms ({ref / ours:.1f}x)")
        if "frame_zoom_cold" in r:
            line += f", ours cold {r['frame_zoom_cold'] * 1e3:.1f} ms ({ref / r['frame_zoom_cold']:.1f}x)"
        lines.append(line)
    if "rewatch_ref" in r and "rewatch_ours" in r:
        ref, ours = r["rewatch_ref"], r["rewatch_ours"]
        lines.append(f"  8 rollouts rewatching 16 frames: new decoder each {ref * 1e3:.1f} ms, "
                     f"shared cache {ours * 1e3:.1f} ms ({ref / ours:.1f}x)")
    for k, v in r.items():
        if k.startswith("decode "):
            lines.append(f"  {k:<40} {v:8.1f} frames/s")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n".join(lines))
