"""RA-GRPO trainer (spec section 6): rollouts from the engine, rewards, group advantages, clipped loss + k3 KL.

    videocom-fast grpo --config configs/grpo_tiny.yaml lr=1e-5 max_steps=20 [--resume]
    result = run_grpo(load_config(GRPOConfig, "configs/grpo_tiny.yaml"))   # dict: rewards per step, ...

One step (each rank does all of it for ITS share of the step's prompts; only gradients are reduced):
  prompts -> RolloutEngine.generate (G episodes per prompt, token in / token out) -> combined reward per
  episode (accuracy + reasoning, per component for logging) -> advantages (r - mean) / (std + 1e-4) per group
  -> reference (and, with num_iterations > 1, old-policy) log-probs, no grad -> `num_iterations` updates:
  per micro-batch of episodes, teacher-forced log-probs of exactly the generated tokens (training/logprobs.py)
  -> grpo_loss (training/grpo_loss.py) scaled so micro-batches and ranks add up to the whole step's loss ->
  backward -> clip -> AdamW -> cosine schedule.

Fixes against the reference trainer (spec section 7): M-RoPE positions in every forward (defect 1); the
loss reads the engine's token ids as they are, nothing is decoded and re-tokenized (defect 8); fp32
log-softmax and gradient clipping (defect 9); episodes end when they end, no dummy rounds (defect 10).
Reference model: a frozen copy of the initial policy, or, with LoRA, the same weights with the adapter
disabled (`ref_model: auto`). Checkpoints (training/checkpoint.py, shared with SFT) carry model, optimizer,
scheduler, RNG and the step; prompts and rollout seeds are pure functions of (seed, step, rank), so a resumed
run continues exactly (tests/test_grpo.py). DeepSpeed ZeRO-2/3 via `deepspeed: <json>` (ZeRO-3 gathers
the weights for rollouts).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from .checkpoint import latest_checkpoint, load_checkpoint
from .config import parse_cli, to_dict
from .distributed import all_reduce_max, all_reduce_sum, init_distributed
from .grpo_loss import LOSS_REDUCTIONS, grpo_loss, group_advantages, pad_rows
from .logprobs import media_embeds, packed_logprobs
from .metrics import MetricsLogger

# --- config ----------------------------------------------------------------------------------------


@dataclass
class GRPOConfig:
    model: str = "tiny"                 # a Qwen2.5-VL directory (e.g. an SFT output), or "tiny[:seed]"
    data: str = ""                      # GRPO JSON (synth.py grpo.json or Video-CoM format)
    media_root: str = ""                # base of relative video paths (default: the JSON's directory)
    max_samples: int = 0
    output_dir: str = "runs/grpo"
    media: dict = field(default_factory=dict)   # MediaConfig fields; unset ones: the model's media.json, else
                                                # the data's, else the method's (videocom_fast.contract)
    seed: int = 0
    max_steps: int = 20
    prompts_per_step: int = 2           # per rank
    num_generations: int = 8            # G
    num_iterations: int = 1             # updates per rollout batch (old-policy log-probs when > 1)
    micro_batch: int = 8                # at most this many episodes per forward/backward ...
    micro_batch_tokens: int = 16384     # ... and at most this many sequence tokens (0: no token cap); an
                                        # episode over the cap goes alone (docs/memory_7b.md)
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    max_rounds: int | None = None       # None: the model's recorded limits (media.json), else 5
    max_new_tokens: int | None = None   # None: the model's recorded limits (media.json), else 512
    max_batch_tokens: int = 4096
    loss_type: str = "grpo"             # grpo | dapo | dr_grpo
    beta: float = 0.04
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    scale_rewards: bool = True          # False: Dr. GRPO's unscaled advantages
    reward_weights: dict = field(default_factory=lambda: {"accuracy": 1.0, "reasoning": 1.0, "format": 0.0})
    reward_compat: str = "fixed"
    reward_fn: str = ""                 # "module:function" replacing the method's reward (same signature as
                                        # videocom_fast.rewards.combined_reward); "" = combined_reward
    lr: float = 1e-6
    weight_decay: float = 0.01
    adam_betas: tuple = (0.9, 0.999)
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    freeze_vision: bool = True
    freeze_merger: bool = True
    freeze_llm: bool = False
    lora: dict = field(default_factory=dict)
    ref_model: str = "auto"             # auto (LoRA: adapter off, else frozen copy) | copy | adapter_off
    gradient_checkpointing: bool = True     # activations of one layer per micro-batch (docs/memory_7b.md)
    dtype: str = "auto"
    device: str = "auto"
    logprob_chunk: int = 1024
    save_every: int = 0
    keep_last: int = 2
    save_final: bool = True
    resume: bool = False
    log_every: int = 1
    tensorboard: bool = True
    progress: bool = True
    deepspeed: str = ""
    num_threads: int = 0


def _check_config(cfg: GRPOConfig):
    if cfg.loss_type not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_type: expected one of {sorted(LOSS_REDUCTIONS)}, got {cfg.loss_type!r}")
    for name in ("max_steps", "prompts_per_step", "num_generations", "num_iterations", "micro_batch",
                 "max_rounds", "max_new_tokens"):
        v = getattr(cfg, name)
        if v is None and name in ("max_rounds", "max_new_tokens"):   # resolved from the contract later
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    v = cfg.micro_batch_tokens
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"micro_batch_tokens: expected an int >= 0 (0: no token cap), got {v!r}")
    if cfg.ref_model not in ("auto", "copy", "adapter_off"):
        raise ValueError(f"ref_model: expected auto, copy or adapter_off, got {cfg.ref_model!r}")
    if cfg.ref_model == "adapter_off" and not cfg.lora:
        raise ValueError("ref_model: 'adapter_off' needs a LoRA adapter (set lora)")


# --- data ------------------------------------------------------------------------------------------


def load_grpo_samples(path: str, media_root: str = "", limit: int = 0) -> list[dict]:
    """GRPO samples with absolute video paths (relative ones resolve against `media_root` or the JSON dir)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data: file {path!r} not found")
    samples = json.loads(p.read_text())
    if not isinstance(samples, list) or not samples:
        raise ValueError(f"data: {path!r} must hold a non-empty JSON list of samples")
    root = Path(media_root) if media_root else p.parent
    out = []
    for i, s in enumerate(samples[:limit] if limit > 0 else samples):
        if not isinstance(s, dict) or not isinstance(s.get("video"), str):
            raise ValueError(f"data: sample {i} of {path!r} has no 'video' path")
        s = dict(s)
        if not os.path.isabs(s["video"]):
            s["video"] = str(root / s["video"])
        if "://" not in s["video"] and not os.path.isfile(s["video"]):
            raise ValueError(f"data: {path!r}: sample {i} (id {s.get('id', '?')!r}): video {s['video']!r} "
                             f"does not exist")
        out.append(s)
    return out


def _is_tiny(model: str) -> bool:
    return model == "tiny" or model.startswith("tiny:")


def resolve_contract(cfg: GRPOConfig, out: Path, write: bool) -> GRPOConfig:
    """`cfg` with media and generation limits filled from the model's (else the data's) media.json where
    not set explicitly; checked against a resumed run's record; recorded in `out`."""
    from videocom_fast.contract import note, read_contract, resolve, write_contract

    model_dir = None if _is_tiny(cfg.model) else cfg.model
    media, gen, sources = resolve(model_dir, cfg.data, media=cfg.media,
                                  generation={"max_new_tokens": cfg.max_new_tokens, "max_rounds": cfg.max_rounds})
    cfg = dataclasses.replace(cfg, media=dataclasses.asdict(media), max_new_tokens=int(gen["max_new_tokens"]),
                              max_rounds=int(gen["max_rounds"]))
    if write:
        note(f"grpo: media from {sources['media']}; generation limits from {sources['generation']}")
    prev = read_contract(out) if cfg.resume else None
    if prev is not None and prev["media"] != cfg.media:
        raise ValueError(f"resume: {prev['path']} records media {prev['media']}, this run has {cfg.media}; "
                         f"resume with the same media settings")
    if write:
        write_contract(out, "grpo", media, generation={k: getattr(cfg, k) for k in (
            "max_new_tokens", "max_rounds", "temperature", "top_k", "top_p")})
    return cfg


def step_prompts(num_samples: int, step: int, per_rank: int, rank: int, world: int, seed: int) -> list[int]:
    """Sample indices for (step, rank): consecutive slices of per-epoch permutations (resumable, disjoint)."""
    glob = per_rank * world
    start = step * glob + rank * per_rank
    out = []
    for k in range(start, start + per_rank):
        epoch, pos = divmod(k, num_samples)
        perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))
        out.append(int(perm[pos]))
    return out


# --- models ----------------------------------------------------------------------------------------


def build_models(cfg: GRPOConfig, device):
    """(policy, reference or None, processor). The reference is built before LoRA so it stays the base."""
    from . import sft

    scfg = sft.SFTConfig(model=cfg.model, output_dir=cfg.output_dir, seed=cfg.seed, dtype=cfg.dtype,
                         freeze_vision=cfg.freeze_vision, freeze_merger=cfg.freeze_merger,
                         freeze_llm=cfg.freeze_llm, lora={}, gradient_checkpointing=False)
    policy, processor = sft.build_model(scfg, device)
    ref = None
    use_adapter_off = cfg.lora and cfg.ref_model in ("auto", "adapter_off")
    if cfg.beta != 0.0 and not use_adapter_off:
        ref = copy.deepcopy(policy).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    if cfg.lora:
        policy = sft._apply_lora(policy, cfg.lora)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy, ref, processor


@contextlib.contextmanager
def reference_weights(policy, ref):
    """Yields the model that computes reference log-probs: `ref`, or the policy with its adapter disabled."""
    if ref is not None:
        yield ref
    else:
        with policy.disable_adapter():
            yield policy


@contextlib.contextmanager
def _gathered(engine):
    """ZeRO-3 partitions weights; rollouts need them whole on each rank.

    While gathered, ZeRO-3's module hooks are taken off and put back after (as TRL's
    unwrap_model_for_generation does): they would fetch and prefetch parameters that are already whole, and
    a prefetch still in flight when the gather ends fails ("Cannot partition a param in flight", seen in CI).
    Without the hooks the rollout engine can also use its packed forward."""
    if engine is None or engine.zero_optimization_stage() != 3:
        yield
        return
    import deepspeed
    off = getattr(engine.optimizer, "parameter_offload", None) or engine.optimizer
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        if not hasattr(off, "forward_hooks"):
            yield
            return
        for p in params:
            p.ds_active_sub_modules.clear()
        for h in off.forward_hooks + off.backward_hooks:
            h.remove()
        off.forward_hooks, off.backward_hooks = [], []
        try:
            yield
        finally:
            coord = getattr(off, "param_coordinator", None)
            if coord is not None and not coord.is_invalid_trace():
                coord._invalidate_trace()   # the trace recorded before the rollout is stale now
            off._register_deepspeed_module(off.module)


# --- rewards and episode statistics -----------------------------------------------------------------


def score_episodes(trajs, samples, cfg: GRPOConfig):
    """(rewards (N,), {component: (N,)}) for episodes whose sample is `samples[t.sample_index]`."""
    from videocom_fast.env import MediaConfig

    fn = _reward_fn(cfg.reward_fn)
    kwargs = {"reward_compat": cfg.reward_compat}
    if not cfg.reward_fn:  # gold boxes are rescaled to the image limits the episodes were shown with
        m = MediaConfig(**cfg.media)
        kwargs["image_pixels"] = (m.image_min_pixels, m.image_max_pixels)
    total, parts = fn([t.completion_text for t in trajs], [samples[t.sample_index] for t in trajs],
                      cfg.reward_weights, **kwargs)
    return torch.tensor(total, dtype=torch.float32), {k: torch.tensor(v, dtype=torch.float32) for k, v in parts.items()}


def _reward_fn(spec: str):
    if not spec:
        from videocom_fast.rewards import combined_reward
        return combined_reward
    import importlib

    mod, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward_fn: cannot import {spec!r} ({e})") from None


def drop_failed_groups(trajs, group_size: int, step: int, dist) -> tuple[list, int]:
    """(episodes of the groups without a failed episode, number of episodes dropped), said on stderr.

    An episode the engine ended with "error: ..." (its sample's video unreadable, say) has no tokens to
    train on and no reward to compare; its whole group goes, since advantages need full groups. A step
    left with nothing, or any drop under data parallelism (ranks would run different numbers of
    micro-batches), stops with the reasons instead."""
    from videocom_fast.rollout.engine import failed

    keep, reasons = [], Counter()
    for k in range(0, len(trajs), group_size):
        g = trajs[k:k + group_size]
        bad = [t.finish_reason for t in g if failed(t)]
        reasons.update(bad)
        if not bad:
            keep += g
    skipped = len(trajs) - len(keep)
    if skipped:
        why = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3))
        msg = (f"grpo step {step + 1}: {sum(reasons.values())} episode(s) failed ({why}); skipping their "
               f"{skipped // group_size} prompt group(s), {skipped} episodes")
        if not keep or dist.world_size > 1:
            raise RuntimeError(msg + (": nothing left to train on" if not keep else
                                      ": cannot skip under data parallelism, fix or drop those samples"))
        print(msg, file=sys.stderr)
    return keep, skipped


def episode_stats(trajs) -> dict:
    acts = Counter((a.kind if a is not None else "none") for t in trajs for a in t.actions)
    fins = Counter(t.finish_reason for t in trajs)
    n = max(len(trajs), 1)
    out = {"rounds_per_episode": sum(t.num_rounds for t in trajs) / n,
           "generated_tokens_per_episode": sum(t.num_generated for t in trajs) / n}
    out.update({f"actions/{k}": v / n for k, v in sorted(acts.items())})
    out.update({f"finish/{k}": v / n for k, v in sorted(fins.items())})
    return out


# --- one update --------------------------------------------------------------------------------------


def micro_batches(trajs, max_episodes: int, max_tokens: int = 0, min_count: int = 0) -> list[list[int]]:
    """Consecutive episode indices per forward: greedy packs of at most `max_tokens` sequence tokens (media
    pads included: they are what the forward's activations scale with), each cut into runs of at most
    `max_episodes`. An episode longer than `max_tokens` is a micro-batch of its own. 0 = no token cap.

    `min_count`: split the longest micro-batches in halves until there are that many (at most one per
    episode). Data parallel needs it: every rank must run as many forwards/backwards as the others (ZeRO-3
    gathers weights per forward, gradients are reduced per backward), and token packs differ per rank."""
    from .packing import pack_indices

    lengths = [len(t.token_ids) for t in trajs]
    packs = pack_indices(lengths, max_tokens) if max_tokens > 0 else [list(range(len(trajs)))]
    out = [p[i:i + max_episodes] for p in packs for i in range(0, len(p), max_episodes)]
    while len(out) < min(min_count, len(trajs)):
        k = max((i for i in range(len(out)) if len(out[i]) > 1), key=lambda i: sum(lengths[j] for j in out[i]))
        half = len(out[k]) // 2
        out[k:k + 1] = [out[k][:half], out[k][half:]]
    return out


def _update_micro_batches(trajs, cfg) -> list[list[int]]:
    """This rank's micro-batches, as many as the rank with the most (see `micro_batches`)."""
    mbs = micro_batches(trajs, cfg.micro_batch, cfg.micro_batch_tokens)
    n = int(all_reduce_max(torch.tensor([len(mbs)]))[0])
    return micro_batches(trajs, cfg.micro_batch, cfg.micro_batch_tokens, min_count=n) if n > len(mbs) else mbs


def _no_grad_logprobs(model, trajs, embeds, cfg):
    out = []
    with torch.no_grad():
        for idx in micro_batches(trajs, cfg.micro_batch, cfg.micro_batch_tokens):
            out += packed_logprobs(model, [trajs[i] for i in idx], temperature=cfg.temperature,
                                   chunk=cfg.logprob_chunk, embeds=[embeds[i] for i in idx])
    return out


def policy_update(policy, trajs, advantages_N, embeds, ref_lps, old_lps, cfg: GRPOConfig, *, world: int = 1,
                  engine=None) -> dict:
    """One optimizer step's gradients over the local episodes (no optimizer step here); returns stats.

    Scaling: "grpo" averages episodes and "dr_grpo" divides by episodes x cap, so a micro-batch's loss is
    weighted by its share of the step's episodes; "dapo" divides every micro-batch by the step's token count
    over all ranks. Data parallel averages gradients over ranks, which equals the global loss when every
    rank holds the same number of episodes (it does: prompts_per_step x G each).

    Host reads: one per micro-batch (the loss's statistics for logging, read in one transfer by grpo_loss),
    plus the token total's reduction when distributed.
    """
    N = len(trajs)
    tokens_local = sum(t.num_generated for t in trajs)
    tokens_global = float(all_reduce_sum(torch.tensor(float(tokens_local), dtype=torch.float64)))
    # The episode token cap (dr_grpo's divisor) needs the resolved generation limits; None until the model's
    # contract is read, and reduce_dr_grpo refuses a missing cap by name.
    cap = cfg.max_rounds * cfg.max_new_tokens if cfg.max_rounds and cfg.max_new_tokens else None
    sums: Counter = Counter()
    mbs = _update_micro_batches(trajs, cfg)
    for m, idx in enumerate(mbs):
        if engine is not None:   # the number of micro-batches varies by step: say where the update happens
            engine.set_gradient_accumulation_boundary(m == len(mbs) - 1)
        rows = packed_logprobs(policy, [trajs[i] for i in idx], temperature=cfg.temperature,
                               chunk=cfg.logprob_chunk, embeds=[embeds[i] for i in idx])
        lp_BT, mask_BT = pad_rows(rows)
        ref_BT = pad_rows([ref_lps[i] for i in idx])[0] if ref_lps is not None else None
        old_BT = pad_rows([old_lps[i] for i in idx])[0] if old_lps is not None else None
        out = grpo_loss(lp_BT, old_BT, ref_BT, advantages_N[idx], mask_BT, loss_type=cfg.loss_type,
                        beta=cfg.beta, epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
                        delta=cfg.delta, max_completion_length=cap, num_tokens=tokens_global / world)
        weight = 1.0 if cfg.loss_type == "dapo" else len(idx) / N
        loss = out.loss * weight
        if engine is not None:   # DeepSpeed steps (clip, update, zero) itself at the accumulation boundary
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()
        else:
            loss.backward()
        ntok = out.stats["num_tokens"]
        sums["loss"] += out.stats["loss"] * weight
        sums["tokens"] += ntok
        for k in ("kl", "clip_ratio/low", "clip_ratio/high", "clip_ratio/region", "ratio_mean"):
            if k in out.stats:
                sums[k] += out.stats[k] * ntok
    tok = max(sums.pop("tokens"), 1.0)
    return {"loss": sums.pop("loss"), **{k: v / tok for k, v in sums.items()}}


# --- the loop ----------------------------------------------------------------------------------------


def _device(cfg, dist):
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device(f"cuda:{dist.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def run_grpo(cfg: GRPOConfig) -> dict:
    from videocom_fast.env import MediaConfig
    from videocom_fast.rollout import RolloutEngine

    from . import sft

    _check_config(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    dist = init_distributed()
    device = _device(cfg, dist)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    samples = load_grpo_samples(cfg.data, cfg.media_root, cfg.max_samples)
    if not _is_tiny(cfg.model):
        from videocom_fast.contract import require_model_dir
        require_model_dir(cfg.model)
    cfg = resolve_contract(cfg, out, dist.is_main)
    policy, ref, processor = build_models(cfg, device)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.adam_betas))
    scheduler = sft.cosine_with_warmup(optimizer, cfg.max_steps, cfg.warmup_ratio)
    engine = None
    if cfg.deepspeed:
        n_micro = math.ceil(cfg.prompts_per_step * cfg.num_generations / cfg.micro_batch)   # backwards per update
        engine, optimizer, scheduler = sft._deepspeed(policy, optimizer, scheduler, SimpleNamespace(
            deepspeed=cfg.deepspeed, grad_accum=n_micro, max_grad_norm=cfg.max_grad_norm))
    start_step = 0
    if cfg.resume and (ck := latest_checkpoint(out)) is not None:
        state = load_checkpoint(ck, model=policy if engine is None else None, optimizer=optimizer,
                                scheduler=scheduler, engine=engine)
        start_step = int(state["step"])
    rollout = RolloutEngine(policy, processor, max_rounds=cfg.max_rounds, max_new_tokens=cfg.max_new_tokens,
                            max_batch_tokens=cfg.max_batch_tokens, media_config=MediaConfig(**cfg.media))
    log = MetricsLogger(out, tensorboard=cfg.tensorboard, enabled=dist.is_main, append=start_step > 0)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "grpo_config.json").write_text(json.dumps(to_dict(cfg), indent=1, default=str))
    bar = sft._progress(SimpleNamespace(progress=cfg.progress), dist, cfg.max_steps, start_step, desc="grpo")
    history = []
    for step in range(start_step, cfg.max_steps):
        rec = train_step(step, policy, ref, rollout, optimizer, scheduler, engine, samples, cfg, dist)
        history.append(rec)
        if dist.is_main and (step + 1) % cfg.log_every == 0:
            log.log(step + 1, rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{rec['reward/mean']:.3f}", kl=f"{rec.get('kl', 0.0):.4f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.max_steps:
            sft._save(out, step + 1, policy, optimizer, scheduler, engine, dist, {"step": step + 1}, cfg.keep_last)
    if bar is not None:
        bar.close()
    log.close()
    if start_step < cfg.max_steps or not history:
        sft._save(out, cfg.max_steps, policy, optimizer, scheduler, engine, dist, {"step": cfg.max_steps},
                  cfg.keep_last)
    if cfg.save_final:
        sft._export(policy, processor, out, dist, engine)
    means = [r["reward/mean"] for r in history]
    result = {"steps": [r["step"] for r in history], "reward_mean": means,
              "reward_means": means,   # the key videocom_fast/demo.py reads
              "loss": [r["loss"] for r in history], "history": history, "output_dir": str(out)}
    if dist.is_main:
        (out / "grpo_result.json").write_text(json.dumps(result, indent=1))
    return result


def train_step(step, policy, ref, rollout, optimizer, scheduler, engine, samples, cfg, dist) -> dict:
    """Rollouts -> rewards -> advantages -> `num_iterations` updates; returns the step's metrics."""
    t0 = time.perf_counter()
    idx = step_prompts(len(samples), step, cfg.prompts_per_step, dist.rank, dist.world_size, cfg.seed)
    batch = [samples[i] for i in idx]
    model = policy if engine is None else engine.module
    model.eval()
    with _gathered(engine):
        groups = rollout.generate(batch, num_generations=cfg.num_generations, temperature=cfg.temperature,
                                  top_k=cfg.top_k, top_p=cfg.top_p,
                                  seed=(cfg.seed * 1000003 + step) * 4099 + dist.rank)
    t_roll = time.perf_counter() - t0
    trajs, skipped = drop_failed_groups([t for g in groups for t in g], cfg.num_generations, step, dist)
    rewards_N, parts = score_episodes(trajs, batch, cfg)
    adv_N = group_advantages(rewards_N, cfg.num_generations, scale=cfg.scale_rewards)
    t1 = time.perf_counter()
    stats = update_step(model, ref, trajs, adv_N, optimizer, scheduler, engine, cfg, dist)
    t_train = time.perf_counter() - t1
    gen_tokens = sum(t.num_generated for t in trajs)
    rec = {"step": step + 1, "lr": scheduler.get_last_lr()[0] if hasattr(scheduler, "get_last_lr") else cfg.lr,
           "reward/mean": _global_mean(rewards_N), "reward/std": float(rewards_N.std()) if len(trajs) > 1 else 0.0,
           "advantage/mean": float(adv_N.mean()), "advantage/std": float(adv_N.std()) if len(trajs) > 1 else 0.0,
           "advantage/abs_max": float(adv_N.abs().max()),
           "rollout_tokens_per_s": gen_tokens / max(t_roll, 1e-9),
           "trained_tokens_per_s": gen_tokens * cfg.num_iterations / max(t_train, 1e-9),
           "rollout_s": t_roll, "train_s": t_train, "episodes": len(trajs) * dist.world_size,
           "episodes/skipped": skipped}
    for k, v in parts.items():
        rec[f"reward/{k}/mean"] = _global_mean(v)
        rec[f"reward/{k}/std"] = float(v.std()) if len(v) > 1 else 0.0
    rec.update(stats)
    rec.update(episode_stats(trajs))
    return rec


def update_step(model, ref, trajs, adv_N, optimizer, scheduler, engine, cfg, dist) -> dict:
    """The training half of a step on given episodes (host Trajectories, as the engine returns them):
    media features -> reference (and old-policy) log-probs -> `num_iterations` x (policy_update -> clip ->
    AdamW -> schedule). Returns the last update's stats and its grad_norm.

    Host reads: policy_update's, plus one per update for the gradient norm (logged); nothing else reads a
    device value (tests/test_standin_training.py counts them on the stand-in device)."""
    model.train()
    vision_frozen = not any(p.requires_grad for p in _visual(model).parameters())
    cache: dict = {}
    with torch.no_grad():   # frozen tower: each distinct media item is encoded once per step, for every forward
        embeds = [media_embeds(model, t, torch.as_tensor(t.token_ids), cache) if vision_frozen else None
                  for t in trajs]
    ref_lps = None
    if cfg.beta != 0.0:
        with reference_weights(model, ref) as rm:
            ref_lps = _no_grad_logprobs(rm, trajs, embeds, cfg)
    old_lps = _no_grad_logprobs(model, trajs, embeds, cfg) if cfg.num_iterations > 1 else None
    stats: dict = {}
    for _ in range(cfg.num_iterations):
        stats = policy_update(model, trajs, adv_N, embeds, ref_lps, old_lps, cfg, world=dist.world_size,
                              engine=engine)
        if engine is not None:
            grad_norm = float(engine.get_global_grad_norm() or 0.0)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                             cfg.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return {**stats, "grad_norm": grad_norm}


def _global_mean(x_N: torch.Tensor) -> float:
    t = all_reduce_sum(torch.tensor([float(x_N.sum()), float(x_N.numel())], dtype=torch.float64))
    return float(t[0] / max(float(t[1]), 1.0))


def _visual(model):
    from videocom_fast.modeling import inner
    return inner(model).visual


# --- CLI -------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    """`videocom-fast grpo --config FILE [key=value ...] [--resume]`; argv may also be a GRPOConfig."""
    from videocom_fast.cli_io import results_only_on_stdout

    cfg = parse_cli("videocom-fast grpo", GRPOConfig, argv)
    with results_only_on_stdout():
        result = run_grpo(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"steps": len(result["steps"]), "reward_mean": result["reward_mean"],
                          "output_dir": result["output_dir"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
