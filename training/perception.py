"""Perception warm-up: teach the tiny model's random vision tower and merger to see the synthesized scenes.

    info = warm_up("tiny", "runs/perceive", media=cfg["media"], steps=300)   # a from_pretrained dir

Why: with a random frozen tower the tiny model cannot read the tag, find its segment or its slot, so SFT
teaches only the protocol's format (docs/grpo_curve.md). Here the tower + merger are trained, with small
linear heads on their merged tokens, on scenes rendered in memory by the synthesizer's own `Scene` (no
video encoding: hundreds of scenes per second), each in the three shapes the model sees them in:
  - main video: one temporal patch (2 of the main frames) at the video pixel limits; every merged token
    learns the segment tint, and each token covering the tag learns that it does;
  - FIND_FRAME image at the image limits; a token covering the tag learns which of the 4 slots it is in;
  - SPATIAL_ZOOM crop of the tag's slot; the mean of its tokens learns the character and its colour
    (`crops` per step, more than the other views: 4 tokens each, and the character is the hardest cue).
The heads are thrown away; SFT then trains the LLM to read these features with the tower frozen. Inputs go
through `preprocess_video` / `preprocess_images`, the same pixel path as training and rollouts. A little
noise stands in for the codec (the rendered frames are never encoded). docs/vision_demo.md has the numbers.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch


def _token_cover(box, hw_orig, hw_resized, merge_px: int = 28) -> np.ndarray:
    """bool (rows, cols) of the merged tokens of a resized frame that overlap `box` (original pixels)."""
    (H, W), (rh, rw) = hw_orig, hw_resized
    x1, y1, x2, y2 = box[0] * rw / W, box[1] * rh / H, box[2] * rw / W, box[3] * rh / H
    rows, cols = rh // merge_px, rw // merge_px
    r = np.arange(rows)[:, None] * merge_px
    c = np.arange(cols)[None, :] * merge_px
    iy = np.clip(np.minimum(r + merge_px, y2) - np.maximum(r, y1), 0, None)
    ix = np.clip(np.minimum(c + merge_px, x2) - np.maximum(c, x1), 0, None)
    return (iy * ix) >= 0.25 * min(merge_px ** 2, (x2 - x1) * (y2 - y1))


class _Batches:
    """Random scenes -> (pixel inputs, targets) for the three views; one generator, so runs repeat."""

    def __init__(self, media, seed: int, width: int, height: int, fps: int, seconds):
        from videocom_fast import protocol
        from videocom_fast.data.synth import TAG_CHARS, TAG_COLOURS

        self.m, self.seed, self.w, self.h, self.fps, self.seconds = media, seed, width, height, fps, seconds
        self.vid_hw = protocol.smart_resize(height, width, min_pixels=media.video_min_pixels,
                                            max_pixels=media.video_max_pixels)
        self.img_hw = protocol.smart_resize(height, width, min_pixels=media.image_min_pixels,
                                            max_pixels=media.image_max_pixels)
        self.chars, self.colours = {c: i for i, c in enumerate(TAG_CHARS)}, {c: i for i, c in enumerate(TAG_COLOURS)}
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def _noisy(self, f: np.ndarray) -> np.ndarray:
        from videocom_fast.data.synth import add_noise
        return add_noise(f, self.rng, 4)

    def make(self, n: int, n_crops: int | None = None):
        n_crops = n if n_crops is None else n_crops
        from videocom_fast import protocol
        from videocom_fast.data.synth import SEGMENT_TINTS, Scene, _plan
        from videocom_fast.env import resized_box_to_original
        from videocom_fast.preprocess import preprocess_images, preprocess_video

        vids, vid_t, vid_tag, imgs, img_t, crops, boxes, char_t, col_t = [], [], [], [], [], [], [], [], []
        for k in range(max(n, n_crops)):
            p = _plan(self.count, self.seed + 7919, self.w, self.h, self.fps, self.seconds, self.img_hw)
            self.count += 1
            sc = Scene(p, self.w, self.h, self.fps)
            tag_box = (p["x"], p["y"], p["x"] + p["tag"], p["y"] + p["tag"])
            if k < n_crops:
                # the zoom crop of the tag's slot, on a frame showing the tag, as the env crops the gold box
                tf = self._noisy(sc.draw(int(self.rng.integers(p["start"], p["start"] + p["length"]))))
                crops.append(torch.from_numpy(tf))
                boxes.append(resized_box_to_original(p["zoom"], self.img_hw, (self.h, self.w)))
                char_t.append(self.chars[p["char"]])
                col_t.append(self.colours[p["colour"]])
            if k >= n:
                continue
            main = protocol.sample_frame_indices(p["n"], self.fps, self.m.main_nframes)
            g = int(self.rng.integers(0, len(main) // 2))
            pair = [main[2 * g], main[2 * g + 1]]
            vids.append(torch.from_numpy(np.stack([self._noisy(sc.draw(i)) for i in pair])))
            vid_t.append((int(sc.segment[pair[0]]) - 1) % len(SEGMENT_TINTS))
            shown = p["start"] <= pair[0] < p["start"] + p["length"]
            vid_tag.append(_token_cover(tag_box, (self.h, self.w), self.vid_hw) if shown else
                           np.zeros((self.vid_hw[0] // 28, self.vid_hw[1] // 28), bool))
            # the frame image: half the time a frame showing the tag, else any frame
            on = self.rng.random() < 0.5
            fi = int(self.rng.integers(p["start"], p["start"] + p["length"])) if on else int(
                self.rng.integers(0, p["n"]))
            frame = self._noisy(sc.draw(fi))
            imgs.append(torch.from_numpy(frame))
            if p["start"] <= fi < p["start"] + p["length"]:
                img_t.append(np.where(_token_cover(tag_box, (self.h, self.w), self.img_hw), p["slot"] + 1, 0))
            else:
                img_t.append(np.zeros((self.img_hw[0] // 28, self.img_hw[1] // 28), np.int64))
        m = self.m
        v = preprocess_video(vids, min_pixels=m.video_min_pixels, max_pixels=m.video_max_pixels)
        im = preprocess_images(imgs, min_pixels=m.image_min_pixels, max_pixels=m.image_max_pixels)
        cr = preprocess_images(crops, boxes=boxes, min_pixels=m.image_min_pixels, max_pixels=m.image_max_pixels)
        t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.long)   # noqa: E731
        return dict(video=v, image=im, crop=cr, vid_tint=t(vid_t), vid_tag=t(np.stack(vid_tag)).flatten(1),
                    img_slot=t(np.stack(img_t)).flatten(1), char=t(char_t), colour=t(col_t))


class _Heads(torch.nn.Module):
    def __init__(self, dim: int, tints: int, chars: int, colours: int):
        super().__init__()
        self.tint, self.tag = torch.nn.Linear(dim, tints), torch.nn.Linear(dim, 2)
        self.slot = torch.nn.Linear(dim, 5)
        self.char, self.colour = torch.nn.Linear(dim, chars), torch.nn.Linear(dim, colours)


def _losses(model, heads: _Heads, b: dict, char_weight: float = 1.0,
            tag_pos_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    from videocom_fast.modeling import vision_embeds

    ce = torch.nn.functional.cross_entropy
    vid = torch.stack(vision_embeds(model, *b["video"], video=True))          # (B, tokens, D)
    img = torch.stack(vision_embeds(model, *b["image"], video=False))
    # each crop's tokens pooled on their own: a crop's token count follows its box's aspect (a larger
    # image_min_pixels gives 16 tokens for one slot and 20 for the next)
    crop = torch.stack([e.mean(0) for e in vision_embeds(model, *b["crop"], video=False)])
    tint_logits = heads.tint(vid)
    out = {
        "tint": ce(tint_logits.flatten(0, 1), b["vid_tint"].repeat_interleave(vid.shape[1])),
        # at 1 no weight at all: the demo's loss stays the call it was (a [1, 1] weight gave equal values here)
        "tag": ce(heads.tag(vid).flatten(0, 1), b["vid_tag"].flatten(),
                  weight=None if tag_pos_weight == 1 else vid.new_tensor([1.0, tag_pos_weight])),
        "slot": ce(heads.slot(img).flatten(0, 1), b["img_slot"].flatten()),
        "char": ce(heads.char(crop), b["char"]),
        "colour": ce(heads.colour(crop), b["colour"]),
    }
    with torch.no_grad():
        tagged, vtagged = b["img_slot"] > 0, b["vid_tag"] > 0
        slot_pred, vtag_pred = heads.slot(img).argmax(-1), heads.tag(vid).argmax(-1)
        acc = {
            "tint": (tint_logits.argmax(-1) == b["vid_tint"][:, None]).float().mean().item(),
            "slot_on_tag": (slot_pred[tagged] == b["img_slot"][tagged]).float().mean().item()
            if tagged.any() else float("nan"),
            "tag_tokens": (vtag_pred[vtagged] == b["vid_tag"][vtagged]).float().mean().item()
            if vtagged.any() else float("nan"),
            "char": (heads.char(crop).argmax(-1) == b["char"]).float().mean().item(),
            "colour": (heads.colour(crop).argmax(-1) == b["colour"]).float().mean().item(),
        }
    total = sum(out.values()) + (char_weight - 1) * out["char"]
    return total, {**{k: v.item() for k, v in out.items()}, **{f"acc_{k}": v for k, v in acc.items()}}


def warm_up(model, out_dir, *, media, steps: int = 300, batch: int = 16, crops: int = 64, lr: float = 2e-3,
            char_weight: float = 4.0, tag_pos_weight: float = 1.0, seed: int = 0, width: int = 320,
            height: int = 192, fps: int = 4, seconds=(40, 40), log_every: int = 50, eval_batch: int = 64,
            log=print) -> dict:
    """Train the vision tower + merger of `model` ("tiny" = build a new tiny model, or a model dir) and
    save the whole model to `out_dir`. Returns the held-out head accuracies (fresh scenes) and timings.
    `tag_pos_weight`: the tag head's weight on the tokens that cover the tag (~1.3% of the main video's
    tokens: at 1 the head mostly learns "no tag"; docs/vision_demo.md, session 16)."""
    from videocom_fast.data.synth import SEGMENT_TINTS, TAG_CHARS, TAG_COLOURS
    from videocom_fast.evaluate import media_config_from
    from videocom_fast.modeling import inner
    from videocom_fast.models import build_tiny, load

    from .scenes import _prefetch

    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected an int >= 0, got {steps!r}")
    if not (isinstance(tag_pos_weight, (int, float)) and tag_pos_weight > 0):
        raise ValueError(f"tag_pos_weight: expected a number > 0, got {tag_pos_weight!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = build_tiny(out / "_base", seed=seed) if str(model) == "tiny" else Path(model)
    mc = media_config_from(media)
    torch.manual_seed(seed)
    net, processor = load(src)
    visual = inner(net).visual
    heads = _Heads(net.config.vision_config.out_hidden_size, len(SEGMENT_TINTS), len(TAG_CHARS), len(TAG_COLOURS))
    params = list(visual.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (
        1 + np.cos(np.pi * min(s, steps) / max(1, steps))))
    data = _Batches(mc, seed, width, height, fps, seconds)
    held = _Batches(mc, seed + 1, width, height, fps, seconds).make(eval_batch)
    t0, history = time.perf_counter(), []
    visual.train()
    batches = _prefetch(lambda: data.make(batch, crops))       # rendering overlaps the step (GIL released)
    for step in range(1, steps + 1):
        loss, parts = _losses(net, heads, next(batches), char_weight, tag_pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            history.append({"step": step, **parts})
            shown = ("acc_tint", "acc_tag_tokens", "acc_slot_on_tag", "acc_char", "acc_colour")
            log(f"perception step {step}/{steps} loss {loss.item():.3f} " +
                " ".join(f"{k} {parts[k]:.2f}" for k in shown))
    batches.close()                                           # stops the renderer
    visual.eval()
    with torch.no_grad():
        _, final = _losses(net, heads, held, tag_pos_weight=tag_pos_weight)
    train_s = time.perf_counter() - t0
    net.save_pretrained(out)
    processor.save_pretrained(out)
    if (src / "videocom_tiny.json").exists():
        shutil.copy(src / "videocom_tiny.json", out / "videocom_tiny.json")
    info = {"steps": steps, "batch": batch, "crops": crops, "lr": lr, "seed": seed, "train_s": round(train_s, 1),
            "held_out": {k: v for k, v in final.items() if k.startswith("acc_")}, "history": history}
    (out / "perception.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv=None) -> int:
    import argparse

    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs" / "sft_tiny.yaml"),
                    help="YAML whose `media` block gives the pixel limits")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crops", type=int, default=64, help="zoom crops per step (cheap: 4 tokens each)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    media = yaml.safe_load(open(a.config))["media"]
    info = warm_up(a.model, a.out_dir, media=media, steps=a.steps, batch=a.batch, crops=a.crops, lr=a.lr, seed=a.seed)
    print(json.dumps(info["held_out"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
