"""The engine step's fused ops: one place decides which implementation runs (issue 16).

Legend: L packed tokens, D hidden, F MLP width, H heads, Dh head dim, W = H * Dh.

Ops (each ONE kernel where it runs; the unfused reference of each is here too, for the tests and the bench):
    add_rms_norm(x, r, w, eps) -> y    x += r in place (r None: no add), y = w * RMSNorm(x), float32 statistics
    rotary_(x, cos, sin, Dh)           every head of x (L, W) rotated in place; cos/sin (L, Dh/2) in x's dtype
    silu_mul(gu) -> y                  y (L, F) = silu(gu[:, :F]) * gu[:, F:]
    kv_write(pool, layer, slots, k, v) the step's K/V rows (L, Hkv, Dh) into the paged pool at flat slots
Implementations: CPU float32/float64 with the extension built -> C++ (csrc/cpu/fused_step.cpp, math in
csrc/include/fused_step.h), called directly through numpy views (a dispatcher round trip would cost more than
these kernels on the tiny model); CUDA -> Triton (kernels/fused_step.py); any other case (bf16 on the CPU, no
extension) -> the torch reference. On devices other than the CPU the ops go through `torch.ops.videocom.*`
(registered below), so a TorchDispatchMode sees each as one op: the op counter of the tests, and the stand-in
device (meta tensors with CPU shadows), which runs the CPU implementation on the shadows.
`force_impl("torch")` (tests, benches) makes every op take the reference.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

_FORCED: str | None = None


@contextlib.contextmanager
def force_impl(impl: str | None):
    """Within the block every op takes `impl`: "torch" (the unfused reference) or None (the default choice)."""
    global _FORCED
    if impl not in (None, "torch"):
        raise ValueError(f"force_impl: expected None or 'torch', got {impl!r}")
    prev, _FORCED = _FORCED, impl
    try:
        yield
    finally:
        _FORCED = prev


_C_MOD: list = []     # [the extension module or None], looked up once: these ops run ~10 times per layer per step


def _cpp():
    if not _C_MOD:
        try:
            from videocom_fast import _C
        except ImportError:
            _C = None
        _C_MOD.append(_C if _C is not None and hasattr(_C, "fused_add_rms_norm") else None)
    return _C_MOD[0]


_CPP_DTYPES = (torch.float32, torch.float64)


def use_cpp(x: torch.Tensor) -> bool:
    return _FORCED is None and x.device.type == "cpu" and x.dtype in _CPP_DTYPES and _cpp() is not None


# --- the unfused PyTorch reference (what transformers' Qwen2 modules compute) ------------------------------------


def add_rms_norm_ref(x: torch.Tensor, r: torch.Tensor | None, w: torch.Tensor, eps: float) -> torch.Tensor:
    if r is not None:
        x.add_(r)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def rotary_ref_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> None:
    L = x.shape[0]
    xh = x.view(L, -1, head_dim) if x.is_contiguous() else x.unflatten(1, (-1, head_dim))
    c, s = torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]
    x1, x2 = xh.chunk(2, dim=-1)
    xh.copy_(xh * c + torch.cat((-x2, x1), dim=-1) * s)


def silu_mul_ref(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def kv_write_ref(k_pool, v_pool, slots, k, v) -> None:
    Hkv, Dh = k.shape[1], k.shape[2]
    k_pool.view(-1, Hkv, Dh).index_copy_(0, slots, k.to(k_pool.dtype))
    v_pool.view(-1, Hkv, Dh).index_copy_(0, slots, v.to(v_pool.dtype))


# --- torch.library ops (devices other than the CPU fast path) --------------------------------------------------

_lib = torch.library.Library("videocom", "DEF")
_lib.define("add_rms_norm_(Tensor(a!) x, Tensor? residual, Tensor weight, float eps) -> Tensor")
_lib.define("rotary_(Tensor(a!) x, Tensor cos, Tensor sin, int head_dim) -> ()")
_lib.define("silu_mul(Tensor gate_up) -> Tensor")
_lib.define("kv_write_(Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor slots, Tensor k, Tensor v) -> ()")


def _add_rms_norm_cpu(x, r, w, eps):
    if x.dtype in (torch.float32, torch.float64) and _cpp() is not None:
        y = torch.empty(x.shape, dtype=x.dtype)
        _cpp().fused_add_rms_norm(x.numpy(), None if r is None else r.numpy(), w.detach().numpy(), y.numpy(), eps)
        return y
    return add_rms_norm_ref(x, r, w, eps)


def _rotary_cpu(x, cos, sin, head_dim):
    if x.dtype in (torch.float32, torch.float64) and _cpp() is not None:
        _cpp().fused_rotary(x.numpy(), cos.numpy(), sin.numpy(), head_dim)
    else:
        rotary_ref_(x, cos, sin, head_dim)


def _silu_mul_cpu(gu):
    if gu.dtype in (torch.float32, torch.float64) and _cpp() is not None:
        y = torch.empty(gu.shape[0], gu.shape[1] // 2, dtype=gu.dtype)
        _cpp().fused_silu_mul(gu.numpy(), y.numpy())
        return y
    return silu_mul_ref(gu)


def _triton():
    from videocom_fast.kernels import fused_step as K   # lazily: Triton is only needed on CUDA
    return K


_lib.impl("add_rms_norm_", _add_rms_norm_cpu, "CPU")
_lib.impl("rotary_", _rotary_cpu, "CPU")
_lib.impl("silu_mul", _silu_mul_cpu, "CPU")
_lib.impl("kv_write_", kv_write_ref, "CPU")
_lib.impl("add_rms_norm_", lambda x, r, w, eps: _triton().add_rms_norm(x, r, w, eps), "CUDA")
_lib.impl("rotary_", lambda x, c, s, d: _triton().rotary_(x, c, s, d), "CUDA")
_lib.impl("silu_mul", lambda gu: _triton().silu_mul(gu), "CUDA")
_lib.impl("kv_write_", lambda kp, vp, sl, k, v: _triton().kv_write_(kp, vp, sl, k, v), "CUDA")
_lib.impl("add_rms_norm_", lambda x, r, w, eps: torch.empty_like(x), "Meta")
_lib.impl("rotary_", lambda x, c, s, d: None, "Meta")
_lib.impl("silu_mul", lambda gu: gu.new_empty(gu.shape[0], gu.shape[1] // 2), "Meta")
_lib.impl("kv_write_", lambda kp, vp, sl, k, v: None, "Meta")


# --- dispatch -----------------------------------------------------------------------------------------------------


def add_rms_norm(x: torch.Tensor, r: torch.Tensor | None, w: torch.Tensor, eps: float) -> torch.Tensor:
    if _FORCED == "torch":
        return add_rms_norm_ref(x, r, w, eps)
    if use_cpp(x):
        y = torch.empty(x.shape, dtype=x.dtype)
        # NOTE: `w` must not require grad (.numpy()): PackedForward passes detached aliases of the parameters
        _cpp().fused_add_rms_norm(x.numpy(), None if r is None else r.numpy(), w.numpy(), y.numpy(), eps)
        return y
    return torch.ops.videocom.add_rms_norm_(x, r, w, eps)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> None:
    if _FORCED == "torch":
        rotary_ref_(x, cos, sin, head_dim)
    elif use_cpp(x):
        _cpp().fused_rotary(x.numpy(), cos.numpy(), sin.numpy(), head_dim)
    else:
        torch.ops.videocom.rotary_(x, cos, sin, head_dim)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    if _FORCED == "torch":
        return silu_mul_ref(gu)
    if use_cpp(gu):
        y = torch.empty(gu.shape[0], gu.shape[1] // 2, dtype=gu.dtype)
        _cpp().fused_silu_mul(gu.numpy(), y.numpy())
        return y
    return torch.ops.videocom.silu_mul(gu)


def kv_write(pool, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """K/V rows into the pool: the C++ write for the CPU kernel's transposed layout (kv_cache.PagedKVPool.write),
    else one op (Triton on CUDA)."""
    if pool.layout == "k_transposed" or _FORCED == "torch":
        pool.write(layer, slots, k, v)
    else:
        torch.ops.videocom.kv_write_(pool.k[layer], pool.v[layer], slots, k, v)
