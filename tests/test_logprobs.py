"""Log-probs for GRPO: the Triton fused log-softmax-gather (under TRITON_INTERPRET=1) against fp64 torch,
chunked log-probs against the naive full-logits path (values and gradients), and the teacher-forced
episode forward against the model's own forward (transformers, original-rule M-RoPE) on a multi-turn
episode with a video and images; once the rollout engine exists, against its sampling log-probs."""
import os
import subprocess
import sys

import pytest
import torch

from videocom_fast import modeling
from videocom_fast.chat import ChatTokens
from videocom_fast.kernels import logprobs as klp
from videocom_fast.mrope import install_original_rope_index, mm_token_type_ids, sequence_positions
from videocom_fast.training.logprobs import (batch_logprobs, block_kinds, chunked_logprobs, generated_index,
                                             sampling_logprobs, trajectory_logprobs)

BF16_ULP = 2.0 ** -7   # relative spacing of bf16; the interpreter truncates fp32 -> bf16 (FACTS.md): 1 ulp


@pytest.fixture
def interpret():
    """Triton reads TRITON_INTERPRET when it is imported (its own tl.max/tl.sum are jitted then), so these
    tests run only in a process started with it; `test_triton_kernels_in_interpreter` starts one."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 at process start (run by test_triton_kernels_in_interpreter)")


@pytest.mark.slow
def test_triton_kernels_in_interpreter():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("already interpreting: the triton tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton_",
                          "-m", "not slow"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout.split("\n")[-2], res.stdout[-800:]


# --- the kernel ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("N,V", [(1, 1), (5, 641), (37, 1025), (97, 2049)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_logprobs_match_fp64(interpret, N, V, dtype):
    g = torch.Generator().manual_seed(N * 7 + V)
    logits = (torch.randn(N, V, generator=g, dtype=torch.float64) * 4).to(dtype)
    target = torch.randint(0, V, (N,), generator=g)
    T = 0.9
    x = logits.clone().requires_grad_(True)
    ours = klp.token_logprobs_triton(x, target, T)
    gout = torch.randn(N, generator=g)
    (dx,) = torch.autograd.grad(ours, x, gout)
    x64 = logits.double().requires_grad_(True)
    ref = (x64 / T).log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)
    (dx64,) = torch.autograd.grad(ref, x64, gout.double())
    assert ours.dtype == torch.float32 and dx.dtype == dtype
    # forward math is fp32 on both dtypes (bf16 only rounds the inputs, and ref sees the same rounded inputs)
    assert torch.allclose(ours.double(), ref, atol=2e-5, rtol=0)
    if dtype == torch.float32:
        # |grad| reaches |g|/T ~ 4 here, where an fp32 ulp is ~5e-7; exp(x - lse) carries a few ulps
        assert torch.allclose(dx.double(), dx64, atol=1e-5, rtol=0)
    else:   # the gradient is stored in bf16: within 1 ulp (truncation) of the exact value
        err = (dx.double() - dx64).abs()
        assert (err <= BF16_ULP * dx64.abs() + 1e-6).all(), float(err.max())
    # and no worse than the plain torch path in the same dtype (flash-attention's rule), up to 1 ulp
    xt = logits.clone().requires_grad_(True)
    (dxt,) = torch.autograd.grad(klp.token_logprobs_torch(xt, target, T), xt, gout)
    assert (dx.double() - dx64).abs().max() <= 2 * (dxt.double() - dx64).abs().max() + BF16_ULP * dx64.abs().max()


def test_triton_handles_strided_rows(interpret):
    base = torch.randn(12, 900)
    logits = base[::2, 50:750]                     # row stride 1800, non-contiguous view
    target = torch.randint(0, 700, (6,))
    assert torch.allclose(klp.token_logprobs_triton(logits, target, 1.3),
                          klp.token_logprobs_torch(logits, target, 1.3), atol=1e-5)


def test_dispatch_and_bad_inputs(monkeypatch):
    x = torch.randn(3, 11)
    monkeypatch.delenv("VIDEOCOM_BACKEND", raising=False)
    assert klp.pick_backend(x) == "torch"                       # CPU tensors: torch reference
    assert klp.pick_backend(x, "triton") == "triton"
    monkeypatch.setenv("VIDEOCOM_BACKEND", "triton")
    assert klp.pick_backend(x) == "triton"
    with pytest.raises(ValueError, match="logits_NV"):
        klp.token_logprobs(x[0], torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="target_N"):
        klp.token_logprobs(x, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="target_N ids"):
        klp.token_logprobs(x, torch.tensor([0, 11, 2]))
    with pytest.raises(ValueError, match="temperature"):
        klp.token_logprobs(x, torch.zeros(3, dtype=torch.long), 0.0)


# --- chunking -----------------------------------------------------------------------------------------


def full_logits_logprobs(model, hidden_ND, target_N, temperature=1.0):
    """The naive path (the baseline of bench/bench_logprobs.py): all (N, V) logits, then log-softmax."""
    logits_NV = model.lm_head(hidden_ND).float() / temperature
    return logits_NV.log_softmax(-1).gather(-1, target_N[:, None]).squeeze(-1)


class _Head(torch.nn.Module):
    def __init__(self, D, V):
        super().__init__()
        self.lm_head = torch.nn.Linear(D, V, bias=False)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_equals_full_logits_with_grads(chunk):
    torch.manual_seed(chunk)
    model = _Head(24, 331).double()
    hidden = torch.randn(53, 24, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 331, (53,))
    w = torch.randn(53, dtype=torch.float64)
    ours = chunked_logprobs(model, hidden, target, temperature=0.8, chunk=chunk)
    (ours.double() * w).sum().backward()
    gh, gw = hidden.grad.clone(), model.lm_head.weight.grad.clone()
    hidden.grad = None
    model.lm_head.weight.grad = None
    full = full_logits_logprobs(model, hidden, target, 0.8)
    (full * w).sum().backward()
    assert ours.dtype == torch.float32
    assert torch.allclose(ours.double(), full.double(), atol=1e-5)
    assert torch.allclose(gh, hidden.grad, atol=1e-5) and torch.allclose(gw, model.lm_head.weight.grad, atol=1e-5)
    with pytest.raises(ValueError, match="chunk"):
        chunked_logprobs(model, hidden, target, chunk=0)


# --- the episode forward ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from videocom_fast.models import build_tiny, load
    model, proc = load(build_tiny(tmp_path_factory.mktemp("tiny")), dtype=torch.float64)
    install_original_rope_index(model)
    return model, proc


def hand_episode(proc, seed=0, sgt=0.5):
    """A 3-round episode (video prompt, FIND_FRAME -> image, SPATIAL_ZOOM -> 2 images, answer) built with
    ChatTokens exactly as the engine lays it out; generated tokens are the round texts + their <|im_end|>."""
    from videocom_fast.rollout.trajectory import Trajectory
    g = torch.Generator().manual_seed(seed)
    chat = ChatTokens(proc.tokenizer)
    vid = proc.video_processor(videos=[torch.randint(0, 256, (4, 3, 56, 84), dtype=torch.uint8, generator=g)],
                               min_pixels=28 * 28, max_pixels=56 * 84, return_tensors="pt", do_sample_frames=False)
    imgs = proc.image_processor(images=[torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
                                        for h, w in ((60, 90), (30, 40), (57, 29))],
                                min_pixels=28 * 28, max_pixels=56 * 84, return_tensors="pt")
    n_img = [int(t.prod()) // 4 for t in imgs["image_grid_thw"]]
    ids = chat.prompt("Which color is the square? Options: A. red, B. blue", [("video", int(vid["video_grid_thw"][0].prod()) // 4)])
    gen = [False] * len(ids)
    rounds = ["I need a closer look. FIND_FRAME(the square) = [3]", "SPATIAL_ZOOM(square) = [0, 0, 28, 28]",
              "FINAL_ANSWER: B. blue"]
    obs = [("Continue solving the question with the selected frame.", [("image", n_img[0])]),
           ("Continue solving the question by focusing on the zoomed region.", [("image", n_img[1]), ("image", n_img[2])])]
    spans = []
    for k, text in enumerate(rounds):
        r = chat.assistant(text)[:-len(chat.newline)]          # content + <|im_end|> (sampled)
        spans.append((len(ids), len(ids) + len(r)))
        ids, gen = ids + r, gen + [True] * len(r)
        if k < len(obs):
            o = chat.observation(*obs[k])
            ids, gen = ids + o, gen + [False] * len(o)
    ids_L = torch.tensor(ids)
    types = mm_token_type_ids(ids_L, chat.image_pad, chat.video_pad)
    sgt_t = torch.tensor([sgt], dtype=torch.float64)
    pos = sequence_positions(types, imgs["image_grid_thw"], vid["video_grid_thw"], sgt_t)
    traj = Trajectory(sample_index=0, rollout_index=seed, token_ids=ids, generated_mask=gen,
                      logprobs=[0.0] * len(ids), rounds=spans, round_texts=rounds, finish_reason="answer",
                      position_ids=pos, pixel_values=imgs["pixel_values"].double(),
                      image_grid_thw=imgs["image_grid_thw"], pixel_values_videos=vid["pixel_values_videos"].double(),
                      video_grid_thw=vid["video_grid_thw"], second_per_grid_ts=sgt_t)
    return traj, types


def model_forward_logprobs(model, traj, types, temperature):
    """Oracle: the transformers model's own forward over the episode (original-rule M-RoPE installed)."""
    ids = torch.tensor(traj.token_ids)
    logits = model(input_ids=ids[None], mm_token_type_ids=types[None], pixel_values=traj.pixel_values,
                   image_grid_thw=traj.image_grid_thw, pixel_values_videos=traj.pixel_values_videos,
                   video_grid_thw=traj.video_grid_thw, second_per_grid_ts=traj.second_per_grid_ts).logits[0]
    idx = generated_index(traj)
    return (logits[idx - 1].float() / temperature).log_softmax(-1).gather(-1, ids[idx, None]).squeeze(-1)


def test_episode_logprobs_equal_model_forward(tiny):
    model, proc = tiny
    traj, types = hand_episode(proc, seed=1)
    cfg = modeling.inner(model).config
    assert block_kinds(torch.tensor(traj.token_ids), cfg.image_token_id, cfg.video_token_id) == \
        ["video", "image", "image", "image"]
    with torch.no_grad():
        ours = trajectory_logprobs(model, traj, temperature=0.9, chunk=5)
        ref = model_forward_logprobs(model, traj, types, 0.9)
    assert ours.shape == (traj.num_generated,) and ours.dtype == torch.float32
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    # the observation turns carry no log-probs: the count is exactly the rounds' tokens
    assert ours.shape[0] == sum(e - s for s, e in traj.rounds)


def test_episode_logprobs_gradient_reaches_llm_not_frozen_vision(tiny):
    model, proc = tiny
    traj, _ = hand_episode(proc, seed=2)
    visual = modeling.inner(model).visual
    for p in visual.parameters():
        p.requires_grad_(False)
    try:
        model.zero_grad(set_to_none=True)
        lp = batch_logprobs(model, [traj], temperature=1.0, chunk=16)[0]
        lp.sum().backward()
        assert all(p.grad is None for p in visual.parameters())
        lm = modeling.lm_head(model).weight
        assert lm.grad is not None and lm.grad.abs().sum() > 0
        layer0 = next(modeling.inner(model).language_model.parameters())
        assert layer0.grad is not None and layer0.grad.abs().sum() > 0
    finally:
        for p in visual.parameters():
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)


def test_bad_trajectory_inputs(tiny):
    model, proc = tiny
    traj, _ = hand_episode(proc, seed=3)
    traj.generated_mask = traj.generated_mask[:-1]
    with pytest.raises(ValueError, match="generated_mask"):
        trajectory_logprobs(model, traj)
    traj, _ = hand_episode(proc, seed=3)
    traj.position_ids = traj.position_ids[:, :-1]
    with pytest.raises(ValueError, match="position_ids"):
        trajectory_logprobs(model, traj)
    traj, _ = hand_episode(proc, seed=3)
    traj.image_grid_thw = traj.image_grid_thw[:2]
    with pytest.raises(ValueError, match="image"):
        trajectory_logprobs(model, traj)


@pytest.mark.slow
def test_training_forward_equals_engine_sampling_logprobs(tmp_path):
    """The acceptance gate of trajectory.md: same weights, fp32, no top-k/top-p -> 1e-4. Also: one packed
    forward over several episodes and step-cached vision features give the same numbers."""
    from videocom_fast.data import synthesize
    from videocom_fast.env import MediaConfig
    from videocom_fast.models import build_tiny, load
    from videocom_fast.rollout import RolloutEngine
    from videocom_fast.training.grpo import load_grpo_samples
    from videocom_fast.training.logprobs import media_embeds, packed_attention_installed, packed_logprobs
    from videocom_fast.training.packing import install_packed_attention
    media = MediaConfig(main_nframes=4, rewatch_nframes=4, video_min_pixels=3136, video_max_pixels=6272,
                        image_min_pixels=784, image_max_pixels=3136)
    model, proc = load(build_tiny(tmp_path / "m", seed=3), dtype=torch.float32)
    paths = synthesize(tmp_path / "data", num_samples=3, seed=5, seconds=(10, 12), media_config=media)
    samples = load_grpo_samples(paths["grpo"])
    engine = RolloutEngine(model, proc, max_rounds=3, max_new_tokens=24, media_config=media)
    groups = engine.generate(samples, num_generations=3, temperature=0.9, top_k=0, top_p=1.0, seed=1)
    trajs = [t for grp in groups for t in grp]
    assert sum(t.num_generated for t in trajs) > 0
    with torch.no_grad():
        singles = [trajectory_logprobs(model, t, temperature=0.9) for t in trajs]
        for t, ours in zip(trajs, singles):
            assert torch.allclose(ours, sampling_logprobs(t), atol=1e-4, rtol=0), t.finish_reason
        install_packed_attention(model)
        assert packed_attention_installed(model)
        cache = {}
        embeds = [media_embeds(model, t, torch.as_tensor(t.token_ids), cache) for t in trajs]
        assert len(cache) < sum(len(e) for e in embeds)          # the group's main video is shared
        packed = packed_logprobs(model, trajs, temperature=0.9, chunk=50, embeds=embeds)
    for a, b in zip(packed, singles):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
