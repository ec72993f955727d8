"""Shared fixtures of the rollout tests and bench: a tiny Qwen2.5-VL, a small synthesized dataset, small
media budgets, and scripted ("forced") rounds that exercise all three manipulations on a random model.

The SFT helper's fitted model (tests/fixtures_sft.py `sft_tiny_model`) makes greedy episodes emit actions
by themselves; until it exists, forced rounds do: rounds 1-3 are scripted FIND_SEGMENT / FIND_FRAME /
SPATIAL_ZOOM lines (valid for the sample, so the env returns media), later rounds are the model's own.
Scripts run through the engine's whole decode path (one token per step, KV written as usual); only the
sampled token is replaced.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Small media budgets (the spec's are 32 frames / 360*420 video, 128*28*28 images): a few visual tokens
# per item keep each test file well under a minute on 2 CPU cores.
SMALL_MEDIA = dict(main_nframes=8, rewatch_nframes=4, video_min_pixels=16 * 28 * 28,
                   video_max_pixels=24 * 28 * 28, image_min_pixels=4 * 28 * 28, image_max_pixels=16 * 28 * 28)


def media_config():
    from videocom_fast.env import MediaConfig
    return MediaConfig(**SMALL_MEDIA)


def make_tiny(path) -> Path:
    from videocom_fast.models import build_tiny
    path = Path(path)
    if not (path / "config.json").exists():
        build_tiny(path, seed=0)
    return path


def make_data(path, num_samples: int = 18) -> list[dict]:
    """GRPO-format samples (absolute video paths) of a small synthesized dataset."""
    from videocom_fast.data.synth import synthesize
    path = Path(path)
    if not (path / "grpo.json").exists():
        synthesize(path, num_samples=num_samples, seed=0, seconds=(20, 30), width=160, height=96,
                   media_config=media_config())
    samples = json.loads((path / "grpo.json").read_text())
    for s in samples:
        s["video"] = os.path.join(path, s["video"])
    return samples


def env_factory(cache=None):
    from videocom_fast.env import ManipulationEnv
    from videocom_fast.media import FrameCache
    cache = cache or FrameCache()
    cfg = media_config()
    return lambda sample: ManipulationEnv(sample, cache=cache, config=cfg)


def zoom_box(sample) -> list[int]:
    """A box in the resized frame's coordinates (what the model sees), from the gold box when known."""
    from videocom_fast.protocol import smart_resize
    from videocom_fast.env import resized_box_to_original  # noqa: F401 - the env maps it back
    cfg = media_config()
    from videocom_fast.media import open_video
    src = open_video(sample["video"])
    h, w = smart_resize(src.height, src.width, min_pixels=cfg.image_min_pixels, max_pixels=cfg.image_max_pixels)
    if sample.get("valid_bounding_box"):
        _, (x1, y1, x2, y2) = sample["valid_bounding_box"][0]
        sx, sy = w / src.width, h / src.height
        b = [int(x1 * sx), int(y1 * sy), max(int(x2 * sx), int(x1 * sx) + 8), max(int(y2 * sy), int(y1 * sy) + 8)]
        return [min(b[0], w - 8), min(b[1], h - 8), min(b[2], w), min(b[3], h)]
    return [0, 0, w // 2, h // 2]


def forced_scripts(samples, tokenizer, *, variant_newline: bool = True):
    """forced(sample_index, rollout_index, round_index) -> ids | None: segment, frame, zoom, then free.

    Odd rollouts end their action lines with "\\n..." instead of <|im_end|> (the engine injects it)."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cache = {}

    def texts(si):
        if si not in cache:
            s = samples[si]
            seg = s.get("valid_segments", [1])[0]
            frame = s.get("valid_frames", [[1, 1]])[0][0]
            x1, y1, x2, y2 = zoom_box(s)
            cache[si] = [f"The tag shows in one part. FIND_SEGMENT(the tag) = [{seg}]",
                         f"Look at the frame. FIND_FRAME(the tag) = {frame}",
                         f"Zoom in. SPATIAL_ZOOM(the tag) = [{x1}, {y1}, {x2}, {y2}]"]
        return cache[si]

    memo = {}

    def forced(si, ri, r):
        key = (si, ri % 2, r)
        if key not in memo:
            t = texts(si)
            memo[key] = None if r >= len(t) else tokenizer(t[r], add_special_tokens=False)["input_ids"] + (
                tokenizer("\nand more", add_special_tokens=False)["input_ids"] if ri % 2 else [im_end])
        return memo[key]

    return forced


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("rollout_tiny"))


@pytest.fixture(scope="session")
def rollout_samples(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("rollout_data"))


def teacher_logits(model, traj, suppress) -> torch.Tensor:
    """float64 CPU (N, V) logits at the positions that predict each generated token; suppressed ids -inf."""
    from videocom_fast import modeling
    from videocom_fast.training.logprobs import generated_index, media_embeds

    device = modeling.lm_head(model).weight.device
    ids_L = torch.as_tensor(traj.token_ids, dtype=torch.long, device=device)
    pos_3L = torch.as_tensor(traj.position_ids, dtype=torch.long).to(device)
    with torch.no_grad():
        x_LD = modeling.embed(model, ids_L, media_embeds(model, traj, ids_L))
        hidden_LD = modeling.text_forward(model, x_LD[None], pos_3L[:, None, :])[0]
        logits = modeling.lm_head(model)(hidden_LD[generated_index(traj).to(device) - 1]).double().cpu()
    logits[:, suppress] = float("-inf")
    return logits


def assert_greedy_equal_up_to_near_tie(got, want_ids, fast_model, exact_model, suppress, what: str):
    """The engine's greedy episode `got` (a Trajectory) has the token ids `want_ids` (the naive loop's), or
    they part at a GENERATED token where the exact (float64) model's logits, teacher-forced along `got` (its
    prefix is the naive loop's up to there), rank the two picks within 2x `fast_model`'s measured logit
    error per side (flash-attention's rule): a near-tie that the fast dtype may flip."""
    if got.token_ids == want_ids:
        return
    k = next((i for i, (a, b) in enumerate(zip(got.token_ids, want_ids)) if a != b), None)
    assert k is not None, f"{what}: one episode is a prefix of the other"
    assert got.generated_mask[k], f"{what}: episodes differ at env token {k}"
    ref = teacher_logits(exact_model, got, suppress)
    err = (teacher_logits(fast_model, got, suppress) - ref).nan_to_num(posinf=0, neginf=0).abs().max()
    tol = 2 * 2 * float(err)
    n = sum(got.generated_mask[:k])                                # row of token k in `ref`
    gap = float(ref[n, want_ids[k]] - ref[n, got.token_ids[k]])
    assert abs(gap) <= tol, (f"{what}: left the naive greedy path at token {k} ({got.token_ids[k]} vs "
                             f"{want_ids[k]}) without a near-tie: float64 gap {gap:.3g}, allowed {tol:.3g}")
