"""Causal attention for CPU training: blocked matmuls around two fused C++ row passes (forward and backward).

Legend: n tokens of one example, Hq / Hkv query / key-value heads (g = Hq / Hkv, grouped-query attention), D
head dim, P the probabilities.

Why: packed SFT / GRPO batches on the CPU run one causal attention per example (training/packing.py), and
torch's CPU flash-attention kernel was ~40% of a demo SFT step: at n = 570, 4 query / 2 KV heads of 32 it ran
13 ms forward + backward per example and layer on a 2-core AMD EPYC (AVX2), ~25 GFLOP/s, where one batched
matmul of those shapes runs at ~60. Here the work of query rows [r0, r1) is matmuls against keys [0, r1) only
(the causal triangle in blocks of BLOCK_ROWS rows), the g query heads of a KV head stacked as one matmul's
rows (no repeated K / V), P kept for the backward (~n^2 / 2 floats per head: 0.7 MB at n = 570), and the
softmax and its backward are one C++ pass each (csrc/cpu/causal_softmax.cpp) instead of 4-6 ATen passes:
  forward   S = Q_b K^T,  P = softmax(scale S) (causal),  O_b = P V
  backward  dV += P^T dO_b,  dP = dO_b V^T,  dS = scale P (dP - rowsum(P dP)),  dQ_b = dS K,  dK += dS^T Q_b
Same math as scaled_dot_product_attention(is_causal=True, enable_gqa=...); the rounding differs (tests hold it
to 2x the error of SDPA in the same dtype, flash-attention's rule, and check gradcheck in float64). The
matmuls are now ~2/3 of its time (~50 GFLOP/s); measured in bench/bench_train_attention.py and the README.
Opt-in in training (packing.CPU_CAUSAL): a step with it is faster alone and slower beside the demo's renderer
thread (the measurements are at packing.CPU_CAUSAL).
"""
from __future__ import annotations

import torch

BLOCK_ROWS = 96   # query rows per block: smaller wastes less of the triangle, larger makes fuller matmuls


def available(query: torch.Tensor) -> bool:
    """Whether `causal_attention` runs for this query: CPU float32 / float64 and the built extension."""
    if query.device.type != "cpu" or query.dtype not in (torch.float32, torch.float64):
        return False
    try:
        from videocom_fast import _C
    except ImportError:
        return False
    return hasattr(_C, "causal_softmax_")


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        from videocom_fast import _C
        Hq, n, D = q.shape
        Hkv = k.shape[0]
        g = Hq // Hkv
        out = q.new_empty(Hq, n, D)
        probs = []
        for r0 in range(0, n, BLOCK_ROWS):
            r1 = min(n, r0 + BLOCK_ROWS)
            q_b = q[:, r0:r1].reshape(Hkv, g * (r1 - r0), D)
            p = torch.bmm(q_b, k[:, :r1].transpose(1, 2))                    # (Hkv, g * rows, r1) scores
            _C.causal_softmax_(p.view(Hkv * g, r1 - r0, r1).numpy(), r0, scale)
            out[:, r0:r1] = torch.bmm(p, v[:, :r1]).view(Hq, r1 - r0, D)
            probs.append(p)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, *probs)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        from videocom_fast import _C
        q, k, v, *probs = ctx.saved_tensors
        Hq, n, D = q.shape
        Hkv = k.shape[0]
        g = Hq // Hkv
        d_out = d_out.contiguous()
        # dK / dV gather a term from every block at or below their rows: summed in float64, rounded once
        dq = torch.empty_like(q)
        dk, dv = (torch.zeros(x.shape, dtype=torch.float64) for x in (k, v))
        for p, r0 in zip(probs, range(0, n, BLOCK_ROWS)):
            r1 = min(n, r0 + BLOCK_ROWS)
            q_b = q[:, r0:r1].reshape(Hkv, g * (r1 - r0), D)
            do_b = d_out[:, r0:r1].reshape(Hkv, g * (r1 - r0), D)
            dv[:, :r1] += torch.bmm(p.transpose(1, 2), do_b)
            ds = torch.bmm(do_b, v[:, :r1].transpose(1, 2))                   # dP, then dS in place
            _C.causal_softmax_backward_(p.view(Hkv * g, r1 - r0, r1).numpy(),
                                        ds.view(Hkv * g, r1 - r0, r1).numpy(), r0, ctx.scale)
            dq[:, r0:r1] = torch.bmm(ds, k[:, :r1]).view(Hq, r1 - r0, D)
            dk[:, :r1] += torch.bmm(ds.transpose(1, 2), q_b)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None):
    """softmax(scale q k^T, causal) v for one sequence: query (Hq, n, D), key / value (Hkv, n, D), Hq a
    multiple of Hkv (query head h reads KV head h // (Hq / Hkv), as SDPA's enable_gqa) -> (Hq, n, D). CPU,
    float32 / float64; differentiable in all three inputs (once). scale: 1 / sqrt(D) when None."""
    if not available(query):
        raise ValueError(f"causal_attention: needs CPU float32 / float64 tensors and the built "
                         f"videocom_fast._C, got {query.dtype} on {query.device}")
    ok = (query.ndim == key.ndim == value.ndim == 3 and key.shape == value.shape
          and key.shape[1:] == query.shape[1:] and query.shape[0] % key.shape[0] == 0
          and key.dtype == value.dtype == query.dtype)
    if not ok:
        raise ValueError(f"causal_attention: expected query (Hq, n, D) and key / value (Hkv, n, D) of one "
                         f"dtype with Hkv dividing Hq, got {tuple(query.shape)} {query.dtype}, "
                         f"{tuple(key.shape)} {key.dtype}, {tuple(value.shape)} {value.dtype}")
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = (x.contiguous() for x in (query, key, value))
    return _CausalAttention.apply(q, k, v, scale)
