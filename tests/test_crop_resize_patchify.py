"""The fused crop -> resize -> normalize -> patchify kernels against external oracles.

Oracles: Pillow's Image.resize(BICUBIC) and torchvision's resize(bicubic, antialias=True) on uint8 for the
resize (the libraries transformers' Qwen2-VL processors call), the processors' own rescale/normalize code for
the lookup table. The C++ kernel (videocom_fast._C), the PyTorch reference (preprocess.resize_torch) and the
Triton kernel (TRITON_INTERPRET=1, in a subprocess because Triton reads the flag at import) must equal them
bit for bit; the CUDA source must compile with the local nvcc. API-level tests are in test_preprocess.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.transforms.v2 import functional as tvF

from videocom_fast import preprocess as P

_C = pytest.importorskip("videocom_fast._C")
ROOT = Path(__file__).resolve().parents[1]
MODES = {"pil": P.MODE_PIL, "torch": P.MODE_TORCH}


# --- oracles (also imported by bench/bench_crop_resize_patchify.py) -------------------------------------------
def pil_resize(image_HWC: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    return np.asarray(PIL.Image.fromarray(image_HWC).resize((out_w, out_h), PIL.Image.BICUBIC))


def tv_resize(image_HWC: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(image_HWC)).permute(2, 0, 1)[None]
    y = tvF.resize(x, [out_h, out_w], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    return y[0].permute(1, 2, 0).numpy()


ORACLE = {"pil": pil_resize, "torch": tv_resize}


def random_cases(rng, n, lo=1, hi=200):
    """(in_h, in_w, out_h, out_w) with up- and downscales, odd sizes and the degenerate 1-pixel sides."""
    cases = [(97, 341, 84, 336), (1, 1, 56, 56), (1, 7, 28, 56), (360, 640, 280, 504), (50, 24, 4, 47)]
    for _ in range(n):
        cases.append(tuple(int(v) for v in rng.integers(lo, hi, 4)))
    return cases


# --- per-axis taps: the Python twin is the C++ header, op for op ----------------------------------------------
@pytest.mark.parametrize("mode", ["pil", "torch"])
def test_axis_plan_twin_equals_cpp(mode):
    rng = np.random.default_rng()
    sizes = [(1, 1), (1, 56), (97, 84), (341, 336), (640, 504), (5, 300), (1280, 28)]
    sizes += [tuple(int(v) for v in rng.integers(1, 900, 2)) for _ in range(20)]
    for n_in, n_out in sizes:
        first, size, w, prec = P.axis_plan(MODES[mode], n_in, n_out)
        c_first, c_size, c_w, c_prec = _C.resample_axis(MODES[mode], n_in, n_out)
        np.testing.assert_array_equal(first, c_first, err_msg=f"{mode} {n_in}->{n_out}")
        np.testing.assert_array_equal(size, c_size)
        np.testing.assert_array_equal(w, c_w)
        assert prec == c_prec
        assert (first >= 0).all() and (first + size <= n_in).all() and (size >= 1).all()
        # fixed-point weights sum to one (up to the rounding of each tap)
        sums = w.sum(1).astype(np.float64) / (1 << prec)
        assert np.abs(sums - 1).max() <= w.shape[1] / (1 << prec)


# --- the resize alone, against the libraries --------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["pil", "torch"])
def test_cpp_resize_equals_library(mode):
    rng = np.random.default_rng()
    for in_h, in_w, out_h, out_w in random_cases(rng, 40):
        image = rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
        want = ORACLE[mode](image, out_h, out_w)
        got = _C.resize_uint8(image, out_h, out_w, MODES[mode])
        diff = np.abs(got.astype(int) - want)
        # the issue asks for <= 1 level on >= 99.9%; following the library's own arithmetic gives equality
        assert (diff <= 1).mean() >= 0.999
        np.testing.assert_array_equal(got, want, err_msg=f"{mode} {in_h}x{in_w}->{out_h}x{out_w}")


@pytest.mark.parametrize("mode", ["pil", "torch"])
def test_cpp_resize_portable_and_simd_loops_equal_library(mode):
    """The hand-written AVX-512 or AVX2 loops (whichever this CPU has) and the portable loop all equal the
    library, on sizes that leave partial 16-row blocks and 16-byte tiles (and 1-pixel sides)."""
    rng = np.random.default_rng()
    cases = [(1, 1, 28, 28), (17, 5, 28, 56), (33, 341, 56, 84)] + random_cases(rng, 6)
    previous = _C.set_cpu_simd(True)
    try:
        for in_h, in_w, out_h, out_w in cases:
            image = rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
            want = ORACLE[mode](image, out_h, out_w)
            for simd in (True, False):
                _C.set_cpu_simd(simd)
                np.testing.assert_array_equal(_C.resize_uint8(image, out_h, out_w, MODES[mode]), want,
                                              err_msg=f"{_C.cpu_simd_isa()} {mode} {in_h}x{in_w}->{out_h}x{out_w}")
    finally:
        _C.set_cpu_simd(previous)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags = next((line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags")), "")
    return set(flags.split())


def test_cpu_simd_isa_is_the_widest_this_cpu_has():
    """The SIMD tests above check the hand loops only if the kernel picks them: AVX-512 where the CPU has
    AVX-512BW, AVX2 where it has AVX2 alone (AMD Zen 1-3), the portable loops when told to."""
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this system")
    previous = _C.set_cpu_simd(True)
    try:
        want = ("avx512_vbmi" if "avx512vbmi" in flags and "avx512vl" in flags else "avx512") \
            if {"avx512f", "avx512bw"} <= flags else "avx2" if "avx2" in flags else "portable"
        cap = _C.cpu_isa()   # VIDEOCOM_CPU_ISA caps the loops too (test_fused_step.py runs this file per cap)
        want = "portable" if cap == "baseline" else "avx2" if cap == "avx2" and want != "portable" else want
        assert _C.cpu_simd_isa() == want, (cap, sorted(f for f in flags if f.startswith("avx")))
        _C.set_cpu_simd(False)
        assert _C.cpu_simd_isa() == "portable"
    finally:
        _C.set_cpu_simd(previous)


@pytest.mark.parametrize("mode", ["pil", "torch"])
def test_torch_reference_resize_equals_library(mode):
    rng = np.random.default_rng()
    for in_h, in_w, out_h, out_w in random_cases(rng, 8, hi=120):
        image = rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
        got = P.resize_torch(torch.from_numpy(image), out_h, out_w, MODES[mode]).numpy()
        np.testing.assert_array_equal(got, ORACLE[mode](image, out_h, out_w))


def test_cpp_resize_strided_view():
    """A crop is a strided view (row stride > width * 3): the kernel must honour the stride."""
    rng = np.random.default_rng()
    frame = rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)
    crop = frame[13:97, 31:150]
    assert not crop.flags.c_contiguous
    np.testing.assert_array_equal(_C.resize_uint8(crop, 56, 84, 0), pil_resize(np.ascontiguousarray(crop), 56, 84))


# --- normalisation table ------------------------------------------------------------------------------------------
def test_lut_equals_processor_normalisation():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    levels_CHW = np.tile(np.arange(256, dtype=np.uint8), (3, 1, 1))  # (3, 1, 256)
    pil = Qwen2VLImageProcessorPil()
    want = pil.normalize(pil.rescale(levels_CHW, 1 / 255), P.CLIP_MEAN, P.CLIP_STD)[:, 0]
    np.testing.assert_array_equal(P.normalize_lut(P.MODE_PIL, torch.float32).numpy(), want)
    tv = Qwen2VLImageProcessor()
    want = tv.rescale_and_normalize(torch.from_numpy(levels_CHW)[None], True, 1 / 255, True,
                                    tuple(P.CLIP_MEAN), tuple(P.CLIP_STD))[0, :, 0]
    torch.testing.assert_close(P.normalize_lut(P.MODE_TORCH, torch.float32), want, rtol=0, atol=0)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(P.normalize_lut(P.MODE_PIL, dtype), P.normalize_lut(P.MODE_PIL, torch.float32).to(dtype))


# --- the fused kernel: poisoned output, layout, one launch for many items -------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpp_kernel_fills_poisoned_output_like_reference(dtype):
    rng = np.random.default_rng()
    g = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    items = [
        P._Item(torch.randint(0, 256, (1, 97, 341, 3), dtype=torch.uint8, generator=g), (0, 0, 341, 97), 84, 336, 0),
        P._Item(torch.randint(0, 256, (1, 50, 60, 3), dtype=torch.uint8, generator=g), (7, 3, 8, 4), 56, 56, 0),
        P._Item(torch.randint(0, 256, (5, 40, 90, 3), dtype=torch.uint8, generator=g), (2, 1, 89, 40), 56, 112, 1),
    ]
    rows = sum(it.rows for it in items)
    lut = P.normalize_lut(0, dtype)
    for mode in (0, 1):
        for it in items:
            it.mode = mode
        out = torch.full((rows, P.PATCH_DIM), float("nan"), dtype=dtype)
        P._run_cpp(items, lut, out)
        want = torch.full_like(out, float("nan"))
        P._run_torch(items, lut, want)
        assert not out.isnan().any()
        assert torch.equal(out, want)


def _simd_items(g, mode):
    """Sizes that reach every SIMD branch and its edges: partial 16-byte horizontal groups and 64-byte vertical
    blocks, a 1x1 crop (upscale), a 5x horizontal downscale (its tap window exceeds 128 bytes: the transposing
    loop runs), a tall image (PIL resizes vertically first), a 2.9x downscale (per-group tap-pair counts below
    the axis maximum), and a 9-frame video (5 temporal patches: whole-slice
    tasks whose window rows reuse the horizontal rows of the previous one; odd T pads)."""
    def frames(t, h, w):
        return torch.randint(0, 256, (t, h, w, 3), dtype=torch.uint8, generator=g)
    return [P._Item(frames(1, 97, 341), (0, 0, 341, 97), 84, 336, mode),
            P._Item(frames(1, 50, 60), (7, 3, 8, 4), 56, 56, mode),
            P._Item(frames(1, 200, 700), (0, 0, 700, 200), 56, 140, mode),
            P._Item(frames(1, 130, 45), (0, 0, 45, 130), 56, 28, mode),
            P._Item(frames(1, 61, 401), (0, 0, 401, 61), 28, 140, mode),  # 2.9x: groups need fewer pairs than taps
            P._Item(frames(9, 40, 90), (2, 1, 89, 40), 84, 112, mode)]


def _bits(t: torch.Tensor) -> np.ndarray:
    return (t.view(torch.int16) if t.element_size() == 2 else t).numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["pil", "torch"])
def test_cpp_kernel_simd_paths_equal_portable_and_reference(dtype, mode):
    """The hand-written loops (AVX-512 VBMI: computed normalisation store, permute-based horizontal pass,
    register-blocked vertical pass; AVX2: both passes with taps in pairs through 16-bit multiply-adds; PIL's
    22-bit weights split in two) equal the portable loops with table lookups and the PyTorch reference, bit
    for bit, with one thread (whole-slice video tasks) and two."""
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    all_items = _simd_items(g, MODES[mode])
    lut, norm = P.normalize_lut(MODES[mode], dtype), P.normalize_formula(MODES[mode])
    if _C.cpu_simd_isa() == "avx512_vbmi":  # else the store is the table's (AVX2: only the passes differ)
        assert _C.cpu_store_kind(_bits(lut), norm) == {torch.float32: "f32", torch.bfloat16: "bf16",
                                                      torch.float16: "f16"}[dtype]
    previous, threads = _C.set_cpu_simd(True), torch.get_num_threads()
    try:
        for items in (all_items[:5], all_items[5:]):  # a video alone gets whole-slice tasks (1 thread)
            want = torch.full((sum(it.rows for it in items), P.PATCH_DIM), float("nan"), dtype=dtype)
            P._run_torch(items, lut, want)
            for simd, n in [(True, 1), (True, 2), (False, 1)]:
                _C.set_cpu_simd(simd)
                torch.set_num_threads(n)
                got = torch.full_like(want, float("nan"))
                P._run_cpp(items, lut, got, norm)
                assert torch.equal(got, want), (simd, n, (got.float() - want.float()).abs().max())
    finally:
        _C.set_cpu_simd(previous)
        torch.set_num_threads(threads)


def _fork_child_run(items, lut, norm, want, queue):
    # numpy for the fill and the comparison: torch's own OpenMP pool may hang in a forked child
    torch.set_num_threads(2)
    got = torch.from_numpy(np.full(tuple(want.shape), np.nan, np.float32))
    P._run_cpp(items, lut, got, norm)
    queue.put(bool(np.array_equal(got.numpy(), want.numpy())))


def test_cpp_kernel_concurrent_calls_and_forked_child():
    """The task pool (csrc/cpu/crop_resize_patchify_pool.cpp) and the per-thread scratch kept across calls: calls
    from several Python threads at once (one gets the helper threads, the others run alone), back-to-back calls
    on other items of the same sizes, and a forked child (helpers are the parent's threads) all give the
    reference's values."""
    import multiprocessing
    import threading

    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    lut, norm = P.normalize_lut(P.MODE_PIL, torch.float32), P.normalize_formula(P.MODE_PIL)
    jobs = []
    for _ in range(4):  # same sizes each time: the horizontal-row caches must not carry over between calls
        items = _simd_items(g, P.MODE_PIL)[:4]
        want = torch.empty(sum(it.rows for it in items), P.PATCH_DIM)
        P._run_torch(items, lut, want)
        jobs.append((items, want))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = [None] * len(jobs)

        def work(i):
            items, want = jobs[i]
            ok = True
            for _ in range(3):
                got = torch.full_like(want, float("nan"))
                P._run_cpp(items, lut, got, norm)
                ok = ok and torch.equal(got, want)
            results[i] = ok

        workers = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert results == [True] * len(jobs)
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_fork_child_run, args=(jobs[0][0], lut, norm, jobs[0][1], queue))
        child.start()
        assert queue.get(timeout=30) is True
        child.join(timeout=30)
        assert child.exitcode == 0
    finally:
        torch.set_num_threads(threads)


def test_cpp_kernel_wrong_formula_falls_back_to_table():
    """A closed form that differs from the table in even one entry is not used: the table decides the values."""
    lut = P.normalize_lut(P.MODE_TORCH, torch.float32)
    kind, scale, mean, std = P.normalize_formula(P.MODE_TORCH)
    bad = (kind, scale, [mean[0], float(np.nextafter(np.float32(mean[1]), np.float32(0))), mean[2]], std)
    assert _C.cpu_store_kind(lut.numpy(), bad) == "table"
    assert _C.cpu_store_kind(lut.numpy(), None) == "table"
    assert _C.cpu_store_kind(P.normalize_lut(P.MODE_PIL, torch.float32).numpy(), (kind, scale, mean, std)) == "table"
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    items = _simd_items(g, P.MODE_TORCH)[:2]
    rows = sum(it.rows for it in items)
    want = torch.empty(rows, P.PATCH_DIM)
    P._run_torch(items, lut, want)
    for norm in (bad, (0, 1.0, mean, std)):
        got = torch.full_like(want, float("nan"))
        P._run_cpp(items, lut, got, norm)
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="norm"):
        P._run_cpp(items, lut, torch.empty(rows, P.PATCH_DIM), (3, 1.0, mean, std))


def test_cpp_kernel_rejects_bad_buffers():
    frames = np.zeros((1, 30, 40, 3), np.uint8)
    lut = P.normalize_lut(0, torch.float32).numpy()
    out = np.zeros((4, P.PATCH_DIM), np.float32)
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        _C.crop_resize_patchify([frames], [(0, 0, 41, 30)], [(28, 28)], [0], lut, out)
    with pytest.raises(ValueError, match=r"sizes\[0\]"):
        _C.crop_resize_patchify([frames], [(0, 0, 40, 30)], [(30, 28)], [0], lut, out)
    with pytest.raises(ValueError, match=r"frames\[0\]"):
        _C.crop_resize_patchify([np.zeros((1, 30, 40, 4), np.uint8)], [(0, 0, 40, 30)], [(28, 28)], [0], lut, out)
    with pytest.raises(ValueError, match=r"out: expected 4 rows, got 3"):  # 28x28 -> 2x2 patches
        _C.crop_resize_patchify([frames], [(0, 0, 40, 30)], [(28, 28)], [0], lut, out[:3])


# --- Triton under the interpreter (a subprocess: TRITON_INTERPRET is read when triton.jit runs) -------------------
_TRITON_SCRIPT = textwrap.dedent("""
    import torch
    from videocom_fast import preprocess as P
    g = torch.Generator().manual_seed(SEED)
    images = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g) for h, w in [(97, 341), (1, 1), (120, 40), (300, 60)]]
    boxes = [None, None, (3, 5, 30, 100), None]  # (300, 60): Pillow's vertical-first order
    video = torch.randint(0, 256, (3, 50, 70, 3), dtype=torch.uint8, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        with P.force_backend("torch"):
            want_i, grid_i = P.preprocess_images(images, boxes=boxes, max_pixels=8 * 28 * 28, dtype=dtype)
            want_v, grid_v = P.preprocess_video(video, min_pixels=4 * 28 * 28, max_pixels=8 * 28 * 28, dtype=dtype)
        with P.force_backend("triton"):
            got_i, g_i = P.preprocess_images(images, boxes=boxes, max_pixels=8 * 28 * 28, dtype=dtype)
            got_v, g_v = P.preprocess_video(video, min_pixels=4 * 28 * 28, max_pixels=8 * 28 * 28, dtype=dtype)
        assert torch.equal(g_i, grid_i) and torch.equal(g_v, grid_v)
        # NOTE: exact even for bf16 (FACTS: the interpreter truncates fp32 -> bf16): the kernel never converts,
        # it loads the table entry that is already in the output dtype.
        assert torch.equal(got_i, want_i), (dtype, (got_i.float() - want_i.float()).abs().max())
        assert torch.equal(got_v, want_v), (dtype, (got_v.float() - want_v.float()).abs().max())
    print("OK")
""")


@pytest.mark.slow
def test_triton_interpreter_matches_reference():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    script = _TRITON_SCRIPT.replace("SEED", str(int(np.random.default_rng().integers(1 << 31))))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]


# --- CUDA source compiles (cannot run here) ----------------------------------------------------------------------
def test_cuda_source_compiles(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    src = ROOT / "csrc" / "cuda" / "crop_resize_patchify.cu"
    run = subprocess.run([nvcc, "-std=c++17", "-arch=sm_80", "-c", str(src), "-I", str(ROOT / "csrc" / "include"),
                          "-o", str(tmp_path / "crp.o")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "crp.o").stat().st_size > 0


def test_cuda_binding_compiles():
    """The CUDA entry of bind_kernels.cpp is only built with CUDA: check its syntax here."""
    import sysconfig

    import pybind11

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    run = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-DVIDEOCOM_WITH_CUDA=1", str(ROOT / "csrc/cpu/bind_kernels.cpp"),
                          "-I", str(ROOT / "csrc"), "-I", str(ROOT / "csrc/include"), "-I", pybind11.get_include(),
                          "-I", sysconfig.get_paths()["include"]], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
