"""Build videocom_fast: setup.py only forwards options to CMake, which decides what to build.

    pip install --no-build-isolation -e .            # CPU core; CUDA sources when a GPU build is wanted
    VIDEOCOM_CUDA=ON pip install --no-build-isolation -e .   # CUDA sources or a loud failure
    MAX_JOBS=8 CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" pip install --no-build-isolation .

`kernels/` and `training/` ship inside the package as `videocom_fast.kernels` and `videocom_fast.training`.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _gpu_build_wanted() -> bool:
    """AUTO mode builds CUDA only for a CUDA build of torch on a machine that has (or targets) a GPU."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return True
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.version.cuda) and torch.cuda.is_available()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        import pybind11

        cfg = os.environ.get("CMAKE_BUILD_TYPE", "Debug" if self.debug else "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DVIDEOCOM_CUDA={os.environ.get('VIDEOCOM_CUDA', 'AUTO').upper()}",
            f"-DVIDEOCOM_WANT_GPU={'ON' if _gpu_build_wanted() else 'OFF'}",
        ]
        args += os.environ.get("CMAKE_ARGS", "").split()
        if any(s in os.environ.get("CMAKE_GENERATOR", "") for s in ("Ninja",)) or _has_ninja():
            args += ["-GNinja"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp, check=True)


def _has_ninja() -> bool:
    try:
        subprocess.run(["ninja", "--version"], capture_output=True, check=True)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


setup(
    name="videocom_fast",
    version="0.1.0",
    description="Fast training of interactive video reasoning (Video-CoM) models",
    python_requires=">=3.10",
    packages=[
        "videocom_fast", "videocom_fast.protocol", "videocom_fast.media", "videocom_fast.rollout",
        "videocom_fast.data", "videocom_fast.kernels", "videocom_fast.training",
    ],
    package_dir={"videocom_fast.kernels": "kernels", "videocom_fast.training": "training"},
    package_data={"videocom_fast": ["py.typed", "_C.pyi", "configs/*.yaml", "configs/*.json"]},
    ext_modules=[CMakeExtension("videocom_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["videocom-fast=videocom_fast.cli:main"]},
    zip_safe=False,
)
