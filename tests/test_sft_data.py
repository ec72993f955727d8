"""SFT tokenization and media: ids against transformers' chat template + processor, labels, M-RoPE positions
against an independent implementation of the original rule, media against the environment's replay."""
import copy
import json

import pytest
import torch

from fixtures_sft import synth_small, tiny_dir  # noqa: F401
from videocom_fast.training.sft_data import (IGNORE_INDEX, MediaResolver, SFTDataset, build_example,
                                             preprocess_items, strip_media_tags)


@pytest.fixture(scope="module")
def setup(synth_small, tiny_dir):  # noqa: F811
    from videocom_fast.models import load

    data, mc = synth_small
    _, processor = load(tiny_dir)
    samples = json.loads((data / "sft.json").read_text())
    ds = SFTDataset(samples, processor.tokenizer, mc, media_root=data)
    return data, mc, processor, samples, ds


def _abs(sample, data):
    s = copy.deepcopy(sample)
    s["video"] = str(data / s["video"])
    return s


def test_labels_are_exactly_the_assistant_turns(setup):
    data, mc, processor, samples, ds = setup
    tok = processor.tokenizer
    for i, s in enumerate(samples):
        ex = ds[i]
        trained = ex.labels != IGNORE_INDEX
        assert torch.equal(ex.labels[trained], ex.input_ids[trained])
        want = "".join(t["value"] + "<|im_end|>\n" for t in s["conversations"] if t["from"] == "gpt")
        assert tok.decode(ex.input_ids[trained]) == want
        # every trained run is preceded by the assistant header, never by media or user text
        starts = [j for j in range(1, len(trained)) if trained[j] and not trained[j - 1]]
        header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        for j in starts:
            assert ex.input_ids[j - len(header):j].tolist() == header


def test_ids_equal_chat_template_plus_processor(setup):
    """Oracle: transformers' apply_chat_template + Qwen2_5_VLProcessor given the same frames and limits."""
    data, mc, processor, samples, ds = setup
    s = samples[0]
    res = MediaResolver(mc, media_root=data)
    messages, images, videos = [], [], []
    for t, turn in enumerate(s["conversations"]):
        if turn["from"] == "gpt":
            messages.append({"role": "assistant", "content": turn["value"]})
            continue
        specs = [res.main_video(_abs(s, data), None)] if t == 0 else \
            res.turn_media(_abs(s, data), turn["media"], "x") if turn.get("media") else []
        content = []
        for sp in specs:
            if sp.kind == "video":
                videos.append(sp.frames)
                content.append({"type": "video"})
            else:
                fr = sp.frames[0]
                if sp.box is not None:
                    x1, y1, x2, y2 = sp.box
                    fr = fr[y1:y2, x1:x2]
                images.append(fr.numpy())
                content.append({"type": "image"})
        content.append({"type": "text", "text": strip_media_tags(turn["value"])})
        messages.append({"role": "user", "content": content})
    text = processor.apply_chat_template(messages, tokenize=False)
    out = processor(text=[text], images=images, videos=videos, return_tensors="pt",
                    images_kwargs={"min_pixels": mc.image_min_pixels, "max_pixels": mc.image_max_pixels},
                    videos_kwargs={"min_pixels": mc.video_min_pixels, "max_pixels": mc.video_max_pixels,
                                   "do_sample_frames": False})
    ex = ds[0]
    assert out["input_ids"][0].tolist() == ex.input_ids.tolist()
    assert torch.equal(out["image_grid_thw"], ex.image_grid_thw)
    assert torch.equal(out["video_grid_thw"], ex.video_grid_thw)


def _naive_original_rope(ids, image_id, video_id, vstart_id, image_grids, video_grids, sgts, tps=2):
    """The rule of spec section 4 written out token by token (independent of videocom_fast.mrope)."""
    pos, nxt, i, ki, kv = [], 0, 0, 0, 0
    ids = ids.tolist()
    while i < len(ids):
        if ids[i] in (image_id, video_id):
            video = ids[i] == video_id
            t, h, w = (int(x) for x in (video_grids[kv] if video else image_grids[ki]))
            step = tps * float(sgts[kv]) if video else 1.0
            start, block = nxt, []
            for a in range(t):
                for b in range(h // 2):
                    for c in range(w // 2):
                        block.append((start + int(a * torch.tensor(step, dtype=torch.float32)), start + b, start + c))
            pos += block
            i += len(block)
            nxt = max(max(p) for p in block) + 1
            kv, ki = (kv + 1, ki) if video else (kv, ki + 1)
        else:
            pos.append((nxt, nxt, nxt))
            nxt += 1
            i += 1
    return torch.tensor(pos).T


def test_positions_follow_the_original_rule(setup):
    data, mc, processor, samples, ds = setup
    tok = processor.tokenizer
    c = tok.convert_tokens_to_ids
    for i in range(len(samples)):
        ex = ds[i]
        want = _naive_original_rope(ex.input_ids, c("<|image_pad|>"), c("<|video_pad|>"), c("<|vision_start|>"),
                                    ex.image_grid_thw, ex.video_grid_thw, ex.second_per_grid_ts)
        assert torch.equal(ex.position_ids, want)


def test_image_only_positions_equal_transformers_get_rope_index(setup, tiny_dir):  # noqa: F811
    """On text + images transformers 5.23's get_rope_index agrees with the original rule: use it as oracle."""
    from videocom_fast.models import load
    from videocom_fast.mrope import mm_token_type_ids

    data, mc, processor, samples, ds = setup
    model, _ = load(tiny_dir)
    s = copy.deepcopy(samples[1])
    del s["video"]  # turn 0 without a video; the image turns read their PNG files
    for turn in s["conversations"]:
        if isinstance(turn.get("media"), dict) and turn["media"]["type"] == "image":
            turn["media"].pop("frame")
    s["conversations"] = [t for t in s["conversations"] if (t.get("media") or {}).get("type") != "video"]
    ex = build_example(s, ds.chat, MediaResolver(mc, media_root=data))
    assert ex.video_grid_thw is None and ex.image_grid_thw.shape[0] >= 2
    ids = ex.input_ids[None]
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids(ids, ds.chat.image_pad, ds.chat.video_pad),
                                        ex.image_grid_thw, None, None, torch.ones_like(ids))
    assert torch.equal(pos[:, 0], ex.position_ids)


def test_media_equal_environment_replay(setup):
    """SFT shows the model exactly what ManipulationEnv.step shows during rollouts for the gold chain."""
    from videocom_fast.env import ManipulationEnv

    data, mc, processor, samples, ds = setup
    for i, s in enumerate(samples):
        env = ManipulationEnv(_abs(s, data), config=mc)
        items = [env.main_video()]
        for turn in s["conversations"]:
            if turn["from"] == "gpt":
                obs = env.step(turn["value"])
                assert obs.reason in ("ok", "answer"), obs.reason
                items += obs.media
        ex = ds[i]
        processed = preprocess_items(items)
        imgs = [p for it, p in zip(items, processed) if it.kind == "image"]
        vids = [p for it, p in zip(items, processed) if it.kind == "video"]
        assert ex.media_kinds == [it.kind for it in items]
        assert torch.equal(torch.cat([g for _, g in imgs]), ex.image_grid_thw)
        assert torch.equal(torch.cat([g for _, g in vids]), ex.video_grid_thw)
        assert torch.equal(torch.cat([p for p, _ in imgs]), ex.pixel_values)
        assert torch.equal(torch.cat([p for p, _ in vids]), ex.pixel_values_videos)
        want_sgt = torch.tensor([it.second_per_grid_t for it in items if it.kind == "video"])
        torch.testing.assert_close(ex.second_per_grid_ts, want_sgt)


def test_image_path_branch_equals_decoded_frame(setup):
    data, mc, processor, samples, ds = setup
    s = _abs(samples[0], data)
    media = next(t["media"] for t in s["conversations"] if (t.get("media") or {}).get("bbox"))
    res = MediaResolver(mc, media_root=data)
    decoded = res.turn_media(s, media, "x")
    from_png = res.turn_media({k: v for k, v in s.items() if k != "video"},
                              {k: v for k, v in media.items() if k != "frame"}, "x")
    assert len(decoded) == len(from_png) == len(media["bbox"])
    for a, b in zip(decoded, from_png):
        assert a.box == b.box and torch.equal(a.frames, b.frames)


def test_reference_bbox_rewrite():
    from videocom_fast.training.sft_data import _rescale_bbox_text

    text = "Zoom. SPATIAL_ZOOM(tag) = [100, 50, 300, 250]"
    out = _rescale_bbox_text(text, [[100, 50, 300, 250]], (720, 1280), (336, 588))
    sx, sy = 588 / 1280, 336 / 720
    assert out == f"Zoom. SPATIAL_ZOOM(tag) = [{int(100 * sx)}, {int(50 * sy)}, {int(300 * sx)}, {int(250 * sy)}]"


def test_bad_samples_raise_value_errors(setup):
    data, mc, processor, samples, ds = setup
    res = MediaResolver(mc, media_root=data)
    with pytest.raises(ValueError, match=r"samples\[3\]: 'conversations'"):
        build_example({"video": "x.mp4", "conversations": []}, ds.chat, res, index=3)
    bad = copy.deepcopy(samples[0])
    bad["conversations"][1]["from"] = "robot"
    with pytest.raises(ValueError, match=r"conversations\[1\]: 'from'"):
        build_example(bad, ds.chat, res)
    bad = copy.deepcopy(samples[0])
    img = next(t for t in bad["conversations"] if (t.get("media") or {}).get("type") == "image")
    img["media"]["frame"] = 10 ** 6
    with pytest.raises(ValueError, match="frame 1000000 outside"):
        build_example(bad, ds.chat, res)
    bad = copy.deepcopy(samples[0])
    img = next(t for t in bad["conversations"] if (t.get("media") or {}).get("bbox"))
    img["media"]["bbox"] = [[5, 5, 5, 9]]
    with pytest.raises(ValueError, match=r"bbox\[0\]"):
        build_example(bad, ds.chat, res)
    bad = copy.deepcopy(samples[0])
    bad["conversations"][2]["media"]["type"] = "audio"
    with pytest.raises(ValueError, match="media type"):
        build_example(bad, ds.chat, res)
