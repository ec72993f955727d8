"""videocom_fast: fast training of interactive video reasoning (Video-CoM) models.

`import videocom_fast` always succeeds on a CPU-only machine; `build_info()` says what is there.
Heavy submodules (torch kernels, media, rollout, training) are imported on first use.
"""
from __future__ import annotations

import importlib

from .protocol import (Action, parse_action, parse_actions, sample_frame_indices, segment_ranges,
                       smart_resize)

__version__ = "0.1.0"

# public name -> submodule that defines it (imported lazily: torch and friends load only when needed)
_LAZY = {
    "preprocess_images": "videocom_fast.preprocess",
    "preprocess_video": "videocom_fast.preprocess",
    "patch_processor": "videocom_fast.preprocess",
    "preprocess_media": "videocom_fast.preprocess",
    "RolloutEngine": "videocom_fast.rollout",
    "Trajectory": "videocom_fast.rollout",
    "ManipulationEnv": "videocom_fast.env",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'videocom_fast' has no attribute {name!r}")


def _importable(mod: str) -> bool:
    try:
        importlib.import_module(mod)
        return True
    except Exception:  # noqa: BLE001 - an optional dependency may fail in any way on import
        return False


def build_info() -> dict:
    """What this installation can use: C++ core (with the CPU kernels' instruction sets), CUDA ops, Triton,
    DALI, flash-attn, decoders."""
    info: dict = {"version": __version__}
    try:
        from . import _C
        info["cpp_core"] = True
        info["cuda_ops"] = bool(getattr(_C, "with_cuda", False))
        info["openmp"] = bool(getattr(_C, "with_openmp", False))
        info["cpu_isa"] = _C.cpu_isa()         # per-ISA kernel copies run: avx512 | avx2 | baseline
        info["cpu_simd"] = _C.cpu_simd_isa()   # preprocessing loops: avx512_vbmi | avx512 | avx2 | portable
    except ImportError:
        info.update(cpp_core=False, cuda_ops=False, openmp=False, cpu_isa=None, cpu_simd=None)
    try:
        import torch
        info["torch"] = torch.__version__
        info["cuda_device"] = torch.cuda.is_available()
    except ImportError:
        info.update(torch=None, cuda_device=False)
    info["triton"] = _importable("triton")
    info["flash_attn"] = _importable("flash_attn")
    try:   # what the rollout engine's attention="auto" runs here ("flash-paged" | "cpp" | "sdpa")
        from .rollout.attention import auto_label
        info["attention"] = auto_label()
    except ImportError:
        info["attention"] = None
    info["dali"] = _importable("nvidia.dali")
    info["decoders"] = [name for name, mod in (("dali", "nvidia.dali"), ("torchcodec", "torchcodec.decoders"),
                                               ("pyav", "av")) if _importable(mod)]
    from . import protocol
    info["protocol"] = protocol.implementation()
    return info


__all__ = ["Action", "parse_action", "parse_actions", "segment_ranges", "smart_resize",
           "sample_frame_indices", "build_info", *_LAZY]
