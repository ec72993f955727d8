"""Supervised fine-tuning on Video-CoM manipulation chains (spec section 5), the first half of training.

    videocom-fast sft --config configs/sft_tiny.yaml lr=3e-4 max_steps=50 [--resume]
    result = run_sft(load_config(SFTConfig, "configs/sft_tiny.yaml"))   # dict: losses, eval_loss, ...

Pipeline per optimizer step: conversations -> `sft_data.SFTDataset` (ids/labels by ChatTokens, media
decoded through the frame cache and preprocessed by videocom_fast.preprocess, 3-D M-RoPE positions) ->
greedy packs up to `micro_batch_tokens` (`packing`, attention kept within each example) -> vision features
(computed once per example and cached while the tower is frozen) -> LLM forward with explicit positions ->
fp32 chunked log-probs of the trained tokens -> loss = token sum / trained tokens of the whole step (so
gradient accumulation and data parallelism give the same update as one big batch) -> clip -> AdamW ->
cosine schedule with warmup.

Fixes against the reference trainer (spec section 7): M-RoPE positions in every forward (defect 1), fp32
log-softmax and gradient clipping (defect 9). Checkpoints are atomic and carry RNG and data position, so
`--resume` continues with the same next losses (tests/test_checkpoint.py). DeepSpeed ZeRO-2/3 runs when
`deepspeed` names a JSON config (launch with `deepspeed` or `torchrun`); a torch optimizer is used so no op
is JIT-compiled.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import parse_cli, to_dict
from .distributed import all_reduce_sum, barrier, init_distributed
from .metrics import MetricsLogger
from .packing import collate, install_packed_attention, pack_indices, packed_loss_sum
from .sft_data import SFTDataset


# --- config ----------------------------------------------------------------------------------------

@dataclass
class SFTConfig:
    model: str = "tiny"                 # a Qwen2.5-VL directory, or "tiny" (videocom_fast.models.build_tiny)
    model_kwargs: dict = field(default_factory=dict)   # "tiny" only: LLM sizes, e.g. {hidden_size: 256}
    data: str = ""                      # SFT JSON (synth.py or Video-CoM format)
    eval_data: str = ""                 # optional held-out SFT JSON
    eval_fraction: float = 0.0          # else hold out this fraction of `data` (the last samples)
    media_root: str = ""                # base of relative media paths (default: the JSON's directory)
    output_dir: str = "runs/sft"
    media: dict = field(default_factory=dict)   # MediaConfig fields (frames, pixel limits)
    reference_bbox: bool = False        # image "bbox" with the reference loader's meaning (real data)
    max_samples: int = 0
    seed: int = 0
    lr: float = 1e-5
    weight_decay: float = 0.1
    adam_betas: tuple = (0.9, 0.999)
    warmup_ratio: float = 0.03
    epochs: int = 1
    max_steps: int = 0                  # > 0 overrides epochs
    micro_batch_tokens: int = 4096      # packing budget per micro-batch (one row)
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    shuffle: bool = True
    freeze_vision: bool = True
    freeze_merger: bool = True
    freeze_llm: bool = False
    lora: dict = field(default_factory=dict)    # {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": [...]}
    gradient_checkpointing: bool = False
    dtype: str = "auto"                 # "auto": bf16 on GPU, fp32 on CPU; or float32 / bfloat16 / float64
    device: str = "auto"
    cache_vision: bool = True           # reuse frozen-tower features across epochs
    loss_chunk: int = 1024
    save_every: int = 0                 # steps; 0 = only at the end
    keep_last: int = 2
    save_final: bool = True
    resume: bool = False
    log_every: int = 1
    eval_every: int = 0
    tensorboard: bool = True
    progress: bool = True
    deepspeed: str = ""                 # path to a DeepSpeed JSON config (ZeRO-2/3)
    num_threads: int = 0
    max_new_tokens: int = 512           # generation limits recorded with the model (media.json) for the
    max_rounds: int = 5                 # rollouts/eval that use it; SFT itself does not generate


# --- setup -----------------------------------------------------------------------------------------

def _load_json_samples(path: str, limit: int = 0, media_root: str = "") -> list[dict]:
    """The samples of an SFT JSON; a missing file, or a missing video/image of a sample, is an error naming
    the sample and the JSON now (not a decoder error minutes into training)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data: file {path!r} not found (relative to {Path.cwd()})")
    try:
        samples = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"data: {path!r} is not valid JSON ({e})") from None
    if not isinstance(samples, list):
        raise ValueError(f"data: {path!r} must hold a JSON list of samples")
    samples = samples[:limit] if limit > 0 else samples
    root = Path(media_root or p.parent)
    for i, s in enumerate(samples):
        for field_, rel in _media_paths(s):
            f = Path(rel) if Path(rel).is_absolute() else root / rel
            if "://" not in rel and not f.is_file():
                raise ValueError(f"data: {path!r}: sample {i} (id {s.get('id', '?')!r}): {field_} {str(f)!r} "
                                 f"does not exist")
    return samples


def _media_paths(s) -> list[tuple[str, str]]:
    if not isinstance(s, dict):
        return []
    out = []
    for key in ("video", "image"):
        v = s.get(key)
        out += [(key, x) for x in (v if isinstance(v, list) else [v]) if isinstance(x, str)]
    for t, turn in enumerate(s.get("conversations") or []):
        m = turn.get("media") if isinstance(turn, dict) else None
        if isinstance(m, dict) and isinstance(m.get("image"), str):
            out.append((f"conversations[{t}].media.image", m["image"]))
    return out


def _media_contract(cfg: SFTConfig, out: Path, write: bool):
    """The run's MediaConfig (explicit `media`, else the data's contract), checked against the data's zoom
    coordinates and a resumed run's record, and recorded in `out` (videocom_fast.contract)."""
    from videocom_fast.contract import read_contract, resolve, check_zoom_coordinates, write_contract

    media, _, _ = resolve(None, cfg.data, media=cfg.media)
    for data in (cfg.data, cfg.eval_data):
        if data:
            check_zoom_coordinates(data, media)
    prev = read_contract(out) if cfg.resume else None
    if prev is not None and prev["media"] != dataclasses.asdict(media):
        raise ValueError(f"resume: {prev['path']} records media {prev['media']}, this run has "
                         f"{dataclasses.asdict(media)}; resume with the same media settings")
    if write:
        write_contract(out, "sft", media,
                       generation={"max_new_tokens": cfg.max_new_tokens, "max_rounds": cfg.max_rounds})
    return media


def _dtype(cfg: SFTConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64,
                "float16": torch.float16}[cfg.dtype]
    except KeyError:
        raise ValueError(f"dtype: expected auto/float32/bfloat16/float16/float64, got {cfg.dtype!r}") from None


def build_model(cfg: SFTConfig, device: torch.device):
    from videocom_fast.models import build_tiny, load

    path = cfg.model
    is_tiny = path == "tiny" or path.startswith("tiny:")
    if cfg.model_kwargs and not is_tiny:
        raise ValueError(f"model_kwargs: only for model 'tiny' (sizes of a new model), got model {path!r}")
    if not is_tiny:
        from videocom_fast.contract import require_model_dir
        require_model_dir(path)
    if is_tiny:
        seed = int(path.split(":")[1]) if ":" in path else cfg.seed
        path = Path(cfg.output_dir) / "_base"
        # NOTE: one writer: the other ranks wait for rank 0's files instead of racing to rewrite them
        multi = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not multi or torch.distributed.get_rank() == 0:
            build_tiny(path, seed=seed, **cfg.model_kwargs)
        if multi:
            torch.distributed.barrier()
    model, processor = load(path, dtype=_dtype(cfg, device), device=device)
    install_packed_attention(model)
    _freeze(model, cfg)
    if cfg.lora:
        model = _apply_lora(model, cfg.lora)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, processor


def _freeze(model, cfg: SFTConfig):
    from videocom_fast.modeling import inner

    m = inner(model)
    visual = m.visual
    for name, p in visual.named_parameters():
        is_merger = name.startswith("merger")
        p.requires_grad_(not (cfg.freeze_merger if is_merger else cfg.freeze_vision))
    for p in m.language_model.parameters():
        p.requires_grad_(not cfg.freeze_llm)
    for p in model.lm_head.parameters():
        p.requires_grad_(not cfg.freeze_llm)


def _apply_lora(model, spec: dict):
    from peft import LoraConfig, get_peft_model

    targets = spec.get("target_modules") or ["q_proj", "k_proj", "v_proj", "o_proj",
                                              "gate_proj", "up_proj", "down_proj"]
    # regex restricted to the LLM: the vision tower has its own attention modules
    pattern = r".*language_model.*\.(" + "|".join(targets) + r")$"
    lcfg = LoraConfig(r=int(spec.get("r", 16)), lora_alpha=int(spec.get("alpha", 32)),
                      lora_dropout=float(spec.get("dropout", 0.0)), target_modules=pattern)
    return get_peft_model(model, lcfg)


def cosine_with_warmup(optimizer, total_steps: int, warmup_ratio: float):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total_steps), total_steps)


def epoch_packs(dataset: SFTDataset, cfg: SFTConfig, epoch: int) -> list[list[int]]:
    """Example indices per micro-batch for `epoch` (a pure function of seed and epoch: resumable)."""
    n = len(dataset)
    if cfg.shuffle:
        g = torch.Generator().manual_seed(cfg.seed * 1000003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    packs = pack_indices([dataset[i].num_tokens for i in order], cfg.micro_batch_tokens)
    return [[order[j] for j in p] for p in packs]


# --- the loop --------------------------------------------------------------------------------------

class _VisionCache:
    """Frozen-tower features per example index (valid while no vision parameter trains).

    The example's pixels go to the tower's device; its grids stay on the host (the frozen tower runs
    vision_forward.py, which reads only host grids: no sync; see training/logprobs.py `_tower`)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.store: dict[int, list[torch.Tensor]] = {}

    def media(self, model, dataset, idx: list[int]):
        if not self.enabled:
            return None
        out = []
        for i in idx:
            if i not in self.store:
                self.store[i] = [e.detach() for e in _frozen_media(model, collate([dataset[i]]))]
            out += self.store[i]
        return out


def _frozen_media(model, batch) -> list[torch.Tensor]:
    """Features per vision block in sequence order, of a HOST batch, by the frozen tower on its device."""
    from .logprobs import _tower

    visual = _visual(model)
    device, dtype = next(visual.parameters()).device, next(visual.parameters()).dtype
    with torch.no_grad():
        feats = {}
        for kind, pix, grid in (("image", batch.pixel_values, batch.image_grid_thw),
                                ("video", batch.pixel_values_videos, batch.video_grid_thw)):
            if grid is not None and grid.numel():
                feats[kind] = iter(_tower(model, False)(pix.to(device, dtype, non_blocking=True), grid,
                                                        kind == "video"))
        return [next(feats[k]) for k in batch.media_kinds]


def _loss_over(model, dataset, packs, device, cache: _VisionCache, chunk: int) -> tuple[torch.Tensor, int]:
    """(summed loss on the device, trained tokens counted on the host): no host read per micro-batch."""
    total, tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    with torch.no_grad():
        for idx in packs:
            host = collate([dataset[i] for i in idx])
            tokens += host.num_trained
            total += packed_loss_sum(model, host.to(device), chunk=chunk, media=cache.media(model, dataset, idx))
    return total, tokens


def train_step(model, fwd_model, dataset, step_packs, optimizer, scheduler, engine, cache: _VisionCache,
               cfg: SFTConfig, dist, device) -> dict:
    """One optimizer step over `step_packs` (every rank's micro-batches; this rank runs its share).

    Host reads (each a sync on a GPU): per micro-batch, what packed_loss_sum's forward reads (modeling.embed
    checks the pad count; the trained rows are picked by a mask); per step ONE transfer of the loss and the
    gradient norm (plus the all-reduces when distributed). Counted in tests/test_standin_training.py."""
    mine = step_packs[dist.rank::dist.world_size]
    step_tokens = sum(sum(dataset[i].num_trained for i in p) for p in step_packs)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_tok = n_vis = 0
    for idx in mine:
        batch = collate([dataset[i] for i in idx])
        n_tok += batch.num_tokens
        n_vis += batch.num_visual_tokens
        s = packed_loss_sum(fwd_model, batch.to(device), chunk=cfg.loss_chunk,
                            media=cache.media(fwd_model, dataset, idx))
        # normalise by the whole step's trained tokens; DDP/DeepSpeed average over ranks -> * world
        loss = s / step_tokens * dist.world_size
        if engine is not None:
            engine.backward(loss * len(mine))  # engine divides by its gradient_accumulation_steps
            engine.step()
        else:
            loss.backward()
        loss_sum += s.detach().double()
    if engine is not None:
        grad_norm = torch.tensor(float(engine.get_global_grad_norm() or 0.0), dtype=torch.float64)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(_trainable(model), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    loss_total, grad_norm = torch.stack([all_reduce_sum(loss_sum), grad_norm.to(device, torch.float64)]).tolist()
    return {"loss": loss_total / step_tokens, "grad_norm": grad_norm, "trained_tokens": step_tokens,
            "tokens": n_tok, "visual_tokens": n_vis}


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def run_sft(cfg: SFTConfig) -> dict:
    t_start = time.time()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    dist = init_distributed()
    device = torch.device("cuda", dist.local_rank) if cfg.device == "auto" and torch.cuda.is_available() \
        else torch.device("cpu" if cfg.device == "auto" else cfg.device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    # data and its media contract first: a bad file fails before the model loads
    samples = _load_json_samples(cfg.data, cfg.max_samples, cfg.media_root)
    root = cfg.media_root or str(Path(cfg.data).parent)
    eval_samples = _load_json_samples(cfg.eval_data) if cfg.eval_data else []
    if not eval_samples and cfg.eval_fraction > 0:
        k = max(1, int(len(samples) * cfg.eval_fraction))
        samples, eval_samples = samples[:-k], samples[-k:]
    if not samples:
        raise ValueError(f"data: no training samples in {cfg.data!r}")
    media = _media_contract(cfg, out, dist.is_main)
    model, processor = build_model(cfg, device)
    from videocom_fast.media import FrameCache

    budget = media
    cache = FrameCache()
    train_ds = SFTDataset(samples, processor.tokenizer, budget, cache=cache, media_root=root,
                          reference_bbox=cfg.reference_bbox)
    eval_ds = SFTDataset(eval_samples, processor.tokenizer, budget, cache=cache,
                         media_root=str(Path(cfg.eval_data).parent) if cfg.eval_data else root,
                         reference_bbox=cfg.reference_bbox) if eval_samples else None

    per_step = cfg.grad_accum * dist.world_size
    steps_per_epoch = max(1, len(epoch_packs(train_ds, cfg, 0)) // per_step)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                                  betas=tuple(cfg.adam_betas))
    scheduler = cosine_with_warmup(optimizer, total_steps, cfg.warmup_ratio)
    engine = None
    if cfg.deepspeed:
        engine, optimizer, scheduler = _deepspeed(model, optimizer, scheduler, cfg)
    fwd_model = engine.module if engine is not None else model
    vision_cache = _VisionCache(cfg.cache_vision and not any(
        p.requires_grad for p in _visual(fwd_model).parameters()))
    eval_cache = _VisionCache(vision_cache.enabled)

    step, epoch, pos, losses = 0, 0, 0, []
    if cfg.resume and (ck := latest_checkpoint(out)) is not None:
        st = load_checkpoint(ck, model=model, optimizer=optimizer, scheduler=scheduler, engine=engine)
        step, epoch, pos, losses = st["step"], st["epoch"], st["pos"], st.get("losses", [])
    metrics = MetricsLogger(out, tensorboard=cfg.tensorboard, enabled=dist.is_main, append=step > 0)
    if dist.is_main:
        (out / "sft_config.json").write_text(json.dumps(to_dict(cfg), indent=1, default=str))
    bar = _progress(cfg, dist, total_steps, step)
    packs = epoch_packs(train_ds, cfg, epoch)
    if len(packs) < per_step:
        raise ValueError(f"grad_accum x world_size = {per_step} micro-batches per step, but one epoch packs "
                         f"into only {len(packs)} (lower micro_batch_tokens or grad_accum)")
    while step < total_steps:
        if pos + per_step > len(packs):
            epoch, pos = epoch + 1, 0
            packs = epoch_packs(train_ds, cfg, epoch)
        t0 = time.time()
        st = train_step(model, fwd_model, train_ds, packs[pos:pos + per_step], optimizer, scheduler, engine,
                        vision_cache, cfg, dist, device)
        step_loss = st["loss"]
        counts = all_reduce_sum(torch.tensor([st["tokens"], st["visual_tokens"]], dtype=torch.float64))
        pos += per_step
        step += 1
        losses.append(step_loss)
        dt = max(time.time() - t0, 1e-9)
        rec = {"loss": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": st["grad_norm"], "epoch": epoch,
               "tokens_per_s": float(counts[0]) / dt, "visual_tokens_per_s": float(counts[1]) / dt,
               "trained_tokens": st["trained_tokens"]}
        if cfg.eval_every and eval_ds is not None and step % cfg.eval_every == 0:
            rec["eval_loss"] = _eval(fwd_model, eval_ds, cfg, device, eval_cache, dist)
        if step % max(cfg.log_every, 1) == 0 or step == total_steps:
            metrics.log(step, rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            _save(out, step, model, optimizer, scheduler, engine, dist,
                  {"epoch": epoch, "pos": pos, "losses": losses}, cfg.keep_last)
    if bar is not None:
        bar.close()
    result = {"losses": losses, "steps": step, "output_dir": str(out), "wall_s": time.time() - t_start,
              "num_train": len(train_ds), "num_eval": len(eval_ds) if eval_ds else 0}
    if eval_ds is not None:
        result["eval_loss"] = _eval(fwd_model, eval_ds, cfg, device, eval_cache, dist)
        metrics.log(step, {"final_eval_loss": result["eval_loss"]})
    metrics.close()
    _save(out, step, model, optimizer, scheduler, engine, dist, {"epoch": epoch, "pos": pos, "losses": losses},
          cfg.keep_last)
    if cfg.save_final:
        _export(fwd_model, processor, out, dist, engine)
    if dist.is_main:
        (out / "sft_result.json").write_text(json.dumps(result, indent=1))
    return result


def _visual(model):
    from videocom_fast.modeling import inner

    return inner(model).visual


def _eval(model, ds, cfg, device, cache, dist) -> float:
    packs = pack_indices([ds[i].num_tokens for i in range(len(ds))], cfg.micro_batch_tokens)
    total, tokens = _loss_over(model, ds, packs[dist.rank::dist.world_size], device, cache, cfg.loss_chunk)
    total, tokens = all_reduce_sum(torch.stack([total, torch.tensor(float(tokens), dtype=torch.float64,
                                                                    device=device)])).tolist()
    return total / max(tokens, 1)


def _save(out, step, model, optimizer, scheduler, engine, dist, state, keep_last):
    if engine is not None:  # every rank writes its shard into the same directory
        save_checkpoint(out, step, engine=engine, state=state, keep_last=keep_last)
    elif dist.is_main:
        save_checkpoint(out, step, model=model, optimizer=optimizer, scheduler=scheduler, state=state,
                        keep_last=keep_last)
    barrier()


def _export(model, processor, out: Path, dist, engine):
    """`from_pretrained(out)` loads the result: merged LoRA weights, gathered ZeRO-3 shards, processor."""
    state = None
    if engine is not None and engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    if not dist.is_main:
        return
    m = model
    if hasattr(m, "merge_and_unload"):
        import copy
        m = copy.deepcopy(m).merge_and_unload()
    m.save_pretrained(out, state_dict=state)
    processor.save_pretrained(out)


def _deepspeed(model, optimizer, scheduler, cfg: SFTConfig):
    import deepspeed

    from .config import find_config

    ds_cfg = json.loads(find_config(cfg.deepspeed).read_text())   # a file, or a packaged one (ds_zero3.json)
    ds_cfg["train_micro_batch_size_per_gpu"] = 1
    ds_cfg["gradient_accumulation_steps"] = cfg.grad_accum
    ds_cfg["gradient_clipping"] = cfg.max_grad_norm
    ds_cfg.pop("train_batch_size", None)
    ds_cfg.pop("optimizer", None)   # a torch optimizer: no DeepSpeed op is JIT-compiled (FACTS.md)
    ds_cfg.pop("scheduler", None)
    ds_cfg["bf16"] = {"enabled": next(model.parameters()).dtype == torch.bfloat16}
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=ds_cfg)
    return engine, optimizer, scheduler


def _progress(cfg, dist, total, initial, desc: str = "sft"):
    if not (cfg.progress and dist.is_main and sys.stderr.isatty()):   # no redraws in a redirected log
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


# --- CLI -------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    """`videocom-fast sft --config FILE [key=value ...] [--resume]`; argv may also be an SFTConfig."""
    from videocom_fast.cli_io import results_only_on_stdout

    cfg = parse_cli("videocom-fast sft", SFTConfig, argv)
    with results_only_on_stdout():
        result = run_sft(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}
                         | {"first_loss": result["losses"][0] if result["losses"] else None,
                            "final_loss": result["losses"][-1] if result["losses"] else None}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
