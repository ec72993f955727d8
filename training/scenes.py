"""SFT on a stream of rendered episodes: every step sees fresh samples, none is ever encoded.

    info = sft_on_scenes("runs/perceive", "runs/sft", media=cfg["media"], steps=600, batch=8)

Why (issue 17): SFT on the 160 encoded samples of the old demo memorized them (training accuracy 0.41,
held-out at chance, docs/vision_demo.md). Perception that generalizes needs many distinct scenes, and the
synthesizer renders a frame in ~0.1 ms while encoding a video costs ~1 s. Here each step draws `batch` new
plans (a seed stream disjoint from `synthesize`'s), wraps them as `SceneSource`s (the same pixels the
encoder would get, plus codec-like noise) and builds the SAME examples as `SFTDataset` (synth's SFT record,
`build_example`: chat template, media layout, M-RoPE positions). Held-out evaluation stays on real H.264.

The loss is the SFT loss (mean over supervised tokens); the log also reports, per assistant turn (segment,
frame, zoom, answer), the share of turns whose every token is the argmax under teacher forcing: the fixed
text is learned in tens of steps, so these say whether the model reads the segment, the slot and the tag.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

STREAM_SEED = 1_000_003      # plans (STREAM_SEED + seed, index): never a `synthesize(seed=...)` sample
TURNS = ("segment", "frame", "zoom", "answer")


class _Stream:
    """Fresh SFT examples from rendered plans (one generator: runs repeat)."""

    def __init__(self, tokenizer, media, seed: int, width: int, height: int, fps: int, seconds):
        from videocom_fast import protocol
        from videocom_fast.chat import ChatTokens

        from .sft_data import MediaResolver

        self.chat = ChatTokens(tokenizer)
        self.resolver = MediaResolver(media)
        self.media, self.seed, self.w, self.h, self.fps, self.seconds = media, seed, width, height, fps, seconds
        self.image_hw = protocol.smart_resize(height, width, min_pixels=media.image_min_pixels,
                                              max_pixels=media.image_max_pixels)
        self.count = 0

    def make(self, n: int):
        from videocom_fast.data.synth import SceneSource, _plan, _sft_record

        from .sft_data import build_example

        out = []
        for _ in range(n):
            p = _plan(self.count, STREAM_SEED + self.seed, self.w, self.h, self.fps, self.seconds, self.image_hw)
            self.count += 1
            src = SceneSource(p, self.w, self.h, self.fps, seed=self.seed)
            self.resolver._sources = {src.path: src}          # one sample at a time: nothing accumulates
            rec = _sft_record(dict(plan=p, name=src.path, video=src.path, frame_image=None), self.fps,
                              self.image_hw, self.w, self.h)
            out.append(build_example(rec, self.chat, self.resolver))
        return out


def _prefetch(make, depth: int = 2):
    """Yield make() results produced by a background thread, `depth` ahead: rendering and preprocessing
    (numpy / torch ops, which release the GIL) overlap the training step instead of preceding it."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            while not stop.is_set():
                q.put(("ok", make()))
        except BaseException as e:            # surfaced in the consumer, never swallowed
            q.put(("error", e))

    threading.Thread(target=work, daemon=True, name="scene-stream").start()
    try:
        while True:
            kind, item = q.get()
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        while not q.empty():                  # unblock a producer waiting on a full queue
            q.get_nowait()


def _turn_spans(labels: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of supervised tokens (one per assistant turn)."""
    on = (labels != -100).tolist()
    spans, start = [], None
    for i, v in enumerate(on + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _loss_and_turns(model, examples) -> tuple[torch.Tensor, np.ndarray]:
    """Mean loss over supervised tokens, and per example x turn: 1 if every token of the turn is argmax."""
    from videocom_fast.modeling import embed

    from .packing import attention_kwargs, collate, media_embeddings, text_forward, vision_trainable

    batch = collate(examples)
    media = media_embeddings(model, batch, grad=vision_trainable(model))
    x = embed(model, batch.input_ids, media)
    hidden = text_forward(model, x.unsqueeze(0), batch.position_ids, **attention_kwargs(batch))[0]
    keep = batch.targets != -100
    logits = model.lm_head(hidden[keep]).float()
    targets = batch.targets[keep]
    loss = torch.nn.functional.cross_entropy(logits, targets)
    with torch.no_grad():
        right = (logits.argmax(-1) == targets).tolist()
    turns, k = [], 0
    for ex in examples:
        spans = _turn_spans(ex.labels)
        row = []
        for a, b in spans:
            row.append(float(all(right[k:k + b - a])))
            k += b - a
        turns.append(row[:len(TURNS)] + [np.nan] * (len(TURNS) - len(row)))
    return loss, np.array(turns, dtype=np.float64)


def sft_on_scenes(model, out_dir, *, media, steps: int = 600, batch: int = 8, lr: float = 3e-3, seed: int = 0,
                  train_vision: bool = False, train_merger: bool = True, width: int = 320, height: int = 192,
                  fps: int = 4, seconds=(40, 40), warmup: int = 20, log_every: int = 25, log=print) -> dict:
    """Train `model` (a from_pretrained dir, e.g. the perception warm-up's) on `steps` x `batch` fresh
    rendered episodes; save it to `out_dir` (from_pretrained + media.json; the logged rows also go to
    out_dir/metrics.jsonl, the report's SFT curve). Returns the history."""
    from videocom_fast.contract import write_contract
    from videocom_fast.evaluate import media_config_from
    from videocom_fast.modeling import inner
    from videocom_fast.models import load

    from .metrics import MetricsLogger
    from .packing import install_packed_attention

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mc = media_config_from(media)
    torch.manual_seed(seed)
    net, processor = load(model)
    install_packed_attention(net)
    visual = inner(net).visual
    # NOTE: the merger (the projector) trains by default: the warm-up's features are ~150x the norm of a
    # token embedding with a large common component, and a frozen projector left the LLM at chance
    for name, p in visual.named_parameters():
        p.requires_grad_(train_vision or (train_merger and name.startswith("merger.")))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + np.cos(np.pi * min(s, steps) / steps)))
    data = _Stream(processor.tokenizer, mc, seed, width, height, fps, seconds)
    net.train()
    metrics = MetricsLogger(out, tensorboard=False)
    t0, history, window = time.perf_counter(), [], []
    batches = _prefetch(lambda: data.make(batch))
    for step in range(1, steps + 1):
        loss, turns = _loss_and_turns(net, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        window.append(turns)
        if step % log_every == 0 or step in (1, steps):
            acc = np.nanmean(np.concatenate(window), axis=0)
            window = []
            rec = {"step": step, "loss": round(loss.item(), 4), "s": round(time.perf_counter() - t0, 1),
                   **{f"turn_{k}": round(float(v), 3) for k, v in zip(TURNS, acc)}}
            history.append(rec)
            metrics.log(step, {k: v for k, v in rec.items() if k != "step"})
            log("scene SFT " + " ".join(f"{k} {v}" for k, v in rec.items()))
    batches.close()                                           # stops the renderer
    metrics.close()
    net.eval()
    net.save_pretrained(out)
    processor.save_pretrained(out)
    if (Path(model) / "videocom_tiny.json").exists():
        shutil.copy(Path(model) / "videocom_tiny.json", out / "videocom_tiny.json")
    write_contract(out, "sft", mc, generation={"max_new_tokens": 64, "max_rounds": 5}, frame_hw=(height, width))
    info = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "train_vision": train_vision,
            "train_merger": train_merger, "train_s": round(time.perf_counter() - t0, 1), "history": history}
    (out / "scene_sft.json").write_text(json.dumps(info, indent=1))
    return info


__all__ = ["sft_on_scenes", "STREAM_SEED", "TURNS"]
