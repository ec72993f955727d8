"""videocom_fast.preprocess_* and patch_processor against transformers' Qwen2-VL processors (the oracles).

Images: `Qwen2VLImageProcessorPil` (PIL bicubic, what the reference used for frames and crops) on the cropped
images; videos: `Qwen2VLVideoProcessor` (torchvision bicubic + antialias on uint8). Each backend that runs on
this machine (C++ and the PyTorch reference; Triton is covered in test_crop_resize_patchify.py) must return the
oracle's tensor exactly, in each dtype as `oracle_fp32.to(dtype)`. Inputs are fresh random images, odd sizes,
1x1 and full-frame crops, up- and downscales, and JPEG-decoded "real" frames with a burned-in label.
"""
from __future__ import annotations

import io
import types
import warnings

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import torch

import videocom_fast
from videocom_fast import preprocess as P

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor  # noqa: E402
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor  # noqa: E402

BACKENDS = ["cpp", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IMG_PIXELS = dict(min_pixels=4 * 28 * 28, max_pixels=128 * 28 * 28)
VID_PIXELS = dict(min_pixels=128 * 28 * 28, max_pixels=360 * 420)


# --- oracles (also imported by bench/bench_crop_resize_patchify.py) -------------------------------------------
def oracle_images(crops_HWC, **pixels):
    proc = Qwen2VLImageProcessorPil(**(pixels or IMG_PIXELS))
    out = proc(images=[np.ascontiguousarray(c) for c in crops_HWC], return_tensors="pt",
               input_data_format="channels_last")
    return out["pixel_values"], out["image_grid_thw"]


def oracle_video(frames_THWC, **pixels):
    proc = Qwen2VLVideoProcessor(**(pixels or VID_PIXELS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = proc(videos=[frames_THWC.permute(0, 3, 1, 2)], return_tensors="pt", cap_pixels_per_frame=False)
    return out["pixel_values_videos"], out["video_grid_thw"]


def real_frame(h: int, w: int, seed: int) -> torch.Tensor:
    """A natural-ish frame: gradients, shapes, the Video-CoM overlay label, through a JPEG round trip."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 3) % 256], -1)
    img = PIL.Image.fromarray(base.astype(np.uint8))
    draw = PIL.ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.ellipse([x0, y0, x0 + int(rng.integers(5, 80)), y0 + int(rng.integers(5, 80))],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw.text((4, 2), "Segment-3\nFrame-117", fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return torch.from_numpy(np.asarray(PIL.Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).copy())


def crop(image, box):
    return image if box is None else image[box[1]:box[3], box[0]:box[2]]


def assert_same(got, want, dtype):
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got, want.to(dtype)), (got.float() - want.to(dtype).float()).abs().max()


# --- images ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_images_match_pil_processor(backend, dtype):
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    images = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g)
              for h, w in [(97, 341), (360, 640), (20, 30), (720, 1280), (5, 9), (600, 100)]]
    boxes = [None,                      # odd size, mild downscale
             (100, 37, 101, 38),        # 1x1 crop -> 56x56 upscale
             (0, 0, 30, 20),            # full-frame crop given explicitly, upscale
             (13, 101, 1211, 689),      # big crop, strong downscale
             None,                      # tiny image, upscale
             None]                      # tall: Pillow >= 13 resizes vertically first
    want, want_grid = oracle_images([crop(i, b) for i, b in zip(images, boxes)])
    with P.force_backend(backend):
        got, grid = videocom_fast.preprocess_images(images, boxes=boxes, dtype=dtype)
    assert torch.equal(grid, want_grid)
    assert_same(got, want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_images_batched_tensor_and_real_frames(backend):
    frames = torch.stack([real_frame(360, 640, seed) for seed in range(3)])
    boxes = [(17, 5, 301, 333), None, torch.tensor([600, 300, 640, 360])]
    want, want_grid = oracle_images([crop(f, [int(v) for v in b] if b is not None else None)
                                     for f, b in zip(frames, boxes)])
    with P.force_backend(backend):
        got, grid = videocom_fast.preprocess_images(frames, boxes=boxes)
    assert torch.equal(grid, want_grid)
    assert torch.equal(got, want)


def test_images_random_sizes_cpp():
    rng = np.random.default_rng()
    g = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    images, boxes = [], []
    for _ in range(12):
        h, w = (int(v) for v in rng.integers(1, 500, 2))
        if max(h, w) / min(h, w) > 150:
            continue
        images.append(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g))
        x1, y1 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x2, y2 = int(rng.integers(x1 + 1, w + 1)), int(rng.integers(y1 + 1, h + 1))
        box = (x1, y1, x2, y2) if max(x2 - x1, y2 - y1) / min(x2 - x1, y2 - y1) <= 150 else None
        boxes.append(box)
    want, want_grid = oracle_images([crop(i, b) for i, b in zip(images, boxes)])
    # NOTE: sides under 14 px with a long other side get different sizes from transformers' smart_resize and
    # ours (qwen-vl-utils': sides >= 28 before the area check); compare the kernel at the processor's sizes.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    sizes = lambda h, w, lo, hi: smart_resize(h, w, P.FACTOR, lo, hi)  # noqa: E731
    with P.force_backend("cpp"):
        got, grid = videocom_fast.preprocess_images(images, boxes=boxes, _size_fn=sizes)
    assert torch.equal(grid, want_grid) and torch.equal(got, want)


def test_size_rule_is_the_reference_one():
    """preprocess_images sizes with the protocol's smart_resize (sides >= 28 first, as qwen-vl-utils did)."""
    image = torch.zeros(13, 441, 3, dtype=torch.uint8)
    _, grid = videocom_fast.preprocess_images([image])
    assert tuple(grid[0].tolist()) == (1, 28 // 14, 448 // 14)  # transformers' rule gives 28 x 336
    _, want_grid = oracle_images([image])
    assert tuple(want_grid[0].tolist()) == (1, 2, 336 // 14)


# --- videos ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_frames", [5, 4])
def test_video_matches_video_processor(backend, dtype, num_frames):
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    frames = torch.randint(0, 256, (num_frames, 97, 341, 3), dtype=torch.uint8, generator=g)
    want, want_grid = oracle_video(frames)
    with P.force_backend(backend):
        got, grid = videocom_fast.preprocess_video(frames, dtype=dtype)
    assert torch.equal(grid, want_grid)
    assert_same(got, want, dtype)


def test_video_real_frames_downscale_cpp():
    frames = torch.stack([real_frame(360, 640, seed) for seed in range(3)])  # odd T, 360x640 -> 280x504
    want, want_grid = oracle_video(frames)
    with P.force_backend("cpp"):
        got, grid = videocom_fast.preprocess_video(frames)
    assert torch.equal(grid, want_grid) and torch.equal(got, want)


# --- the rollout entry -------------------------------------------------------------------------------------------
def test_preprocess_media_mixed_items():
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    frame = torch.randint(0, 256, (1, 120, 200, 3), dtype=torch.uint8, generator=g)
    video = torch.randint(0, 256, (3, 60, 80, 3), dtype=torch.uint8, generator=g)
    item = types.SimpleNamespace
    items = [item(kind="image", frames=frame, box=None, **IMG_PIXELS),
             item(kind="video", frames=video, box=None, min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28),
             item(kind="image", frames=frame, box=(10, 20, 77, 99), **IMG_PIXELS)]
    got = videocom_fast.preprocess.preprocess_media(items)
    want0, grid0 = oracle_images([frame[0]])
    want1, grid1 = oracle_video(video, min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    want2, grid2 = oracle_images([frame[0, 20:99, 10:77]])
    for (pv, grid), (w, wg) in zip(got, [(want0, grid0), (want1, grid1), (want2, grid2)]):
        assert grid.shape == (1, 3) and grid.dtype == torch.int64 and torch.equal(grid, wg)
        assert torch.equal(pv, w)


# --- bad input -> ValueError naming the argument and index ---------------------------------------------------------
def test_bad_inputs_name_argument_and_index():
    ok = torch.zeros(30, 40, 3, dtype=torch.uint8)
    cases = [
        (dict(images=[ok, ok.float()]), r"images\[1\]: expected dtype uint8"),
        (dict(images=[ok, torch.zeros(30, 40, 4, dtype=torch.uint8)]), r"images\[1\]: expected 3 channels"),
        (dict(images=[torch.zeros(2, 30, 40, 3, dtype=torch.uint8)]), r"images\[0\]: expected \(H, W, 3\)"),
        (dict(images=torch.zeros(30, 40, 3, dtype=torch.uint8)), r"images: expected \(N, H, W, 3\)"),
        (dict(images=[ok, ok], boxes=[None, (0, 0, 41, 30)]), r"boxes\[1\]: .*outside"),
        (dict(images=[ok, ok], boxes=[(5, 5, 5, 9), None]), r"boxes\[0\]: .*empty"),
        (dict(images=[ok, ok], boxes=[None, (0, 0, 1.5, 3)]), r"boxes\[1\]: expected 4 integer"),
        (dict(images=[ok], boxes=[None, None]), r"boxes: expected one box"),
        (dict(images=[ok], boxes=[torch.tensor([0, 0, 4, 4], device="meta")]), r"boxes\[0\]: on meta"),
        (dict(images=[ok], dtype=torch.int32), r"dtype"),
        (dict(images=[]), r"images: expected a non-empty"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            videocom_fast.preprocess_images(**kwargs)
    with pytest.raises(ValueError, match=r"frames: expected \(T, H, W, 3\)"):
        videocom_fast.preprocess_video(ok)
    with pytest.raises(ValueError, match=r"frames\[1\]: expected dtype uint8"):
        videocom_fast.preprocess_video([ok[None], ok[None].float()])
    with pytest.raises(ValueError, match=r"items\[0\].kind"):
        videocom_fast.preprocess.preprocess_media([types.SimpleNamespace(kind="audio", frames=ok[None])])


# --- out=: a preallocated pixel_values buffer ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_buffer_is_filled_and_returned(backend):
    """out= gets every value (poisoned with NaN first), is the tensor returned, and equals the oracle; reused
    for a second call with other pixels, it holds that call's result."""
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    frames = torch.randint(0, 256, (2, 61, 97, 3), dtype=torch.uint8, generator=g)
    boxes = [(3, 5, 90, 60), None]
    want, grid = oracle_images([crop(f, b) for f, b in zip(frames, boxes)])
    out = torch.full_like(want, float("nan"))
    with P.force_backend(backend):
        got, got_grid = videocom_fast.preprocess_images(list(frames), boxes=boxes, out=out)
        assert got is out and torch.equal(got, want) and torch.equal(got_grid, grid)
        frames2 = torch.randint(0, 256, frames.shape, dtype=torch.uint8, generator=g)
        want2, _ = oracle_images([crop(f, b) for f, b in zip(frames2, boxes)])
        assert torch.equal(videocom_fast.preprocess_images(list(frames2), boxes=boxes, out=out)[0], want2)
        video = torch.randint(0, 256, (3, 40, 70, 3), dtype=torch.uint8, generator=g)
        want_v, _ = oracle_video(video)
        out_v = torch.full((want_v.shape[0], P.PATCH_DIM), float("nan"), dtype=torch.bfloat16)
        got_v, _ = videocom_fast.preprocess_video(video, out=out_v, dtype=torch.bfloat16)
        assert got_v is out_v and torch.equal(got_v, want_v.to(torch.bfloat16))


def test_cpu_outputs_reuse_only_dead_buffers(monkeypatch):
    """Fresh CPU outputs come from recycled buffers (preprocess._OutputCache): a live output is never handed out
    again, a dead one is, and the recycled buffer holds the new call's values (poisoned first)."""
    import gc

    monkeypatch.setattr(P, "_OUT_CACHE", P._OutputCache(1 << 28))  # empty: no buffers from earlier tests
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    images = [torch.randint(0, 256, (3, 83, 129, 3), dtype=torch.uint8, generator=g)[i] for i in range(3)]
    with P.force_backend("cpp"):
        first, _ = videocom_fast.preprocess_images([images[0]])
        second, _ = videocom_fast.preprocess_images([images[1]])
        assert first.data_ptr() != second.data_ptr()
        assert torch.equal(first, oracle_images([images[0]])[0]) and torch.equal(second, oracle_images([images[1]])[0])
        ptr = first.data_ptr()
        first.fill_(float("nan"))
        del first
        gc.collect()
        third, _ = videocom_fast.preprocess_images([images[2]])
        assert third.data_ptr() == ptr  # the dead buffer, refilled
        assert torch.equal(third, oracle_images([images[2]])[0])
        assert torch.equal(second, oracle_images([images[1]])[0])  # the live one untouched


def test_out_buffer_bad_shape_dtype_layout_name_out():
    image = torch.zeros(56, 56, 3, dtype=torch.uint8)  # a 4 x 4 patch grid: 16 rows of 1176
    bad = [torch.empty(17, P.PATCH_DIM), torch.empty(16, P.PATCH_DIM - 1), torch.empty(16, P.PATCH_DIM, dtype=torch.float16),
           torch.empty(P.PATCH_DIM, 16).t(), torch.empty(16, P.PATCH_DIM, requires_grad=True),
           np.empty((16, P.PATCH_DIM))]
    for out in bad:
        with pytest.raises(ValueError, match=r"^out: expected a contiguous \(16, 1176\) torch.float32 tensor on cpu"):
            videocom_fast.preprocess_images([image], out=out)
    with pytest.raises(ValueError, match=r"^out: "):
        videocom_fast.preprocess_video(image[None].expand(2, -1, -1, -1), out=torch.empty(3, P.PATCH_DIM))


# --- dispatch ----------------------------------------------------------------------------------------------------
def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("VIDEOCOM_BACKEND", raising=False)
    assert P.select_backend(cpu) == "cpp"
    monkeypatch.setenv("VIDEOCOM_BACKEND", "torch")
    assert P.select_backend(cpu) == "torch"
    with P.force_backend("cpp"):
        assert P.select_backend(cpu) == "cpp"
    monkeypatch.setenv("VIDEOCOM_BACKEND", "warp")
    with pytest.raises(ValueError, match="VIDEOCOM_BACKEND"):
        P.select_backend(cpu)
    monkeypatch.setenv("VIDEOCOM_BACKEND", "cuda")
    with pytest.raises(ValueError, match="cuda"):
        P.select_backend(cpu)
    with pytest.raises(ValueError, match="force_backend"):
        with P.force_backend("nope"):
            pass
    if "TRITON_INTERPRET" not in __import__("os").environ:
        with P.force_backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET"):
            P.select_backend(cpu)


# --- patch_processor ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Qwen2VLImageProcessorPil, Qwen2VLImageProcessor])
def test_patch_processor_images_identical(cls, monkeypatch):
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    images = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy()
              for h, w in [(97, 341), (10, 2000), (300, 200)]]  # (10, 2000): transformers' size rule, not ours
    plain = cls(**IMG_PIXELS)
    patched = videocom_fast.patch_processor(cls(**IMG_PIXELS))
    assert videocom_fast.patch_processor(patched) is patched  # idempotent
    calls = []
    run = P._run
    monkeypatch.setattr(P, "_run", lambda items, dtype: calls.append(len(items)) or run(items, dtype))
    for kwargs in (dict(return_tensors="pt"), dict()):
        want, got = plain(images=images, **kwargs), patched(images=images, **kwargs)
        assert type(got["pixel_values"]) is type(want["pixel_values"])
        assert torch.equal(torch.as_tensor(got["pixel_values"]), torch.as_tensor(want["pixel_values"]))
        assert torch.equal(torch.as_tensor(got["image_grid_thw"]), torch.as_tensor(want["image_grid_thw"]))
    assert calls == [3, 3]  # the fused path ran, once per call (patched once despite two patch calls)
    # outside the default pipeline the processor's own code runs, unchanged
    want = plain(images=images, return_tensors="pt", do_normalize=False)
    got = patched(images=images, return_tensors="pt", do_normalize=False)
    assert torch.equal(got["pixel_values"], want["pixel_values"]) and calls == [3, 3]


def test_patch_processor_multimodal_and_video(monkeypatch):
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    video = torch.randint(0, 256, (5, 120, 160, 3), dtype=torch.uint8, generator=g)
    proc = types.SimpleNamespace(image_processor=Qwen2VLImageProcessorPil(**IMG_PIXELS),
                                 video_processor=Qwen2VLVideoProcessor(**VID_PIXELS))
    assert videocom_fast.patch_processor(proc) is proc
    calls = []
    run = P._run
    monkeypatch.setattr(P, "_run", lambda items, dtype: calls.append(len(items)) or run(items, dtype))
    want, want_grid = oracle_video(video)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = proc.video_processor(videos=[video.permute(0, 3, 1, 2)], return_tensors="pt", cap_pixels_per_frame=False)
    assert calls == [1]
    assert torch.equal(got["video_grid_thw"], want_grid) and torch.equal(got["pixel_values_videos"], want)
    with pytest.raises(ValueError, match="processor"):
        videocom_fast.patch_processor(object())
