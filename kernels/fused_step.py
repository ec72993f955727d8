"""The engine step's fused ops on CUDA (Triton): add+RMSNorm, rotary, SiLU*mul, K/V write (issue 16).

What each fuses (formulas in csrc/include/fused_step.h, which the CPU kernels share; same roundings except the
order of the RMS sum and the exp):
- add_rms_norm: x += r; y = w * T(float(x) * rsqrt(mean(float(x)^2) + eps)). Unfused: add, to, pow, mean,
  add, rsqrt, mul, to, mul = 9 kernels and 4 (L, D) temporaries; fused: one read of x and r, one write each of
  x and y.
- rotary_: the q and k heads of the fused QKV rows rotated in place (rotate_half). Unfused: chunk/neg/cat/mul/
  mul/add twice (~12 kernels); fused: one read and one write of those heads.
- silu_mul: y = silu(g) * u from the fused gate/up rows. Unfused: silu, mul (one (L, F) temporary).
- kv_write_: K and V rows into the paged pool (standard layout) at their slots: one launch instead of two
  index_copy_ (plus casts).
Legend: L rows, D hidden, H heads, Dh head dim, F MLP width, Hkv kv heads.
One program per row (BLOCK = the next power of two of the row); one config, so the kernels also run under
TRITON_INTERPRET=1 (tests/test_fused_step.py, in a subprocess).
"""
from __future__ import annotations

import torch

try:  # Triton is optional: the CPU paths never import this module
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "not available"
    triton = tl = None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:
    @triton.jit
    def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, D, sx, sr, sy, eps, HAS_R: tl.constexpr,
                             BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        ok = cols < D
        x = tl.load(x_ptr + row * sx + cols, mask=ok, other=0.0)
        if HAS_R:
            x = x + tl.load(r_ptr + row * sr + cols, mask=ok, other=0.0)
            tl.store(x_ptr + row * sx + cols, x, mask=ok)
        h = x.to(tl.float32)
        var = tl.sum(h * h, 0) / D
        inv = 1.0 / tl.sqrt(var + eps)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        tl.store(y_ptr + row * sy + cols, w * (h * inv).to(x.dtype), mask=ok)

    @triton.jit
    def _rotary_kernel(x_ptr, c_ptr, s_ptr, H, sx, sc, ss, HALF: tl.constexpr, DH: tl.constexpr,
                       BLOCK_H: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        heads = tl.arange(0, BLOCK_H)
        j = tl.arange(0, HALF)
        ok = heads[:, None] < H
        base = x_ptr + row * sx + heads[:, None] * DH + j[None, :]
        x1 = tl.load(base, mask=ok, other=0.0)
        x2 = tl.load(base + HALF, mask=ok, other=0.0)
        c = tl.load(c_ptr + row * sc + j)[None, :]
        s = tl.load(s_ptr + row * ss + j)[None, :]
        tl.store(base, x1 * c + (-x2) * s, mask=ok)
        tl.store(base + HALF, x2 * c + x1 * s, mask=ok)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, y_ptr, F, sg, sy, BLOCK_F: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_F)
        ok = cols < F
        g = tl.load(gu_ptr + row * sg + cols, mask=ok, other=0.0)
        u = tl.load(gu_ptr + row * sg + F + cols, mask=ok, other=0.0)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        tl.store(y_ptr + row * sy + cols, s * u, mask=ok)

    @triton.jit
    def _kv_write_kernel(kp_ptr, vp_ptr, slot_ptr, k_ptr, v_ptr, HD, sk, sv, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + row).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < HD
        k = tl.load(k_ptr + row * sk + cols, mask=ok, other=0.0)
        v = tl.load(v_ptr + row * sv + cols, mask=ok, other=0.0)
        tl.store(kp_ptr + slot * HD + cols, k.to(kp_ptr.dtype.element_ty), mask=ok)
        tl.store(vp_ptr + slot * HD + cols, v.to(vp_ptr.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor, name: str) -> None:
    if x.ndim != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
        raise ValueError(f"{name}: expected a 2-D tensor with a contiguous last dim, got {tuple(x.shape)} "
                         f"strides {x.stride()}")


def add_rms_norm(x, r, w, eps) -> torch.Tensor:
    _rows(x, "x")
    if r is not None:
        _rows(r, "residual")
    L, D = x.shape
    y = torch.empty(L, D, dtype=x.dtype, device=x.device)
    if L:
        _add_rms_norm_kernel[(L,)](x, r if r is not None else x, w, y, D, x.stride(0),
                                   r.stride(0) if r is not None else 0, y.stride(0), float(eps),
                                   HAS_R=r is not None, BLOCK_D=_next_pow2(D))
    return y


def rotary_(x, cos, sin, head_dim: int) -> None:
    _rows(x, "x")
    L, W = x.shape
    if head_dim % 2 or W % head_dim or head_dim & (head_dim - 1):
        raise ValueError(f"rotary_: head_dim {head_dim} must be a power of two dividing the row length {W}")
    H = W // head_dim
    if L:
        _rotary_kernel[(L,)](x, cos, sin, H, x.stride(0), cos.stride(0), sin.stride(0), HALF=head_dim // 2,
                             DH=head_dim, BLOCK_H=_next_pow2(H))


def silu_mul(gu) -> torch.Tensor:
    _rows(gu, "gate_up")
    L, F2 = gu.shape
    F = F2 // 2
    y = torch.empty(L, F, dtype=gu.dtype, device=gu.device)
    if L:
        _silu_mul_kernel[(L,)](gu, y, F, gu.stride(0), y.stride(0), BLOCK_F=_next_pow2(F))
    return y


def kv_write_(k_pool, v_pool, slots, k, v) -> None:
    L, Hkv, Dh = k.shape
    if k.stride(2) != 1 or v.stride(2) != 1 or k.stride(1) != Dh or v.stride(1) != Dh:
        raise ValueError("kv_write_: k and v rows must be contiguous (Hkv, Dh) blocks")
    if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError("kv_write_: the pools must be contiguous (standard layout)")
    if L:
        _kv_write_kernel[(L,)](k_pool, v_pool, slots, k, v, Hkv * Dh, k.stride(0), v.stride(0),
                               BLOCK=_next_pow2(Hkv * Dh))
