"""CMake decides CUDA: VIDEOCOM_CUDA=ON builds csrc/cuda into the same module (or fails loudly without a
CUDA compiler), AUTO without a GPU builds the CPU core only, and `import videocom_fast` / build_info()
report what is there."""
import os
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


def test_build_info_on_cpu_machine():
    import videocom_fast

    info = videocom_fast.build_info()
    assert info["cpp_core"] is True and info["cuda_device"] is False
    assert set(info) >= {"cuda_ops", "triton", "dali", "flash_attn", "decoders", "protocol"}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA compiler on this machine")
def test_cuda_on_builds_the_cuda_sources_into_the_module(tmp_path):
    cfg = _cmake(tmp_path, "-DVIDEOCOM_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=80")
    assert cfg.returncode == 0, cfg.stdout[-2000:] + cfg.stderr[-2000:]
    b = subprocess.run(["cmake", "--build", ".", "-j", "2"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=1200)
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    probe = subprocess.run([sys.executable, "-c", "import _C; print(_C.with_cuda, hasattr(_C, 'crop_resize_patchify_cuda'))"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert probe.stdout.split() == ["True", "True"], probe.stderr


def test_cuda_on_without_a_compiler_fails_loudly(tmp_path):
    env = dict(os.environ, PATH="/usr/bin:/bin", CUDACXX="/nonexistent/nvcc")
    cfg = _cmake(tmp_path, "-DVIDEOCOM_CUDA=ON", env=env)
    assert cfg.returncode != 0
    assert "VIDEOCOM_CUDA=ON" in cfg.stdout + cfg.stderr


def test_auto_without_gpu_builds_cpu_only(tmp_path):
    cfg = _cmake(tmp_path, "-DVIDEOCOM_CUDA=AUTO", "-DVIDEOCOM_WANT_GPU=OFF")
    assert cfg.returncode == 0, cfg.stderr[-2000:]
    assert "CUDA sources skipped" in cfg.stdout
