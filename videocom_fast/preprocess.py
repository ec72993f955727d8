"""Fused crop -> resize -> normalize -> patchify: uint8 frames to Qwen2.5-VL `pixel_values`, one pass.

Design note
-----------
transformers' Qwen2-VL processors turn uint8 frames into `pixel_values` in four passes over memory (resize,
rescale, normalize, a 9-D transpose into merge-window order, and for images a 2x temporal copy). Here the
whole chain is one kernel per backend, and it computes *the same tensor*:

- Resize: exact emulation of the resampler each processor uses. Images follow PIL bicubic (the reference
  resized frames and crops with PIL; oracle `Qwen2VLImageProcessorPil`), videos follow ATen's uint8
  antialiased bicubic (what torchvision runs; oracle `Qwen2VLVideoProcessor`). Both are separable with
  fixed-point weights and uint8 rounding between passes; the weights and arithmetic live in
  csrc/include/crop_resize_patchify.h (C++/CUDA) and in `axis_plan` below (Python twin, same IEEE ops).
- Normalize: a 3 x 256 lookup table built with the oracle's own float32 formula, cast to the output dtype
  (so bf16/fp16 outputs equal `oracle_fp32.to(dtype)`).
- Patchify: values are written straight into merge-window order (rows (t, h/2, w/2, 2, 2), columns
  (c, t, 14, 14)); an image is one frame written into both temporal slots; an odd video repeats its last frame.

Backends, chosen here and only here: CUDA (any non-CPU) tensors -> the CUDA kernel when built (`_C.with_cuda`)
else Triton, output on that device (GPU-decoded frames never visit the host);
CPU tensors -> the C++ kernel (`_C.crop_resize_patchify`, torch.get_num_threads() threads); "torch" is the plain
PyTorch reference.
`VIDEOCOM_BACKEND=auto|triton|cuda|cpp|torch` or `force_backend(name)` (tests) pick one. Triton on CPU tensors
runs only under TRITON_INTERPRET=1 (read when kernels/crop_resize_patchify.py is first imported).

Outputs: CPU pixel_values come from recycled buffers (`_OutputCache`: fresh multi-MB buffers cost page faults
that exceed the kernel's own time for a few crops); `out=` writes into a caller's buffer instead.

Sizes: `preprocess_images`/`preprocess_video`/`preprocess_media` use `videocom_fast.protocol.smart_resize`
(the reference's qwen-vl-utils rule: sides at least 28). `patch_processor` uses transformers' own
`smart_resize` so a patched processor returns exactly what it returned before (the two rules differ only for
sides under 14 px with a large other side).

Legend: frames_THWC uint8 (T, H, W, 3); pixel_values_PD (patches, 1176); grid_thw (items, 3) int64.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from . import envs
from .protocol import smart_resize

PATCH, MERGE, TEMPORAL = 14, 2, 2
FACTOR = PATCH * MERGE
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH  # 1176
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODE_PIL, MODE_TORCH = 0, 1  # resampler to emulate (same numbering as the C++ ResampleMode)
PIL_PRECISION = 22
BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# --- backend choice (the one place) -----------------------------------------------------------------------
_forced: str | None = None


@contextlib.contextmanager
def force_backend(name: str):
    """Test hook: run every call inside the block on `name` ("triton", "cuda", "cpp", "torch" or "auto")."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"force_backend: name must be one of {BACKENDS}, got {name!r}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def _cpp():
    try:
        from . import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "crop_resize_patchify") else None


def select_backend(device: torch.device) -> str:
    choice = _forced or envs.backend()
    if choice not in BACKENDS:
        raise ValueError(f"VIDEOCOM_BACKEND must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        # NOTE: any device that is not the host gets the device kernels (never a host round trip); on the
        # meta stand-in accelerator of the tests that is the Triton launcher, which tests replace
        if device.type != "cpu":
            cpp = _cpp()
            return "cuda" if cpp is not None and getattr(cpp, "with_cuda", False) else "triton"
        return "cpp" if _cpp() is not None else "torch"
    if choice == "cpp" and (device.type != "cpu" or _cpp() is None):
        raise ValueError(f"backend 'cpp' needs CPU tensors and a built videocom_fast._C (device {device})")
    if choice == "cuda" and (device.type != "cuda" or not getattr(_cpp(), "with_cuda", False)):
        raise ValueError(f"backend 'cuda' needs CUDA tensors and _C built with CUDA (device {device})")
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return choice


# --- the arithmetic's Python twin ----------------------------------------------------------------------------
def _pil_bicubic(x: float) -> float:
    a = -0.5
    x = -x if x < 0.0 else x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _torch_bicubic(x: float) -> float:
    a = -0.5
    x = -x if x < 0 else x
    if x < 1.0:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2.0:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def _round_away(v: float) -> int:
    return int(-0.5 + v) if v < 0 else int(0.5 + v)  # C's (int) truncates toward zero, like int()


def axis_plan(mode: int, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(first, size, weights (n_out, taps) int32, precision) of one axis: the C++ `make_axis_plan`, op for op."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    inv = 1.0 / filterscale
    cubic = _pil_bicubic if mode == MODE_PIL else _torch_bicubic
    first = np.zeros(n_out, np.int32)
    size = np.zeros(n_out, np.int32)
    wd = np.zeros((n_out, taps), np.float64)
    wmax = 0.0
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        n = min(max(min(int(center + support + 0.5), n_in) - lo, 0), taps)
        ws = [cubic((k + lo - center + 0.5) * inv) for k in range(n)]
        total = 0.0
        for w in ws:
            total += w
        if total != 0.0:
            ws = [w / total for w in ws]
            wmax = max([wmax, *ws])
        wd[i, :n] = ws
        first[i], size[i] = lo, n
    if mode == MODE_PIL:
        precision = PIL_PRECISION
    else:
        precision = 0
        while precision < 22 and int(0.5 + wmax * (1 << (precision + 1))) < (1 << 15):
            precision += 1
    weights = np.array([[_round_away(w * (1 << precision)) for w in row] for row in wd], np.int32).reshape(n_out, taps)
    return first, size, weights, precision


def vertical_first(mode: int, in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    """Pillow >= 13 runs the vertical pass first when the height shrinks by > 2x the width's pixel loss."""
    return mode == MODE_PIL and (in_h - out_h) > 0 and (in_h - out_h) > (in_w - out_w) * 2


_LUTS: dict = {}
_NORMS: dict = {}


def normalize_formula(mode: int) -> tuple[int, float, list[float], list[float]]:
    """The closed form `normalize_lut` tabulates, as the C++ kernel's `norm` argument (kind, scale, mean, std):
    kind 1 = (f32(v) - mean) / std (torchvision), kind 2 = (f32(f64(v) * scale) - mean) / std (PIL), all float32
    values. The kernel computes 16 values at a time with it, but only after checking it reproduces the table."""
    normalize_lut(mode, torch.float32)
    return _NORMS[mode]


def normalize_lut(mode: int, dtype: torch.dtype) -> torch.Tensor:
    """(3, 256) table: the oracle's float32 normalisation of every uint8 level, cast to `dtype`.

    PIL processor: f32(f64(v) * (1/255)), then (x - mean) / std in float32 (transformers image_transforms).
    torchvision processors: (f32(v) - f32(mean * 255)) / f32(std * 255) (rescale fused into normalize).
    """
    key = (mode, dtype)
    if key not in _LUTS:
        levels = np.arange(256, dtype=np.float64)
        if mode == MODE_PIL:
            x = (levels * (1 / 255)).astype(np.float32)
            mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
            lut = torch.from_numpy(((x[None, :] - mean[:, None]) / std[:, None]).astype(np.float32))
            _NORMS[mode] = (2, 1 / 255, mean.tolist(), std.tolist())
        else:
            mean = torch.tensor(CLIP_MEAN) * (1.0 / (1 / 255))
            std = torch.tensor(CLIP_STD) * (1.0 / (1 / 255))
            lut = (torch.arange(256, dtype=torch.float32)[None, :] - mean[:, None]) / std[:, None]
            _NORMS[mode] = (1, 1.0, mean.tolist(), std.tolist())
        _LUTS[key] = lut.to(dtype).contiguous()
    return _LUTS[key]


# --- one unit of work ----------------------------------------------------------------------------------------
@dataclass
class _Item:
    frames_THWC: torch.Tensor  # uint8, pixels contiguous RGB
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 (x2, y2 exclusive)
    out_h: int
    out_w: int
    mode: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames_THWC.shape[0] + TEMPORAL - 1) // TEMPORAL, self.out_h // PATCH, self.out_w // PATCH

    @property
    def rows(self) -> int:
        t, h, w = self.grid
        return t * h * w


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a uint8 tensor or numpy array, got {type(x).__name__}")
    return x


def _check_frames(x: torch.Tensor, name: str, ndim: int) -> torch.Tensor:
    shape = "(H, W, 3)" if ndim == 3 else "(T, H, W, 3)"
    if x.dtype != torch.uint8:
        raise ValueError(f"{name}: expected dtype uint8, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected {shape}, got {x.dim()} dims (shape {tuple(x.shape)})")
    if x.shape[-1] != 3:
        raise ValueError(f"{name}: expected 3 channels in the last dim, got shape {tuple(x.shape)}")
    if min(x.shape) == 0:
        raise ValueError(f"{name}: empty, shape {tuple(x.shape)}")
    if x.stride(-1) != 1 or x.stride(-2) != 3 or min(x.stride()) < 0:
        x = x.contiguous()
    return x


def _check_box(box: Any, name: str, h: int, w: int, device: torch.device, image_name: str):
    if box is None:
        return 0, 0, w, h
    if isinstance(box, torch.Tensor):
        if box.device != device:
            raise ValueError(f"{name}: on {box.device} but {image_name} is on {device}")
        box = box.tolist()
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected (x1, y1, x2, y2), got {box!r}") from None
    if len(vals) != 4 or any(v != int(v) for v in vals):
        raise ValueError(f"{name}: expected 4 integer pixel coordinates (x1, y1, x2, y2), got {box!r}")
    x1, y1, x2, y2 = (int(v) for v in vals)
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise ValueError(f"{name}: {(x1, y1, x2, y2)} is empty or outside the {h}x{w} (HxW) {image_name}")
    return x1, y1, x2, y2


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {_DTYPES}, got {dtype}")


def _make_item(frames_THWC, box, min_pixels, max_pixels, mode, size_fn=None) -> _Item:
    x1, y1, x2, y2 = box
    fn = size_fn or (lambda h, w, lo, hi: smart_resize(h, w, factor=FACTOR, min_pixels=lo, max_pixels=hi))
    out_h, out_w = fn(y2 - y1, x2 - x1, min_pixels, max_pixels)
    return _Item(frames_THWC, box, out_h, out_w, mode)


# --- backends -------------------------------------------------------------------------------------------------
def _resize_axis_torch(x: torch.Tensor, dim: int, plan) -> torch.Tensor:
    """One separable pass on uint8 `x` along `dim` in int32 fixed point (gather taps, weight, shift, clamp)."""
    first, size, weights, precision = plan
    taps = weights.shape[1]
    n_in = x.shape[dim]
    idx = torch.from_numpy(first).long()[:, None] + torch.arange(taps)[None, :]
    idx = idx.clamp_(max=n_in - 1)  # padded taps carry weight 0
    w = torch.from_numpy(weights)
    xm = x.movedim(dim, -2).to(torch.int32)  # (..., n_in, 3)
    acc = (xm[..., idx, :] * w[:, :, None]).sum(-2) + (1 << (precision - 1))  # (..., n_out, 3)
    out = (acc >> precision).clamp_(0, 255).to(torch.uint8)
    return out.movedim(-2, dim)


def resize_torch(image_HWC: torch.Tensor, out_h: int, out_w: int, mode: int) -> torch.Tensor:
    """Reference resize of one uint8 (H, W, 3) image, in the emulated library's pass order."""
    in_h, in_w = image_HWC.shape[:2]
    passes = [(1, in_w, out_w), (0, in_h, out_h)]  # horizontal, then vertical
    if in_w != out_w and vertical_first(mode, in_h, in_w, out_h, out_w):
        passes.reverse()
    x = image_HWC
    for dim, n_in, n_out in passes:
        if n_in != n_out:
            x = _resize_axis_torch(x, dim, axis_plan(mode, n_in, n_out))
    return x


def patchify_torch(resized_THWC: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Normalise by table lookup and lay out in merge-window order (the processors' reshape/permute)."""
    t, h, w, _ = resized_THWC.shape
    if t % TEMPORAL:
        resized_THWC = torch.cat([resized_THWC, resized_THWC[-1:].expand(TEMPORAL - t % TEMPORAL, -1, -1, -1)])
        t = resized_THWC.shape[0]
    vals = torch.stack([lut[c][resized_THWC[..., c].long()] for c in range(3)], dim=1)  # (T, 3, H, W)
    gh, gw = h // PATCH, w // PATCH
    vals = vals.view(t // TEMPORAL, TEMPORAL, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    vals = vals.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return vals.reshape(-1, PATCH_DIM)


def _run_torch(items: list[_Item], lut: torch.Tensor, out: torch.Tensor) -> None:
    row = 0
    for it in items:
        x1, y1, x2, y2 = it.box
        frames = it.frames_THWC[:, y1:y2, x1:x2].cpu()
        resized = torch.stack([resize_torch(f, it.out_h, it.out_w, it.mode) for f in frames])
        if resized.shape[0] == 1:  # an image is one frame written into both temporal slots
            resized = resized.expand(TEMPORAL, -1, -1, -1)
        out[row:row + it.rows] = patchify_torch(resized, lut.cpu()).to(out.device)
        row += it.rows


def _run_cpp(items: list[_Item], lut: torch.Tensor, out: torch.Tensor, norm=None) -> None:
    """`norm`: the table's closed form (normalize_formula) for the kernel's SIMD store; None = look up only."""
    as_bits = (lambda t: t.view(torch.int16)) if out.element_size() == 2 else (lambda t: t)
    _cpp().crop_resize_patchify([it.frames_THWC.numpy() for it in items], [it.box for it in items],
                                [(it.out_h, it.out_w) for it in items], [it.mode for it in items],
                                as_bits(lut).numpy(), as_bits(out).numpy(), norm)


# --- recycled CPU output buffers ---------------------------------------------------------------------------------
class _OutputCache:
    """Hands out CPU pixel_values buffers, taking back each one when the last tensor using it is freed.

    Why: glibc returns a freed multi-MB buffer to the OS, so every call's fresh output is first-touch page faults
    the kernel pays: measured 0.2-0.5 ms for 8 crops of 1280x720 frames (11 MB), more than their whole resize,
    and on this VM bursts of 30 ms of system time when the host backs new pages. A recycled buffer has its
    pages. The buffer is a numpy array behind torch.from_numpy (bf16 / fp16 through a byte view), so the tensor
    behaves as torch.empty's except that its storage cannot be resized. Only dead buffers are kept, at most
    `limit` bytes (VIDEOCOM_OUT_CACHE_MB, default 256; 0 disables); a buffer is reused for requests of half
    its size or more."""

    def __init__(self, limit: int):
        self.limit = limit
        self._free: list[np.ndarray] = []  # uint8 bases, oldest first
        self._lock = threading.Lock()

    def empty(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = rows * PATCH_DIM * dtype.itemsize
        if nbytes == 0 or nbytes > self.limit:
            return torch.empty(rows, PATCH_DIM, dtype=dtype)
        base = None
        with self._lock:
            fits = [b for b in self._free if nbytes + 64 <= b.nbytes <= 2 * nbytes + 64]
            if fits:
                base = min(fits, key=lambda b: b.nbytes)
                self._free = [b for b in self._free if b is not base]
        if base is None:
            base = np.empty(nbytes + 64, np.uint8)
        start = -base.ctypes.data % 64  # cache-line aligned, as torch's allocator: the kernel streams whole lines
        view = base[start:start + nbytes]
        weakref.finalize(view, self._give_back, base)  # runs when torch drops its reference to `view`
        return torch.from_numpy(view).view(dtype).view(rows, PATCH_DIM)

    def _give_back(self, base: np.ndarray) -> None:
        with self._lock:
            self._free.append(base)
            while sum(b.nbytes for b in self._free) > self.limit:
                self._free.pop(0)


_OUT_CACHE = _OutputCache(int(envs.out_cache_mb() * 2**20))


def _check_out(out: Any, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    want = f"a contiguous ({rows}, {PATCH_DIM}) {dtype} tensor on {device}"
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"out: expected {want}, got {type(out).__name__}")
    if (tuple(out.shape) != (rows, PATCH_DIM) or out.dtype != dtype or out.device != device
            or not out.is_contiguous() or out.requires_grad):
        extra = " (not contiguous)" if not out.is_contiguous() else " (requires grad)" if out.requires_grad else ""
        raise ValueError(f"out: expected {want}, got {tuple(out.shape)} {out.dtype} on {out.device}{extra}")
    return out


def _run(items: list[_Item], dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """All items in one launch into one (sum rows, 1176) buffer (`out` if given, else a new one); items share one
    resample mode per call."""
    device = items[0].frames_THWC.device
    rows = sum(it.rows for it in items)
    if out is None and device.type == "cpu":
        out = _OUT_CACHE.empty(rows, dtype)
    elif out is None:
        out = torch.empty(rows, PATCH_DIM, dtype=dtype, device=device)
    else:
        out = _check_out(out, rows, dtype, device)
    backend = select_backend(device)
    lut = normalize_lut(items[0].mode, dtype).to(device)
    if backend == "cpp":
        _run_cpp(items, lut, out, normalize_formula(items[0].mode))
    elif backend == "torch":
        _run_torch(items, lut, out)
    elif backend == "triton":
        from .kernels.crop_resize_patchify import crop_resize_patchify_triton
        crop_resize_patchify_triton(items, lut, out)
    else:  # cuda
        _cpp().crop_resize_patchify_cuda(
            [(it.frames_THWC.data_ptr(), *it.frames_THWC.shape[:3], it.frames_THWC.stride(0),
              it.frames_THWC.stride(1)) for it in items],
            [it.box for it in items], [(it.out_h, it.out_w) for it in items], [it.mode for it in items],
            lut.data_ptr(), out.data_ptr(), out.shape[0], out.element_size(), torch.cuda.current_stream().cuda_stream)
    return out


def _grid(items: list[_Item]) -> torch.Tensor:
    return torch.tensor([it.grid for it in items], dtype=torch.int64)


# --- public API -----------------------------------------------------------------------------------------------
def preprocess_images(images, *, boxes=None, min_pixels: int = 4 * 28 * 28, max_pixels: int = 128 * 28 * 28,
                      dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None,
                      _size_fn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, H, W, 3) or a list of (H, W, 3), each optionally cropped to boxes[i] = (x1, y1, x2, y2)
    in its own pixels, -> (pixel_values (sum t*h*w, 1176), image_grid_thw (N, 3)) as Qwen2VLImageProcessorPil.
    out: optional preallocated contiguous pixel_values tensor (right rows, dtype and device) to write into and
    return; reusing one saves the kernel zeroing fresh pages (~0.1-0.3 ms for 8 crops of 1280x720 frames)."""
    _check_dtype(dtype)
    if isinstance(images, (torch.Tensor, np.ndarray)):
        images = _as_tensor(images, "images")
        if images.dim() != 4:
            raise ValueError(f"images: expected (N, H, W, 3) or a list of (H, W, 3), got shape {tuple(images.shape)}")
        images = list(images)
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError("images: expected a non-empty tensor (N, H, W, 3) or list of (H, W, 3) tensors")
    if boxes is not None and (not isinstance(boxes, (list, tuple, torch.Tensor)) or len(boxes) != len(images)):
        raise ValueError(f"boxes: expected one box (or None) per image, {len(images)} in all")
    items, device = [], None
    for i, img in enumerate(images):
        img = _check_frames(_as_tensor(img, f"images[{i}]"), f"images[{i}]", 3)
        device = device or img.device
        if img.device != device:
            raise ValueError(f"images[{i}]: on {img.device} but images[0] is on {device}")
        box = _check_box(None if boxes is None else boxes[i], f"boxes[{i}]", img.shape[0], img.shape[1],
                         img.device, f"images[{i}]")
        items.append(_make_item(img[None], box, min_pixels, max_pixels, MODE_PIL, _size_fn))
    return _run(items, dtype, out), _grid(items)


def preprocess_video(frames, *, min_pixels: int = 128 * 28 * 28, max_pixels: int = 360 * 420,
                     dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None,
                     _size_fn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames (T, H, W, 3) (or a list of such videos) -> (pixel_values_videos, video_grid_thw) as
    Qwen2VLVideoProcessor (torchvision bicubic + antialias on uint8; odd T repeats the last frame).
    out: optional preallocated pixel_values_videos tensor, as in preprocess_images."""
    _check_dtype(dtype)
    videos = list(frames) if isinstance(frames, (list, tuple)) else [frames]
    if not videos:
        raise ValueError("frames: expected a (T, H, W, 3) uint8 tensor or a non-empty list of them")
    items = []
    for i, v in enumerate(videos):
        name = "frames" if len(videos) == 1 and not isinstance(frames, (list, tuple)) else f"frames[{i}]"
        v = _check_frames(_as_tensor(v, name), name, 4)
        if items and v.device != items[0].frames_THWC.device:
            raise ValueError(f"{name}: on {v.device} but frames[0] is on {items[0].frames_THWC.device}")
        items.append(_make_item(v, (0, 0, v.shape[2], v.shape[1]), min_pixels, max_pixels, MODE_TORCH, _size_fn))
    return _run(items, dtype, out), _grid(items)


def preprocess_media(items: Sequence[Any], *, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rollout entry: objects with .kind ("image"|"video"), .frames uint8 (T, H, W, 3), .box, .min_pixels,
    .max_pixels -> [(pixel_values, grid_thw (1, 3) int64)] per item; one launch per kind (images use PIL's
    resampler, videos ATen's)."""
    _check_dtype(dtype)
    by_kind: dict[str, list[tuple[int, _Item]]] = {"image": [], "video": []}
    for i, m in enumerate(items):
        kind = getattr(m, "kind", None)
        if kind not in by_kind:
            raise ValueError(f"items[{i}].kind: expected 'image' or 'video', got {kind!r}")
        f = _check_frames(_as_tensor(m.frames, f"items[{i}].frames"), f"items[{i}].frames", 4)
        if kind == "image" and f.shape[0] != 1:
            raise ValueError(f"items[{i}].frames: an image has 1 frame, got {f.shape[0]}")
        box = _check_box(getattr(m, "box", None), f"items[{i}].box", f.shape[1], f.shape[2], f.device,
                         f"items[{i}].frames")
        mode = MODE_PIL if kind == "image" else MODE_TORCH
        by_kind[kind].append((i, _make_item(f, box, m.min_pixels, m.max_pixels, mode)))
    results: list = [None] * len(items)
    for group in by_kind.values():
        if not group:
            continue
        devices = {it.frames_THWC.device for _, it in group}
        if len(devices) > 1:
            raise ValueError(f"items: all frames of one kind must be on one device, got {sorted(map(str, devices))}")
        out = _run([it for _, it in group], dtype)
        row = 0
        for i, it in group:
            results[i] = (out[row:row + it.rows], torch.tensor([it.grid], dtype=torch.int64))
            row += it.rows
    return results


# --- drop-in for transformers' processors ------------------------------------------------------------------
def _is_default_pipeline(kw: dict) -> bool:
    """The fused path covers the Qwen2-VL defaults; anything else falls back to the processor's own code."""
    resample = kw.get("resample")
    bicubic = getattr(resample, "value", resample) in (3, "bicubic")
    return (bool(kw.get("do_resize")) and bool(kw.get("do_rescale")) and bool(kw.get("do_normalize")) and bicubic
            and math.isclose(float(kw.get("rescale_factor") or 0), 1 / 255, rel_tol=0, abs_tol=1e-12)
            and tuple(kw.get("image_mean") or ()) == CLIP_MEAN and tuple(kw.get("image_std") or ()) == CLIP_STD
            and kw.get("patch_size") == PATCH and kw.get("temporal_patch_size") == TEMPORAL
            and kw.get("merge_size") == MERGE and not kw.get("cap_pixels_per_frame"))


def _fused_preprocess(proc, original, kind: str):
    import sys

    module = sys.modules[type(proc).__module__]
    mode = MODE_PIL if getattr(proc, "backend", "") == "pil" else MODE_TORCH

    def size_fn(size):
        return lambda h, w, lo, hi: module.smart_resize(h, w, factor=FACTOR, min_pixels=size.shortest_edge,
                                                        max_pixels=size.longest_edge)

    def fused(*args, **kw):
        key = "images" if kind == "image" else "videos"
        media = args[0] if args else kw.get(key)
        names = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                 "image_std", "patch_size", "temporal_patch_size", "merge_size")
        opts = dict(zip(names, args[1:]), **{k: v for k, v in kw.items() if k != key})
        frames = [torch.as_tensor(np.ascontiguousarray(m)) if isinstance(m, np.ndarray) else m for m in media]
        ok = _is_default_pipeline(opts) and all(
            isinstance(f, torch.Tensor) and f.dtype == torch.uint8 and f.dim() == (3 if kind == "image" else 4)
            and f.shape[-3] == 3 for f in frames)
        if not ok:
            return original(*args, **kw)
        from transformers.image_processing_utils import BatchFeature

        fn = size_fn(opts["size"])
        items = []
        for f in frames:
            f_THWC = (f[None] if kind == "image" else f).permute(0, 2, 3, 1).contiguous()
            items.append(_make_item(f_THWC, (0, 0, f_THWC.shape[2], f_THWC.shape[1]), 0, 0, mode, fn))
        pixel_values, grid = _run(items, torch.float32), _grid(items)
        return_tensors = opts.get("return_tensors")
        if return_tensors is None and mode == MODE_PIL:
            pixel_values, grid = pixel_values.numpy(), grid.numpy()
        names_out = ("pixel_values", "image_grid_thw") if kind == "image" else ("pixel_values_videos", "video_grid_thw")
        return BatchFeature(data=dict(zip(names_out, (pixel_values, grid))), tensor_type=return_tensors)

    return fused


_FUSED_CLASSES: dict = {}   # (processor class, kind) -> its fused subclass, made once


def _fused_class(cls, kind: str):
    """A subclass of `cls` whose `_preprocess` runs the fused kernels (falling back to `cls._preprocess`).

    NOTE: state lives on the class, never in the instance's __dict__: transformers serializes __dict__
    (`to_json_string`, `save_pretrained`), and a function there made both fail. The subclass keeps the
    original's name, qualname and module, so the saved `image_processor_type` / `video_processor_type` and
    `from_pretrained` see the original class."""
    key = (cls, kind)
    if key not in _FUSED_CLASSES:
        original = cls._preprocess

        def _preprocess(self, *args, **kw):
            return _fused_preprocess(self, lambda *a, **k: original(self, *a, **k), kind)(*args, **kw)

        _FUSED_CLASSES[key] = type(cls.__name__, (cls,), {
            "_preprocess": _preprocess, "_videocom_fused": True, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return _FUSED_CLASSES[key]


def patch_processor(processor):
    """Route an existing Qwen2-VL / Qwen2.5-VL processor's image and video preprocessing through the fused
    kernels, with identical outputs (idempotent; calls outside the default pipeline fall back unchanged).
    Accepts the multimodal processor or a bare image / video processor; returns it. Each patched instance
    becomes an instance of a generated subclass (`_fused_class`): it still saves, serializes and reloads
    as the original class."""
    targets = []
    for attr, kind in (("image_processor", "image"), ("video_processor", "video")):
        sub = getattr(processor, attr, None)
        if sub is not None:
            targets.append((sub, kind))
    if not targets and hasattr(processor, "_preprocess"):
        kind = "video" if "pixel_values_videos" in getattr(processor, "model_input_names", []) else "image"
        targets.append((processor, kind))
    if not targets:
        raise ValueError(f"processor: expected a Qwen2-VL processor, image processor or video processor, "
                         f"got {type(processor).__name__}")
    for sub, kind in targets:
        if not getattr(type(sub), "_videocom_fused", False):
            sub.__class__ = _fused_class(type(sub), kind)
    return processor


__all__ = ["preprocess_images", "preprocess_video", "preprocess_media", "patch_processor", "force_backend",
           "select_backend", "normalize_lut", "normalize_formula", "axis_plan", "resize_torch", "patchify_torch"]
