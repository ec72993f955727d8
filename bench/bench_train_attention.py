"""Causal attention of one packed example in training, forward + backward, on the CPU: torch's SDPA (its CPU
flash-attention kernel; role: baseline) vs training/causal_attention.py (blocked matmuls around the fused C++
softmax passes), the path packing.packed_attention takes on the CPU.

Shapes: the demo's tiny LLM (4 query / 2 KV heads of 32) at the scene-SFT example length (570 tokens) and at
a longer one (1,500), 1 and 2 threads; float32. Outputs are checked against each other before timing.
Run: .venv/bin/pytest bench/bench_train_attention.py --benchmark-only -o python_files="bench_*.py"
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from videocom_fast.training import causal_attention as CA

pytestmark = pytest.mark.skipif(not CA.available(torch.zeros(1)), reason="videocom_fast._C not built")

HQ, HKV, D = 4, 2, 32


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)[0]


IMPLS = {"sdpa": _sdpa, "blocked": CA.causal_attention}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [570, 1500])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_causal_attention_fwd_bwd(benchmark, impl, n, threads):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(h, n, D, generator=g).requires_grad_() for h in (HQ, HKV, HKV))
    d_out = torch.randn(HQ, n, D, generator=g)

    def step():
        for x in (q, k, v):
            x.grad = None
        IMPLS[impl](q, k, v).backward(d_out)
        return q.grad

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = step().clone()                  # dq of this implementation against SDPA's
        for x in (q, k, v):
            x.grad = None
        _sdpa(q, k, v).backward(d_out)
        torch.testing.assert_close(got, q.grad, rtol=1e-4, atol=1e-4)
        benchmark.group = f"train attention fwd+bwd, {HQ}/{HKV} heads x {D}, n {n}, {threads} thread(s)"
        benchmark.extra_info["role"] = "baseline" if impl == "sdpa" else "candidate"
        benchmark.pedantic(step, rounds=30, warmup_rounds=3)
    finally:
        torch.set_num_threads(before)
