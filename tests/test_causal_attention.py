"""Causal attention for CPU training (training/causal_attention.py, csrc/cpu/causal_softmax.cpp): outputs and
gradients against scaled_dot_product_attention in float64 (the oracle; float32 errors against the plain
implementation's in float32, flash-attention's rule with a robust statistic: see the test), gradcheck in
float64 across block boundaries, the two C++ row passes against their ATen formulas, the packed-attention
dispatch, and bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from videocom_fast.training import causal_attention as CA
from videocom_fast.training import packing

pytestmark = pytest.mark.skipif(not CA.available(torch.zeros(1)), reason="videocom_fast._C not built")


def _inputs(Hq, Hkv, n, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(h, n, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    return q, k, v, torch.randn(Hq, n, D, generator=g, dtype=torch.float64)


def _sdpa(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale,
                                          enable_gqa=q.shape[0] != k.shape[0])[0]


def _plain(q, k, v, scale=None):
    """The plain implementation (explicit scores, mask, softmax): flash-attention's baseline for errors."""
    g = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    s = q @ k.transpose(1, 2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    hidden = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).triu(1)
    return s.masked_fill(hidden, float("-inf")).softmax(-1) @ v


def _out_and_grads(fn, q, k, v, d_out, dtype, **kw):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = fn(*leaves, **kw)
    out.backward(d_out.to(dtype))
    return [out.detach()] + [x.grad for x in leaves]


SHAPES = [(4, 2, 570, 32), (2, 2, 1, 16), (6, 3, 97, 24), (4, 1, 300, 64), (3, 3, CA.BLOCK_ROWS, 8),
          (4, 4, CA.BLOCK_ROWS + 1, 32), (8, 2, 250, 40)]


@pytest.mark.parametrize("Hq,Hkv,n,D", SHAPES)
def test_float32_within_twice_the_plain_error(Hq, Hkv, n, D):
    seed = int(torch.randint(1 << 30, ()))   # fresh inputs every run; the seed is in the message
    q, k, v, d_out = _inputs(Hq, Hkv, n, D, torch.float64, seed)
    ref = _out_and_grads(_sdpa, q, k, v, d_out, torch.float64)
    mine = _out_and_grads(CA.causal_attention, q, k, v, d_out, torch.float32)
    base = _out_and_grads(_plain, q, k, v, d_out, torch.float32)
    # flash-attention's rule holds the max error to 2x the plain one's; on fresh inputs the max is heavy
    # tailed: torch's own CPU flash kernel reached 2.1x (dV, 175 draws of these shapes), this kernel 2.0x in
    # 840 and 2.6x in another 840 when P was normalised by a division. So: the max within 3x, the mean within
    # 1.5x (worst seen 1.22x), plus one ulp of the largest value (an error that is ~0 by luck)
    for name, m, b, r in zip(("out", "dq", "dk", "dv"), mine, base, ref):
        ulp = torch.finfo(torch.float32).eps * r.abs().max().item()
        em, eb = (m.double() - r).abs(), (b.double() - r).abs()
        where = f"{name}, seed {seed}"
        assert em.max() <= 3 * eb.max() + ulp, f"{where}: max error {em.max():.3g} vs plain {eb.max():.3g}"
        assert em.mean() <= 1.5 * eb.mean() + ulp, f"{where}: mean error {em.mean():.3g} vs {eb.mean():.3g}"


def test_float64_equals_sdpa_and_scale_is_honoured():
    q, k, v, d_out = _inputs(4, 2, 203, 16, torch.float64, seed=5)
    for scale in (None, 0.3):
        ref = _out_and_grads(_sdpa, q, k, v, d_out, torch.float64, scale=scale)
        mine = _out_and_grads(CA.causal_attention, q, k, v, d_out, torch.float64, scale=scale)
        for m, r in zip(mine, ref):
            torch.testing.assert_close(m, r, rtol=1e-10, atol=1e-12)


def test_gradcheck_across_blocks(monkeypatch):
    monkeypatch.setattr(CA, "BLOCK_ROWS", 4)   # 11 rows: blocks of 4, 4 and 3
    q, k, v, _ = _inputs(4, 2, 11, 3, torch.float64, seed=2)
    assert torch.autograd.gradcheck(lambda a, b, c: CA.causal_attention(a, b, c, 0.7),
                                    tuple(x.requires_grad_() for x in (q, k, v)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_passes_equal_their_aten_formulas(dtype):
    from videocom_fast import _C
    g = torch.Generator().manual_seed(7)
    M, R, C, r0, scale = 3, 9, 21, 5, 0.45   # rows at positions 5..13: row i sees keys 0..5+i of 21
    s = torch.randn(M, R, C, generator=g, dtype=torch.float64) * 4
    s[0, 0, 0] = -1e4                         # an exp far below the polynomial's -87 clamp
    hidden = torch.arange(C)[None, :] > (r0 + torch.arange(R))[:, None]
    p_ref = (s * scale).masked_fill(hidden, float("-inf")).softmax(-1)
    p = s.to(dtype).clone()
    _C.causal_softmax_(p.numpy(), r0, scale)
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p.double(), p_ref, **tol)
    assert (p[:, hidden] == 0).all()

    dp_in = torch.randn(M, R, C, generator=g, dtype=torch.float64)
    leaf = s.clone().requires_grad_()
    (leaf * scale).masked_fill(hidden, float("-inf")).softmax(-1).backward(dp_in)
    ds = dp_in.to(dtype).clone()
    _C.causal_softmax_backward_(p_ref.to(dtype).numpy(), ds.numpy(), r0, scale)
    torch.testing.assert_close(ds.double(), leaf.grad, **tol)


def test_packed_attention_takes_the_cpu_path_and_equals_sdpa(monkeypatch):
    """packing.packed_attention on a pack of 3 examples: the blocked path (counted) and the per-example SDPA
    path give the same outputs and gradients (float64)."""
    cu = torch.tensor([0, 130, 131, 260], dtype=torch.int32)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 260, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    calls = []
    real = CA.causal_attention
    monkeypatch.setattr(CA, "causal_attention", lambda *a: calls.append(1) or real(*a))

    def run(cpu_causal):
        monkeypatch.setattr(packing, "CPU_CAUSAL", cpu_causal)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, _ = packing.packed_attention(None, *leaves, scaling=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
        out.backward(torch.ones_like(out))
        return [out.detach()] + [x.grad for x in leaves]

    fast, slow = run(True), run(False)
    assert len(calls) == 3
    for a, b in zip(fast, slow):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bad_input_is_named():
    from videocom_fast import _C
    q = torch.randn(4, 10, 8)
    with pytest.raises(ValueError, match="CPU float32 / float64"):
        CA.causal_attention(q.half(), q.half(), q.half())
    with pytest.raises(ValueError, match="Hkv dividing Hq"):
        CA.causal_attention(q, torch.randn(3, 10, 8), torch.randn(3, 10, 8))
    with pytest.raises(ValueError, match="Hkv dividing Hq"):
        CA.causal_attention(q, torch.randn(2, 9, 8), torch.randn(2, 9, 8))
    s = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.causal_softmax_(s.transpose(1, 2).numpy(), 0, 1.0)
    with pytest.raises(ValueError, match="r0"):
        _C.causal_softmax_(s.numpy(), -1, 1.0)
    with pytest.raises(ValueError, match="scale"):
        _C.causal_softmax_(s.numpy(), 0, 0.0)
    with pytest.raises(ValueError, match=r"expected \(M, R, C\)"):
        _C.causal_softmax_(s[0].numpy(), 0, 1.0)
    with pytest.raises(ValueError, match="float32 or float64"):
        _C.causal_softmax_(s.int().numpy(), 0, 1.0)
    read_only = s.numpy().copy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        _C.causal_softmax_(read_only, 0, 1.0)
    with pytest.raises(ValueError, match="dp's shape and dtype"):
        _C.causal_softmax_backward_(s.double().numpy(), s.numpy(), 0, 1.0)
