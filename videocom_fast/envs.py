"""Every environment variable videocom_fast reads, declared once (after vLLM's envs.py).

VIDEOCOM_BACKEND          force the implementation of the fused preprocessing kernels:
                          "auto" (default), "triton", "cuda", "cpp", "torch" (the plain PyTorch reference)
VIDEOCOM_PROTOCOL         "auto" (default: C++ core when built), "cpp", or "python" (the reference twin)
VIDEOCOM_DECODER          force a video decoder: "auto" (default), "dali", "torchcodec", "pyav"
VIDEOCOM_FRAME_CACHE_MB   byte budget of the shared frame cache in MiB (default 2048)
VIDEOCOM_OUT_CACHE_MB     budget of recycled CPU pixel_values buffers in MiB (default 256; 0 disables)
VIDEOCOM_ATTENTION        rollout/training attention: "auto" (flash-attn when importable; on CPU the C++ paged
                          kernel; on CUDA without flash-attn the Triton paged kernel; else sdpa), "sdpa",
                          "cpp", "flash", "triton"
VIDEOCOM_KV_CACHE_MB      the rollout engine's KV pool when kv_budget_tokens is not given, in MiB, read when
                          generate() starts (default: 256 on the CPU -- 262k tokens of the tiny model; on CUDA 40%
                          of the memory free at that moment); the pool is freed when generate() returns
VIDEOCOM_DALI_DECODERS    most DALI video pipelines (decoders) alive in one process (default 2), media/dali.py
LOCAL_RANK                (set by torchrun / deepspeed) the GPU a process decodes video on
VIDEOCOM_SCHEDULER        rollout scheduler: "auto" (default: C++ when built), "cpp", "python" (the twin)
VIDEOCOM_CUDA             build time only (CMake): AUTO | ON | OFF
VIDEOCOM_CPU_ISA          read by the C++ extension: caps the instruction set of the SiLU*mul rows
                          ("avx512", "avx2", "baseline"; default: the CPU's best) and the paged attention tiles, for tests
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


def dali_decoders() -> int:
    raw = os.environ.get("VIDEOCOM_DALI_DECODERS", "2").strip() or "2"
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"VIDEOCOM_DALI_DECODERS must be an int >= 1, got {raw!r}")
    return int(raw)


def local_rank() -> int | None:
    raw = os.environ.get("LOCAL_RANK", "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise ValueError(f"LOCAL_RANK must be a non-negative int, got {raw!r}")
    return int(raw)


def kv_cache_bytes(device, held_bytes: int = 0) -> int:
    """The rollout engine's KV budget, read when `generate` starts. On CUDA without VIDEOCOM_KV_CACHE_MB:
    40% of the memory free now plus `held_bytes` (a pool the engine kept from its last call)."""
    mb = os.environ.get("VIDEOCOM_KV_CACHE_MB", "").strip()
    if mb:
        try:
            val = float(mb)
        except ValueError:
            val = -1.0
        if not val > 0:
            raise ValueError(f"VIDEOCOM_KV_CACHE_MB must be a positive number of MiB, got {mb!r}")
        return int(val * 2**20)
    import torch
    if torch.device(device).type == "cuda":
        return int(0.4 * (torch.cuda.mem_get_info(device)[0] + held_bytes))
    return 256 * 2**20
