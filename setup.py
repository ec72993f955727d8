"""Build videocom_fast: setup.py only forwards options to CMake, which decides what to build.

    pip install --no-build-isolation -e .            # CPU core; CUDA sources when a GPU build is wanted
    VIDEOCOM_CUDA=ON pip install --no-build-isolation -e .   # CUDA sources or a loud failure
    TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" VIDEOCOM_CUDA=ON pip install --no-build-isolation .
    MAX_JOBS=8 CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" pip install --no-build-isolation .

CUDA architectures, first given wins: CMAKE_ARGS' -DCMAKE_CUDA_ARCHITECTURES, CMake's CUDAARCHS, torch's
TORCH_CUDA_ARCH_LIST (mapped here to CMake's spelling), the GPUs torch sees, else CMakeLists.txt's list.

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


# torch's named architectures (torch.utils.cpp_extension) that nvcc 13 still builds.
_NAMED_ARCHS = {"turing": ["7.5"], "ampere": ["8.0", "8.6"], "ada": ["8.9"], "hopper": ["9.0"],
                "blackwell": ["10.0", "12.0"]}


def cuda_architectures_from_torch_list(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST ("8.0;8.6 9.0+PTX", "Ampere", "9.0a") -> CMAKE_CUDA_ARCHITECTURES ("80-real;...").

    torch builds SASS for each entry and PTX only for "+PTX" ones; in CMake "80-real" is SASS only and "90"
    is SASS plus PTX, so the meaning carries over exactly.
    """
    out: list[str] = []
    for entry in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not entry:
            continue
        name, ptx = (entry[:-4], True) if entry.upper().endswith("+PTX") else (entry, False)
        versions = _NAMED_ARCHS.get(name.lower(), [name])
        for version in versions:
            major, dot, minor = version.partition(".")
            suffix = minor[1:] if minor[1:] in ("a", "f") else ""
            if not (dot and major.isdigit() and minor[:1].isdigit() and minor[1:] == suffix):
                raise ValueError(f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not an architecture like '8.0', "
                                 f"'9.0a', '9.0+PTX' or one of {sorted(_NAMED_ARCHS)}")
            cmake = f"{major}{minor}"
            out.append(cmake if ptx and version == versions[-1] else f"{cmake}-real")
    if not out:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST={arch_list!r} names no architecture")
    return ";".join(dict.fromkeys(out))


def _cuda_architectures() -> str | None:
    """The -DCMAKE_CUDA_ARCHITECTURES value setup.py should pass, or None to leave the choice to CMake."""
    if "CMAKE_CUDA_ARCHITECTURES" in os.environ.get("CMAKE_ARGS", "") or os.environ.get("CUDAARCHS"):
        return None
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return cuda_architectures_from_torch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
    try:
        import torch
    except ImportError:
        return None
    if not (torch.version.cuda and torch.cuda.is_available()):
        return None
    # Build for the GPUs this machine has, like torch.utils.cpp_extension without TORCH_CUDA_ARCH_LIST.
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}{minor}" for major, minor in caps)


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
        archs = _cuda_architectures()
        if archs:
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs}")
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


# Guarded so tests can import the helpers above; pip's build backend runs this file as __main__.
if __name__ == "__main__":
    setup(
        name="videocom_fast",
        version="0.1.0",
        description="Fast training of interactive video reasoning (Video-CoM) models",
        python_requires=">=3.10",
        packages=[
            "videocom_fast", "videocom_fast.protocol", "videocom_fast.media", "videocom_fast.rollout",
            "videocom_fast.data", "videocom_fast.kernels", "videocom_fast.training", "videocom_fast.testing",
        ],
        package_dir={"videocom_fast.kernels": "kernels", "videocom_fast.training": "training"},
        package_data={"videocom_fast": ["py.typed", "_C.pyi", "configs/*.yaml", "configs/*.json"]},
        ext_modules=[CMakeExtension("videocom_fast._C")],
        cmdclass={"build_ext": CMakeBuild},
        entry_points={"console_scripts": ["videocom-fast=videocom_fast.cli:main"]},
        zip_safe=False,
    )
