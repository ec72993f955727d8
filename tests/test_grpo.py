"""The GRPO trainer on the real rollout engine and a tiny Qwen2.5-VL: the update moves probability toward
rewarded episodes (scripted through the engine's forced-rounds hook), micro-batching gives the same
gradients as one batch for every loss type, resume continues exactly, a LoRA policy's reference is its base
weights, and 2 processes (DeepSpeed ZeRO-2 and ZeRO-3, gloo) run a step end to end."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from videocom_fast.chat import ChatTokens
from videocom_fast.training.config import load_config
from videocom_fast.training.grpo import (GRPOConfig, _check_config, load_grpo_samples, micro_batches, policy_update,
                                         step_prompts,
                                         train_step)
from videocom_fast.training.logprobs import media_embeds, trajectory_logprobs

REPO = Path(__file__).resolve().parents[1]
MEDIA = dict(main_nframes=4, rewatch_nframes=4, video_min_pixels=3136, video_max_pixels=6272,
             image_min_pixels=784, image_max_pixels=3136)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from videocom_fast.data import synthesize
    from videocom_fast.env import MediaConfig
    from videocom_fast.models import build_tiny
    root = tmp_path_factory.mktemp("grpo")
    paths = synthesize(root / "data", num_samples=3, seed=1, seconds=(10, 12), media_config=MediaConfig(**MEDIA))
    return SimpleNamespace(root=root, grpo=paths["grpo"], model=str(build_tiny(root / "tiny", seed=0)))


def _models(world):
    from videocom_fast.models import load
    from videocom_fast.modeling import inner
    from videocom_fast.training.packing import install_packed_attention
    policy, proc = load(world.model, dtype=torch.float32)
    install_packed_attention(policy)          # as the trainer does: micro-batches run as one packed forward
    for p in inner(policy).visual.parameters():
        p.requires_grad_(False)
    ref = copy.deepcopy(policy).eval()
    return policy, ref, proc


def _scripted_engine(policy, proc, sample, G):
    """Rollouts 0..G/2-1 answer correctly in one round, the others answer wrongly (scripted tokens)."""
    from videocom_fast.env import MediaConfig
    from videocom_fast.rollout import RolloutEngine
    chat = ChatTokens(proc.tokenizer)
    gold = sample["answer"]
    wrong = next(c for c in "ABCD" if c != gold)
    good = chat.assistant(f"FINAL_ANSWER: {gold}. it")[:-len(chat.newline)]
    bad = chat.assistant(f"FINAL_ANSWER: {wrong}. it")[:-len(chat.newline)]
    return RolloutEngine(policy, proc, max_rounds=2, max_new_tokens=16, media_config=MediaConfig(**MEDIA),
                         forced_rounds=lambda si, ri, k: (good if ri < G // 2 else bad) if k == 0 else None)


def test_update_moves_probability_toward_rewarded_episodes(world):
    from videocom_fast.modeling import inner
    policy, ref, proc = _models(world)
    samples = load_grpo_samples(world.grpo, limit=1)
    G = 4
    # lr 1e-3: at 3e-3 Adam's 2nd and 3rd steps overshoot on this tiny random model (measured with the
    # character-only questions: the first step moved the answer letters the right way, three reversed them)
    cfg = GRPOConfig(num_generations=G, prompts_per_step=1, micro_batch=3, lr=1e-3, beta=0.04, temperature=1.0,
                     max_rounds=2, max_new_tokens=16, media=MEDIA)
    engine = _scripted_engine(policy, proc, samples[0], G)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    dist = SimpleNamespace(rank=0, world_size=1)
    vis0 = [p.detach().clone() for p in inner(policy).visual.parameters()]
    llm0 = [p.detach().clone() for p in inner(policy).language_model.parameters()]
    trajs = [t for g in engine.generate(samples, num_generations=G, seed=0) for t in g]

    def answer_lp(i):
        with torch.no_grad():
            return trajectory_logprobs(policy, trajs[i], temperature=1.0)

    gens = [[t for t, m in zip(trajs[i].token_ids, trajs[i].generated_mask) if m] for i in (0, G - 1)]
    letter = next(k for k, (a, b) in enumerate(zip(*gens)) if a != b)     # the answer letter: same context
    lp0 = [answer_lp(0), answer_lp(G - 1)]
    recs = [train_step(s, policy, ref, engine, opt, sched, None, samples, cfg, dist) for s in range(3)]
    lp1 = [answer_lp(0), answer_lp(G - 1)]
    before, after = [float(x.sum()) for x in lp0], [float(x.sum()) for x in lp1]
    assert all(r["reward/accuracy/mean"] == pytest.approx(0.5) for r in recs)     # the script, scored
    assert all(r["advantage/abs_max"] > 0.5 for r in recs) and recs[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert recs[-1]["kl"] > 0                                                      # policy left the reference
    assert after[0] > before[0] + 0.1 and after[1] < before[1] - 0.1, (before, after)
    assert lp1[0][letter] > lp0[0][letter] + 0.1 and lp1[1][letter] < lp0[1][letter] - 0.1   # gold up, wrong down
    assert all(torch.equal(a, b) for a, b in zip(vis0, inner(policy).visual.parameters()))   # frozen tower
    assert sum(not torch.equal(a, b) for a, b in zip(llm0, inner(policy).language_model.parameters())) > len(llm0) // 2


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_give_the_whole_batch_gradient(world, loss_type):
    policy, ref, proc = _models(world)
    samples = load_grpo_samples(world.grpo, limit=1)
    from videocom_fast.env import MediaConfig
    from videocom_fast.rollout import RolloutEngine
    engine = RolloutEngine(policy, proc, max_rounds=2, max_new_tokens=12, media_config=MediaConfig(**MEDIA))
    trajs = [t for g in engine.generate(samples, num_generations=5, seed=3) for t in g]
    adv = torch.randn(5)
    with torch.no_grad():
        embeds = [media_embeds(policy, t, torch.as_tensor(t.token_ids)) for t in trajs]
        ref_lps = [trajectory_logprobs(ref, t, temperature=0.9, embeds=e) for t, e in zip(trajs, embeds)]
        # a perturbed "old policy" so ratios differ from 1 and clipping is exercised
        old_lps = [r + 0.3 * torch.randn_like(r) for r in ref_lps]
    grads = []
    lens = sorted(len(t.token_ids) for t in trajs)
    # by episodes (5, 2, 1 per forward), then by a token budget that splits 5 episodes unevenly (2-3 + rest)
    for mb, tokens in ((5, 0), (2, 0), (1, 0), (5, lens[0] + lens[1] + 1)):
        cfg = GRPOConfig(loss_type=loss_type, micro_batch=mb, micro_batch_tokens=tokens, temperature=0.9,
                         max_rounds=2, max_new_tokens=12)
        if tokens:
            assert 1 < len(micro_batches(trajs, mb, tokens)) < 5
        policy.zero_grad(set_to_none=True)
        stats = policy_update(policy, trajs, adv, embeds, ref_lps, old_lps, cfg)
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]))
        assert stats["clip_ratio/region"] > 0
    assert grads[0].abs().sum() > 0
    for g in grads[1:]:
        assert torch.allclose(g, grads[0], atol=1e-6, rtol=1e-4)


def test_step_prompts_are_disjoint_per_step_and_cover_epochs():
    n, per, world = 10, 3, 2
    seen = []
    for step in range(5):
        a = step_prompts(n, step, per, 0, world, seed=4)
        b = step_prompts(n, step, per, 1, world, seed=4)
        assert len(set(a) | set(b)) == len(a) + len(b) or step * per * world // n != ((step + 1) * per * world - 1) // n
        seen += a + b
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n:2 * n]) == list(range(n))
    assert step_prompts(n, 3, per, 1, world, seed=4) == step_prompts(n, 3, per, 1, world, seed=4)


def test_micro_batches_by_tokens_split_as_documented():
    ep = lambda n: SimpleNamespace(token_ids=[0] * n)  # noqa: E731
    trajs = [ep(n) for n in (300, 500, 250, 900, 100, 100, 100)]
    # greedy in order: a micro-batch closes when the next episode would pass the budget ...
    assert micro_batches(trajs, 8, 1000) == [[0, 1], [2], [3, 4], [5, 6]]
    # ... an episode longer than the budget goes alone, never dropped ...
    assert micro_batches(trajs, 8, 400) == [[0], [1], [2], [3], [4, 5, 6]]
    # ... each pack is also cut at `micro_batch` episodes; 0 tokens = by episodes only
    assert micro_batches(trajs, 2, 1000) == [[0, 1], [2], [3, 4], [5, 6]]
    assert micro_batches(trajs, 3, 0) == [[0, 1, 2], [3, 4, 5], [6]]
    # data parallel: the longest micro-batches are halved until every rank runs the same count
    assert micro_batches(trajs, 8, 1000, min_count=6) == [[0], [1], [2], [3], [4], [5, 6]]
    assert len(micro_batches(trajs, 8, 1000, min_count=99)) == 7
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        _check_config(GRPOConfig(micro_batch_tokens=-1))


def test_7b_config_is_the_memory_plan():
    cfg = load_config(GRPOConfig, REPO / "configs/grpo_7b.yaml")
    _check_config(cfg)
    assert cfg.lora["r"] == 64 and cfg.ref_model == "auto" and cfg.gradient_checkpointing
    assert cfg.dtype == "bfloat16" and cfg.micro_batch_tokens == 16384 and cfg.freeze_vision
    doc = (REPO / "docs/memory_7b.md").read_text()
    assert "16384" in doc and "r = 64" in doc and "adapter disabled" in doc
    # the trainer's defaults follow the plan where it does not change the method's math
    d = GRPOConfig()
    assert d.gradient_checkpointing and d.micro_batch_tokens == cfg.micro_batch_tokens


def test_config_file_overrides_and_checks():
    cfg = load_config(GRPOConfig, REPO / "configs/grpo_tiny.yaml", ["loss_type=dapo", "media.main_nframes=4"])
    # media not in grpo_tiny.yaml: the rest comes from the model's media.json (test_contract.py)
    assert cfg.loss_type == "dapo" and cfg.media == {"main_nframes": 4}
    _check_config(cfg)
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(GRPOConfig, None, ["lossy=1"])
    with pytest.raises(ValueError, match="loss_type"):
        _check_config(GRPOConfig(loss_type="ppo"))
    with pytest.raises(ValueError, match="num_generations"):
        _check_config(GRPOConfig(num_generations=0))
    with pytest.raises(ValueError, match="adapter_off"):
        _check_config(GRPOConfig(ref_model="adapter_off"))
    with pytest.raises(ValueError, match="data"):
        load_grpo_samples("/nonexistent/grpo.json")


# --- whole runs --------------------------------------------------------------------------------------

REWARD_MODULE = '''
def reward(completions, samples, weights=None, reward_compat="fixed"):
    """A dense stand-in reward (the tiny random model never answers): share of distinct characters."""
    total = [len(set(c)) / (1.0 + len(c)) for c in completions]
    return total, {"distinct": total}
'''


def _run_cfg(world, out, **kw):
    base = dict(model=world.model, data=world.grpo, output_dir=str(out), media=MEDIA, max_steps=3,
                prompts_per_step=1, num_generations=4, max_rounds=2, max_new_tokens=12, lr=1e-3, save_every=1,
                keep_last=0, tensorboard=False, progress=False, reward_fn="grpo_test_reward:reward", dtype="float32")
    base.update(kw)
    return GRPOConfig(**base)


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "grpo_test_reward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.slow
def test_resume_continues_exactly(world, tmp_path, reward_module):
    import shutil

    from videocom_fast.training.grpo import run_grpo
    from videocom_fast.training.metrics import read_metrics
    out = tmp_path / "run"
    first = run_grpo(_run_cfg(world, out))
    assert len(first["steps"]) == 3 and any(r["advantage/abs_max"] > 0 for r in first["history"])
    final = torch.load(out / "checkpoint-0000003" / "model_state.pt")
    init = torch.load(out / "checkpoint-0000001" / "model_state.pt")
    shutil.rmtree(out / "checkpoint-0000003")               # as if killed during step 3
    second = run_grpo(_run_cfg(world, out, resume=True))
    assert second["steps"] == [3]
    assert second["history"][0]["reward/mean"] == first["history"][2]["reward/mean"]
    assert second["history"][0]["loss"] == first["history"][2]["loss"]
    again = torch.load(out / "checkpoint-0000003" / "model_state.pt")
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert any(not torch.equal(final[k], init[k]) for k in final)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]             # the killed run's step-3 row rewound, logged once


def test_lora_reference_is_the_base_model_with_the_adapter_off(world, tmp_path):
    """ref_model "auto" with LoRA: no frozen copy; the reference forward is the policy with its adapter disabled,
    i.e. exactly the base weights, while the policy itself (adapter on) differs from them."""
    pytest.importorskip("peft")
    from videocom_fast.models import load
    from videocom_fast.training.grpo import build_models, reference_weights
    cfg = _run_cfg(world, tmp_path / "lora", lora={"r": 4, "alpha": 8})
    policy, ref, _ = build_models(cfg, "cpu")
    assert ref is None
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:                   # peft starts B at zero: make the adapter do something
                p.normal_(0, 0.5)
    base, proc = load(world.model, dtype=torch.float32)
    ids = torch.randint(0, 200, (1, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = base(input_ids=ids).logits
        with reference_weights(policy, ref) as m:
            got = m(input_ids=ids).logits
        adapted = policy(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (adapted - want).abs().max() > 1e-3
    with pytest.raises(ValueError, match="adapter_off"):
        _check_config(_run_cfg(world, tmp_path / "x", ref_model="adapter_off"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_deepspeed_zero(world, tmp_path, reward_module, stage):
    pytest.importorskip("deepspeed")
    ds = tmp_path / f"zero{stage}.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": stage}, "bf16": {"enabled": False}}))
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29611 + stage),
           "-m", "videocom_fast.training.grpo", f"model={world.model}", f"data={world.grpo}", f"output_dir={out}",
           f"media={json.dumps(MEDIA)}", "max_steps=1", "prompts_per_step=1", "num_generations=4", "max_rounds=2",
           "max_new_tokens=12", "lr=1e-3", "micro_batch=2", "tensorboard=false", "progress=false",
           "reward_fn=grpo_test_reward:reward", f"deepspeed={ds}", "save_final=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["episodes"] == 8 and rec["step"] == 1                # 2 ranks x 1 prompt x G=4
    assert rec["grad_norm"] > 0 and torch.isfinite(torch.tensor(rec["loss"]))
    assert (out / "checkpoint-0000001" / "COMPLETE").is_file()
