"""The synthesized default dataset: files, formats, determinism, and that its gold answers are true.

Truth is checked on the decoded videos, not on the generator's bookkeeping: the tag's light colour is
inside the gold box on every valid frame and absent there outside the valid frames; the gold chain
replayed through ManipulationEnv gets "ok" replies whose media are exactly the SFT observation turns.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re

import numpy as np
import pytest
from PIL import Image

from videocom_fast import protocol
from videocom_fast.data import synthesize
from videocom_fast.data.synth import COLOURS, INSTRUCTIONS, LETTERS, TAG_COLOURS, _plan
from videocom_fast.env import TEXT_FRAME, TEXT_SEGMENT, TEXT_ZOOM, ManipulationEnv, MediaConfig
from videocom_fast.media import FrameCache, open_video

NUM, FPS, SECONDS = 6, 8, (20, 26)
TAG_BG = np.array([235, 235, 225])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    seed = random.randrange(2**20)
    out = tmp_path_factory.mktemp("synth")
    paths = synthesize(out / "a", num_samples=NUM, seed=seed, fps=FPS, seconds=SECONDS)
    load = {k: json.load(open(paths[k])) for k in ("sft", "grpo", "eval")}
    return seed, out, paths, load


def _abs(paths, rel):
    return os.path.join(paths["out_dir"], rel)


def test_files_and_split(data):
    _, _, paths, d = data
    assert len(paths["videos"]) == NUM and all(os.path.getsize(v) > 0 for v in paths["videos"])
    assert len(d["sft"]) == len(d["grpo"]) == NUM - 1 and len(d["eval"]) == 1
    train_ids = {s["id"] for s in d["sft"]}
    assert train_ids == {s["id"] for s in d["grpo"]} and d["eval"][0]["id"] not in train_ids


@pytest.mark.slow
def test_deterministic_per_seed(data, tmp_path):
    seed, _, _, d = data
    again = synthesize(tmp_path / "b", num_samples=NUM, seed=seed, fps=FPS, seconds=SECONDS, workers=1)
    assert json.load(open(again["grpo"])) == d["grpo"] and json.load(open(again["sft"])) == d["sft"]
    # byte-identical videos, though the first run used 2 worker processes and this one a single process
    digest = lambda path: hashlib.sha256(open(path, "rb").read()).hexdigest()  # noqa: E731 (short diffs)
    assert [digest(v) for v in data[2]["videos"]] == [digest(v) for v in again["videos"]]
    other = synthesize(tmp_path / "c", num_samples=2, seed=seed + 1, fps=FPS, seconds=SECONDS)
    assert json.load(open(other["grpo"])) != d["grpo"][:1]


def test_videos_open_with_the_right_length(data):
    _, _, paths, d = data
    for s in d["grpo"] + d["eval"]:
        src = open_video(_abs(paths, s["video"]))
        assert src.fps == pytest.approx(FPS) and (src.height, src.width) == (192, 320)
        assert SECONDS[0] * FPS <= src.num_frames <= SECONDS[1] * FPS and src.num_frames % FPS == 0


def test_question_format(data):
    _, _, _, d = data
    for s in d["sft"] + d["eval"]:
        q = s["conversations"][0]["value"]
        assert q.startswith("<video>\n") and INSTRUCTIONS in q
        lines = q.split("\n")
        opts = [ln for ln in lines if ln.startswith("Options: ")]
        assert len(opts) == 1
        m = re.fullmatch(r"Options: A\. (.+), B\. (.+), C\. (.+), D\. (.+)", opts[0])
        assert m and len(set(m.groups())) == 4
    for s in d["grpo"] + d["eval"]:
        gold = s["conversations"][1]["value"]
        letter, text = gold.split(". ", 1)
        assert letter == s["answer"] and f"{letter}. {text}" in s["conversations"][0]["value"]


def test_annotations_are_true_in_the_pixels(data):
    """Tag colour inside the gold box on every valid frame; absent there away from the valid frames."""
    _, _, paths, d = data
    for s in d["grpo"] + d["eval"]:
        src = open_video(_abs(paths, s["video"]))
        (a, b), = s["valid_frames"]
        assert [f for f, _ in s["valid_bounding_box"]] == list(range(a, b + 1))
        x1, y1, x2, y2 = s["valid_bounding_box"][0][1]
        ranges = protocol.segment_ranges(src.num_frames, src.fps)
        (seg,) = s["valid_segments"]
        assert ranges[seg - 1][0] <= a - 1 and b <= ranges[seg - 1][1]

        def tag_fraction(frame_number):
            crop = src.get_frames([frame_number - 1])[0].numpy()[y1:y2, x1:x2].astype(int)
            return (np.abs(crop - TAG_BG).max(axis=2) < 25).mean()

        # the glyph covers part of the tag: bold wide glyphs leave ~40% of the box at the tag's background
        # colour (seen: 0.39-0.75 when present), against < 0.2 wherever the tag is absent
        assert all(tag_fraction(f) > 0.3 for f in range(a, b + 1)), [tag_fraction(f) for f in range(a, b + 1)]
        away = [f for f in (a - 3, b + 3, 1, src.num_frames) if 1 <= f <= src.num_frames and not a <= f <= b]
        assert all(tag_fraction(f) < 0.2 for f in away)


def test_character_colour_matches_the_plan(data):
    """The glyph's ink in the decoded video has the colour the sample was planned with (every sample: the
    default questions ask for the character, so the colour is checked against the plan, not the answer)."""
    seed, _, paths, d = data
    hw = protocol.smart_resize(192, 320, min_pixels=MediaConfig().image_min_pixels,
                               max_pixels=MediaConfig().image_max_pixels)
    for s in d["grpo"] + d["eval"]:
        plan = _plan(int(s["id"].rsplit("_", 1)[1]), seed, 320, 192, FPS, SECONDS, hw)
        assert LETTERS[plan["answer"]] == s["answer"] and s["question_type"] == plan["qtype"] == "character"
        src = open_video(_abs(paths, s["video"]))
        f, (x1, y1, x2, y2) = s["valid_bounding_box"][len(s["valid_bounding_box"]) // 2]
        crop = src.get_frames([f - 1])[0].numpy()[y1:y2, x1:x2].reshape(-1, 3).astype(int)
        far = np.abs(crop - TAG_BG).sum(axis=1)
        ink = np.median(crop[far >= np.quantile(far, 0.9)], axis=0)   # the strongest 10%: glyph cores
        dist = {name: np.abs(ink - np.array(COLOURS[name])).sum() for name in TAG_COLOURS}
        assert min(dist, key=dist.get) == plan["colour"]


def test_gold_chain_replays_through_the_env(data):
    _, _, paths, d = data
    cache = FrameCache()
    for s in d["sft"]:
        sample = dict(s, video=_abs(paths, s["video"]))
        env = ManipulationEnv(sample, cache=cache)
        conv = s["conversations"]
        gpt = [t["value"] for t in conv if t["from"] == "gpt"]
        obs_turns = [t for t in conv[1:] if t["from"] == "human"]
        assert len(gpt) == 4 and len(obs_turns) == 3
        texts = (TEXT_SEGMENT, TEXT_FRAME, TEXT_ZOOM)
        for k, (g, turn) in enumerate(zip(gpt, obs_turns)):
            obs = env.step(g)
            assert obs.reason == "ok" and turn["value"].endswith(texts[k])
            media = turn["media"]
            if k == 0:
                (item,) = obs.media
                tr = [(r["start"], r["end"]) for r in media["time_ranges"]]
                seg = int(re.search(r"= \[(\d+)\]", g).group(1))
                assert tr == protocol.segment_time_ranges(env.source.num_frames, env.source.fps, [seg])
                assert all(f - 1 in item.indices for f in media["frame_list"])
                assert media["frame_list"] == [int(f) for f in
                                               s["conversations"][0]["segment_frame_list"][str(seg)]]
            elif k == 1:
                (item,) = obs.media
                assert item.indices == (media["frame"] - 1,) and "bbox" not in media
                png = np.asarray(Image.open(_abs(paths, media["image"])))
                assert np.array_equal(png, item.frames[0].numpy())   # the PNG is the decoded frame
            else:
                assert [list(m.box) for m in obs.media] == media["bbox"]
                assert all(m.indices == (media["frame"] - 1,) for m in obs.media)
        final = env.step(gpt[3])
        assert final.done and final.action.values == gpt[3].split("FINAL_ANSWER: ")[1][0]


def test_assistant_turns_use_a_period_only_in_the_answer(data):
    # The gold rounds join reasoning and action with ", so": a "." before an action ("... 9. FINAL_ANSWER:
    # C. 9") taught the SFT tiny model to copy " FINAL" after the answer's "C." (docs/sft_curve.md).
    for s in data[3]["sft"]:
        gpt = [t["value"] for t in s["conversations"] if t["from"] == "gpt"]
        assert [g.count(".") for g in gpt] == [0, 0, 0, 1], gpt
        assert all(", so " in g for g in gpt) and re.search(r", so FINAL_ANSWER: [A-D]\. \S", gpt[3]), gpt


def test_num_eval_sets_the_held_out_split(tmp_path):
    small = dict(fps=4, seconds=(12, 12), width=160, height=96, workers=1)
    paths = synthesize(tmp_path / "a", num_samples=4, seed=5, num_eval=3, **small)
    train, held = json.load(open(paths["sft"])), json.load(open(paths["eval"]))
    assert [s["id"] for s in train] == ["sample_0000"] and [s["id"] for s in held] == [
        "sample_0001", "sample_0002", "sample_0003"]
    paths = synthesize(tmp_path / "b", num_samples=2, seed=5, num_eval=0, **small)
    assert len(json.load(open(paths["sft"]))) == 2 and json.load(open(paths["eval"])) == []
    for bad in (4, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_eval"):
            synthesize(tmp_path / "bad", num_samples=4, num_eval=bad, **small)


def test_vp9_and_validation(tmp_path):
    paths = synthesize(tmp_path, num_samples=1, seed=3, codec="vp9", fps=4, seconds=(12, 12),
                       width=160, height=96)
    assert paths["videos"][0].endswith(".webm") and json.load(open(paths["eval"])) == []
    src = open_video(paths["videos"][0])
    assert src.codec == "vp9" and src.num_frames == 48
    for kwargs, name in (({"num_samples": 0}, "num_samples"), ({"codec": "h265"}, "codec"),
                         ({"width": 321}, "width"), ({"seconds": (5, 2)}, "seconds"), ({"fps": 0}, "fps")):
        with pytest.raises(ValueError, match=name):
            synthesize(tmp_path / "bad", **kwargs)


def test_load_samples_accepts_the_files(data):
    schema = pytest.importorskip("videocom_fast.data.schema")
    _, _, paths, _ = data
    for kind, key in (("sft", "sft"), ("grpo", "grpo"), ("grpo", "eval")):
        samples = schema.load_samples(paths[key], kind=kind)
        assert samples and all(os.path.isabs(s["video"]) and os.path.exists(s["video"]) for s in samples)


def _texture_reference(rng, h, w):
    """The texture as first written (planar interpolation, torch's normal(0, 3) sum, clamp and cast): the
    rendered training streams' pixels (and so the demo's results) depend on these bytes."""
    import torch

    coarse = torch.from_numpy(rng.uniform(40, 200, size=(1, 3, h // 24 + 2, w // 24 + 2)).astype(np.float32))
    up = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    grain = torch.from_numpy(rng.normal(0, 3, size=(h, w, 1)).astype(np.float32))
    return (up.permute(1, 2, 0).contiguous() + grain).clamp_(0, 255).to(torch.uint8).numpy()


def test_texture_keeps_its_bytes():
    from videocom_fast.data.synth import _smooth_texture

    seeds = np.random.default_rng().integers(0, 2**31, 24)
    for k, seed in enumerate(seeds):
        h, w = [(240, 368), (192, 320), (31, 77), (401, 653)][k % 4]
        got = _smooth_texture(np.random.default_rng(seed), h, w)
        assert got.shape == (h, w, 3) and got.dtype == np.uint8 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, _texture_reference(np.random.default_rng(seed), h, w),
                                      err_msg=f"seed {seed} {h}x{w}")


def test_tag_patch_is_cached_and_read_only():
    from videocom_fast.data.synth import tag_patch

    a, b = tag_patch("O", np.array([200, 40, 40]), 37), tag_patch("O", (200, 40, 40), 37)
    assert a is b and a.shape == (37, 37, 3) and not a.flags.writeable
    assert not np.array_equal(a, tag_patch("X", (200, 40, 40), 37))
