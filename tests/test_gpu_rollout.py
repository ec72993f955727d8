"""The rollout engine on a GPU against the CPU, and sampling log-probs against training's (marker `gpu`).

1. Greedy tokens, GPU (fp32 and bf16) vs CPU fp32, tiny Qwen2.5-VL (helpers_rollout), free-running episodes
   with media. A random model has near-ties, and bf16 rounds its logits, so "the same tokens" is checked as
   what greedy decoding promises: every token the GPU engine picked is an argmax of the CPU fp32 model's
   logits (teacher-forced along the GPU's own episode, suppressed ids excluded), up to the logit error of that
   dtype on the GPU. That error is measured, not assumed: the same teacher-forced logits from the GPU model in
   that dtype, against the CPU fp32 ones; the bound is 2x it per side (flash-attention's "2x the error of
   the plain implementation in the same dtype"). In fp32 (TF32 off) the token ids must also equal the CPU
   engine's, unless the first difference is such a near-tie.
2. Sampling log-probs (what the engine recorded while sampling, bf16 model on the GPU) vs training's
   teacher-forced log-probs (training/logprobs.py) of the same episodes and weights: against a float64 copy
   of the model, the engine's error must be within 2x training's own bf16 error (+1e-3).
Needs a CUDA device and PyAV (the env decodes the videos; `make gpu-carry` carries its wheel and a pre-made
dataset, since the lent GPU machines have neither). Otherwise each test skips with the reason.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from helpers_rollout import env_factory, make_data, make_tiny, teacher_logits

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
CARRIED_DATA = ROOT / ".gpu-carry" / "rollout_data"
ROUNDS, NEW, PROMPTS = 3, 24, 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if importlib.util.find_spec("av") is None:
        pytest.skip("PyAV not installed: the env cannot decode the videos (make gpu-carry carries its wheel)")
    data = CARRIED_DATA if (CARRIED_DATA / "grpo.json").exists() else tmp_path_factory.mktemp("gpu_data")
    try:
        path = make_tiny(tmp_path_factory.mktemp("gpu_tiny"))
    except ImportError as e:   # transformers' Qwen2-VL video processor imports torchvision
        pytest.skip(f"cannot build the tiny model's processor here: {e}")
    return path, make_data(data)[:PROMPTS]


@pytest.fixture
def exact_fp32():
    """TF32 off (cuDNN's default is on: the vision tower's Conv3d would round its inputs to 10 bits)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _engine(model, proc):
    from videocom_fast.rollout import RolloutEngine
    return RolloutEngine(model, proc, env_factory=env_factory(), max_rounds=ROUNDS, max_new_tokens=NEW,
                         kv_budget_tokens=16384)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_engine_greedy_tokens_gpu_vs_cpu(tiny, exact_fp32, dtype):
    from videocom_fast.models import load

    path, samples = tiny
    cpu_model, proc = load(path, dtype=torch.float32)
    gpu_model, _ = load(path, dtype=dtype, device="cuda")
    cpu_eng, gpu_eng = _engine(cpu_model, proc), _engine(gpu_model, proc)
    want = [g[0] for g in cpu_eng.generate(samples, num_generations=1, greedy=True)]
    got = [g[0] for g in gpu_eng.generate(samples, num_generations=1, greedy=True)]
    suppress = cpu_eng.suppress_ids.cpu()
    assert sum(t.num_generated for t in got) > 0
    for w, g in zip(want, got):
        first_gen = g.generated_mask.index(True)
        assert g.token_ids[:first_gen] == w.token_ids[:first_gen], "prompts differ"
        ref = teacher_logits(cpu_model, g, suppress)                 # CPU fp32 along the GPU's episode
        err = (teacher_logits(gpu_model, g, suppress) - ref).nan_to_num(posinf=0, neginf=0).abs().max()
        tol = 2 * 2 * float(err) + 1e-6                              # 2x the dtype's error, on both logits
        gen = torch.as_tensor([t for t, m in zip(g.token_ids, g.generated_mask) if m])
        margin = ref.max(-1).values - ref.gather(1, gen[:, None])[:, 0]
        assert margin.max() <= tol, (f"sample {g.sample_index}: the GPU picked a token {margin.max():.3g} below "
                                     f"the CPU's best (allowed {tol:.3g}, measured {dtype} error {err:.3g})")
        if dtype == torch.float32 and g.token_ids != w.token_ids:
            k = next(i for i, (a, b) in enumerate(zip(g.token_ids, w.token_ids)) if a != b)
            assert g.generated_mask[k], f"sample {g.sample_index}: episodes differ at env token {k}"
            n = sum(g.generated_mask[:k])                            # row of token k in `ref`
            top2 = ref[n].topk(2).values
            assert top2[0] - top2[1] <= tol, (f"sample {g.sample_index}: GPU fp32 left the CPU's greedy path at "
                                              f"token {k} without a near-tie (gap {top2[0] - top2[1]:.3g})")


def test_sampling_logprobs_equal_training_logprobs_bf16(tiny):
    from videocom_fast.models import load
    from videocom_fast.training.logprobs import sampling_logprobs, trajectory_logprobs

    path, samples = tiny
    model, proc = load(path, dtype=torch.bfloat16, device="cuda")
    model64, _ = load(path, dtype=torch.float64, device="cuda")
    groups = _engine(model, proc).generate(samples, num_generations=2, temperature=0.9, top_k=0, top_p=1.0,
                                           seed=int(torch.randint(1 << 30, ()).item()))
    trajs = [t for g in groups for t in g]
    assert sum(t.num_generated for t in trajs) > 0
    with torch.no_grad():
        samp = torch.cat([sampling_logprobs(t) for t in trajs])
        train = torch.cat([trajectory_logprobs(model, t, temperature=0.9).float().cpu() for t in trajs])
        ref = torch.cat([trajectory_logprobs(model64, t, temperature=0.9, backend="torch").double().cpu()
                         for t in trajs])
    e_samp, e_train = (samp.double() - ref).abs(), (train.double() - ref).abs()
    assert e_samp.max() <= 2 * e_train.max() + 1e-3, (e_samp.max(), e_train.max())
    assert e_samp.mean() <= 2 * e_train.mean() + 1e-3, (e_samp.mean(), e_train.mean())


def test_cuda_graph_decodes_equal_eager_decodes(tiny, exact_fp32):
    """CUDA graphs (decode_graphs.cuda_capture) on the real device: a sampled generate with CUDA_GRAPHS equals
    the same engine without them (padded decodes both times, Triton attention, fp32), token for token."""
    from videocom_fast.models import load
    from videocom_fast.rollout import RolloutEngine

    class Padded(RolloutEngine):
        PAD_DECODES = True

    class Graphed(RolloutEngine):
        CUDA_GRAPHS = True

    path, samples = tiny
    model, proc = load(path, dtype=torch.float32, device="cuda")
    out = {}
    for cls in (Padded, Graphed):
        eng = cls(model, proc, env_factory=env_factory(), max_rounds=ROUNDS, max_new_tokens=NEW,
                  kv_budget_tokens=16384, attention="triton")
        out[cls] = eng.generate(samples, num_generations=4, temperature=0.9, top_k=20, seed=5)
    assert eng.stats["cuda_graphs"] == "on" and eng.stats["graph_steps"] > 10, eng.stats
    for ga, gb in zip(out[Padded], out[Graphed]):
        for a, b in zip(ga, gb):
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=0, atol=1e-4)
