"""Every environment variable videocom_fast reads, declared once (after vLLM's envs.py).

VIDEOCOM_BACKEND          force the implementation of the fused preprocessing kernels:
                          "auto" (default), "triton", "cuda", "cpp", "torch" (the plain PyTorch reference)
VIDEOCOM_PROTOCOL         "auto" (default: C++ core when built), "cpp", or "python" (the reference twin)
VIDEOCOM_DECODER          force a video decoder: "auto" (default), "dali", "torchcodec", "pyav"
VIDEOCOM_FRAME_CACHE_MB   byte budget of the shared frame cache in MiB (default 2048)
VIDEOCOM_OUT_CACHE_MB     budget of recycled CPU pixel_values buffers in MiB (default 256; 0 disables)
VIDEOCOM_ATTENTION        rollout/training attention: "auto" (flash-attn when importable; on CPU the C++ paged
                          kernel; else sdpa), "sdpa", "cpp", "flash"
VIDEOCOM_SCHEDULER        rollout scheduler: "auto" (default: C++ when built), "cpp", "python" (the twin)
VIDEOCOM_CUDA             build time only (CMake): AUTO | ON | OFF
"""
import os


def _get(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower() or default


def backend() -> str:
    return _get("VIDEOCOM_BACKEND", "auto")


def protocol_impl() -> str:
    return _get("VIDEOCOM_PROTOCOL", "auto")


def decoder() -> str:
    return _get("VIDEOCOM_DECODER", "auto")


def frame_cache_bytes() -> int:
    return int(float(os.environ.get("VIDEOCOM_FRAME_CACHE_MB", "2048")) * 2**20)


def attention() -> str:
    return _get("VIDEOCOM_ATTENTION", "auto")


def scheduler_impl() -> str:
    return _get("VIDEOCOM_SCHEDULER", "auto")


def out_cache_mb() -> float:
    return float(os.environ.get("VIDEOCOM_OUT_CACHE_MB", "256"))
