"""CMake decides CUDA: VIDEOCOM_CUDA=ON builds csrc/cuda into the same module (or fails loudly without a
CUDA compiler), AUTO without a GPU builds the CPU core only, and `import videocom_fast` / build_info()
report what is there.

The CUDA build is tested through the user's path (setup.py build_ext -> CMake, VIDEOCOM_CUDA=ON, no
architecture given; then TORCH_CUDA_ARCH_LIST) with the local nvcc, into a temporary directory; each build
is the whole module (~40 s with four architectures on 2 cores), so those tests are `slow`.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _cmake(build: Path, *args, env=None):
    import pybind11

    build.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["cmake", str(ROOT), f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                           f"-DPython_EXECUTABLE={sys.executable}", *args], cwd=build, capture_output=True,
                          text=True, timeout=600, env=env)


def test_build_info_reports_this_machine():
    import torch

    import videocom_fast
    from videocom_fast import _C

    info = videocom_fast.build_info()
    # NOTE: what the machine has, not what this CI machine has: the same test passes on a GPU machine.
    assert info["cpp_core"] is True and info["cuda_device"] is torch.cuda.is_available()
    assert info["cuda_ops"] is bool(_C.with_cuda)
    assert set(info) >= {"cuda_ops", "triton", "dali", "flash_attn", "decoders", "protocol"}
    assert info["cpu_simd"] in {"avx512_vbmi", "avx512", "avx2", "portable"}
    assert info["cpu_isa"] in _C.cpu_isas()


# --- setup.py: TORCH_CUDA_ARCH_LIST -> CMAKE_CUDA_ARCHITECTURES ------------------------------------------------
def _setup_module():
    spec = importlib.util.spec_from_file_location("videocom_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)   # setup() itself runs only as __main__
    return mod


@pytest.mark.parametrize("torch_list, cmake", [
    ("8.0;9.0+PTX", "80-real;90"),          # SASS for 8.0; SASS + PTX for 9.0
    ("8.0 8.6,9.0", "80-real;86-real;90-real"),
    ("9.0a", "90a-real"),
    ("Ampere+PTX", "80-real;86"),           # a name's +PTX goes to its newest member, as in torch
    ("Hopper;9.0", "90-real"),
])
def test_torch_cuda_arch_list_maps_to_cmake(torch_list, cmake):
    assert _setup_module().cuda_architectures_from_torch_list(torch_list) == cmake


@pytest.mark.parametrize("bad", ["sm_90", "9", "8.x", "Pascal", ";"])
def test_bad_torch_cuda_arch_list_names_the_entry(bad):
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        _setup_module().cuda_architectures_from_torch_list(bad)


def test_explicit_cmake_architectures_win_over_torch_list(monkeypatch):
    mod = _setup_module()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    monkeypatch.delenv("CUDAARCHS", raising=False)
    monkeypatch.setenv("CMAKE_ARGS", "")
    assert mod._cuda_architectures() == "80-real"
    monkeypatch.setenv("CMAKE_ARGS", "-DCMAKE_CUDA_ARCHITECTURES=90")
    assert mod._cuda_architectures() is None
    monkeypatch.setenv("CMAKE_ARGS", "")
    monkeypatch.setenv("CUDAARCHS", "89")
    assert mod._cuda_architectures() is None


# --- the CUDA build through setup.py (the README's path) -----------------------------------------------------
def _setup_build_ext(tmp_path, **env_overrides):
    """`python setup.py build_ext` with VIDEOCOM_CUDA=ON into tmp_path (build dir and module both there)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_CUDA_ARCH_LIST", "CUDAARCHS", "CMAKE_ARGS", "CMAKE_GENERATOR")}
    env.update(VIDEOCOM_CUDA="ON", MAX_JOBS=str(min(4, os.cpu_count() or 1)), **env_overrides)
    run = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-temp", str(tmp_path / "tmp"),
                          "--build-lib", str(tmp_path / "lib")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (so,) = (tmp_path / "lib" / "videocom_fast").glob("_C*.so")
    probe = subprocess.run([sys.executable, "-c", "import _C; print(_C.with_cuda, hasattr(_C, 'crop_resize_patchify_cuda'))"],
                           cwd=so.parent, capture_output=True, text=True, timeout=120)
    assert probe.stdout.split() == ["True", "True"], probe.stderr[-2000:]
    return _nvcc_targets(tmp_path / "tmp")


def _nvcc_targets(build_dir: Path) -> set[str]:
    """The -gencode/--generate-code targets CMake gave nvcc, e.g. {"sm_80", "compute_90", "sm_90"}."""
    text = "".join(p.read_text(errors="replace") for p in build_dir.rglob("*")
                   if p.name in ("build.ninja", "flags.make") or p.suffix == ".rsp")
    return set(re.findall(r"\b(?:sm|compute)_\d+a?\b", " ".join(re.findall(r"code=\S+", text))))


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDACXX"),
                                reason="no CUDA compiler (nvcc) on this machine: the CUDA build cannot be tested")


@pytest.mark.slow
@needs_nvcc
def test_setup_py_cuda_on_without_arch_builds_cuda_ops(tmp_path):
    """The README's `VIDEOCOM_CUDA=ON pip install ...` with no architecture given (was: "CUDA_ARCHITECTURES is
    empty for target _C"). Without a visible GPU CMake's list applies; with one, setup.py builds for it."""
    import torch

    targets = _setup_build_ext(tmp_path)
    if torch.cuda.is_available():
        want = {f"sm_{a}{b}" for a, b in (torch.cuda.get_device_capability(i)
                                           for i in range(torch.cuda.device_count()))}
    else:
        want = {"sm_80", "sm_86", "sm_89", "sm_90", "compute_90"}
    assert want <= targets, targets


@pytest.mark.slow
@needs_nvcc
def test_setup_py_maps_torch_cuda_arch_list(tmp_path):
    targets = _setup_build_ext(tmp_path, TORCH_CUDA_ARCH_LIST="8.0+PTX")
    assert targets == {"sm_80", "compute_80"}, targets


def test_cuda_on_without_a_compiler_fails_loudly(tmp_path):
    env = dict(os.environ, PATH="/usr/bin:/bin", CUDACXX="/nonexistent/nvcc")
    cfg = _cmake(tmp_path, "-DVIDEOCOM_CUDA=ON", env=env)
    assert cfg.returncode != 0
    assert "VIDEOCOM_CUDA=ON" in cfg.stdout + cfg.stderr


def test_auto_without_gpu_builds_cpu_only(tmp_path):
    cfg = _cmake(tmp_path, "-DVIDEOCOM_CUDA=AUTO", "-DVIDEOCOM_WANT_GPU=OFF")
    assert cfg.returncode == 0, cfg.stderr[-2000:]
    assert "CUDA sources skipped" in cfg.stdout
