"""Peak memory and time of GRPO's per-token log-probs: chunked (training/logprobs.py) vs full logits.

    .venv/bin/pytest bench/bench_logprobs.py --benchmark-only -s

The naive path (tests/test_logprobs.py `full_logits_logprobs`, what a plain `model(...).logits` +
log_softmax does) holds the whole (N, V) fp32 logits, their log-softmax and, in backward, their gradient.
The chunked path keeps at most (chunk, V) of each alive, forward and backward (checkpointed chunks).
Peak memory is measured in a fresh subprocess per variant as the growth of the sampled current RSS over the
RSS after setup, so the numbers are the allocator's real high-water marks. Sizes: N generated tokens = 1024,
hidden 256, vocabulary 32000 (Qwen2.5-VL's is 152k: the ratio grows with V). Machine: 2-core CPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_logprobs import full_logits_logprobs  # noqa: E402

from videocom_fast.training.logprobs import chunked_logprobs  # noqa: E402

N, D, V, CHUNK = 1024, 256, 32000, 256

_CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from test_logprobs import full_logits_logprobs
from videocom_fast.training.logprobs import chunked_logprobs
variant, N, D, V, CHUNK = sys.argv[2], *map(int, sys.argv[3:7])
torch.manual_seed(0)
class M(torch.nn.Module):
    def __init__(s):
        super().__init__(); s.lm_head = torch.nn.Linear(D, V, bias=False)
m = M()
h = torch.randn(N, D, requires_grad=True); t = torch.randint(0, V, (N,)); w = torch.randn(N)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4
torch.ones(1).sum()
# NOTE: ru_maxrss keeps the import-time high-water mark, which can exceed the computation's; sample the
# current RSS (large tensors are mmapped, see MALLOC_MMAP_THRESHOLD_) every 0.5 ms instead.
import threading, time
base, peak, done = rss(), [0], threading.Event()
def _poll():
    while not done.is_set():
        peak[0] = max(peak[0], rss()); time.sleep(0.0005)
poller = threading.Thread(target=_poll); poller.start()
if variant == "full":
    (full_logits_logprobs(m, h, t, 0.9) * w).sum().backward()
elif variant == "chunked":
    (chunked_logprobs(m, h, t, temperature=0.9, chunk=CHUNK) * w).sum().backward()
elif variant == "chunked_nograd":
    with torch.no_grad(): chunked_logprobs(m, h, t, temperature=0.9, chunk=CHUNK)
elif variant == "full_nograd":
    with torch.no_grad(): full_logits_logprobs(m, h, t, 0.9)
peak[0] = max(peak[0], rss()); done.set(); poller.join()
print(json.dumps({"peak_extra_mb": (peak[0] - base) / 1024}))
"""


def _peak_mb(variant: str) -> float:
    # a fixed mmap threshold: glibc's adaptive one would serve freed 32 MB chunks from a growing heap, and the
    # RSS would then measure fragmentation instead of the live tensors' high-water mark
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), MALLOC_MMAP_THRESHOLD_="131072")
    res = subprocess.run([sys.executable, "-c", _CHILD, os.path.join(os.path.dirname(__file__), "..", "tests"),
                          variant, str(N), str(D), str(V), str(CHUNK)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_mb"]


def test_peak_memory_table(benchmark):
    rows = {v: _peak_mb(v) for v in ("full", "chunked", "full_nograd", "chunked_nograd")}
    logits_mb = N * V * 4 / 2**20
    print(f"\nlog-probs of N={N} tokens, V={V} (fp32 logits {logits_mb:.0f} MB), chunk={CHUNK}, 2-core CPU")
    print(f"{'variant':18} {'peak extra MB':>14} {'vs full':>8}")
    for v, mb in rows.items():
        ref = rows["full"] if not v.endswith("nograd") else rows["full_nograd"]
        print(f"{v:18} {mb:14.1f} {ref / max(mb, 1e-9):7.1f}x")
    benchmark.extra_info.update({f"peak_mb_{k}": v for k, v in rows.items()})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert rows["chunked"] < rows["full"]


def _inputs():
    torch.manual_seed(0)
    head = torch.nn.Module()
    head.lm_head = torch.nn.Linear(D, V, bias=False)
    return head, torch.randn(N, D, requires_grad=True), torch.randint(0, V, (N,)), torch.randn(N)


@pytest.mark.benchmark(group="logprobs_fwd_bwd")
def test_full_logits_fwd_bwd(benchmark):
    m, h, t, w = _inputs()
    benchmark.extra_info["role"] = "baseline"
    benchmark.pedantic(lambda: (full_logits_logprobs(m, h, t, 0.9) * w).sum().backward(), rounds=2, iterations=1)


@pytest.mark.benchmark(group="logprobs_fwd_bwd")
def test_chunked_fwd_bwd(benchmark):
    m, h, t, w = _inputs()
    benchmark.pedantic(lambda: (chunked_logprobs(m, h, t, temperature=0.9, chunk=CHUNK) * w).sum().backward(),
                       rounds=2, iterations=1)
