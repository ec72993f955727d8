"""Greedy episodes with a naive loop, to check what SFT taught: well-formed chains that use manipulations.

    summary = run_episodes(model, processor, samples, media_config, max_rounds=5, max_new_tokens=64)
    summary["well_formed"], summary["uses_manipulations"], summary["good"]   # fractions over episodes

Per round: rebuild the whole conversation (ChatTokens, media of every observation so far preprocessed
again), then transformers' `generate` with a fresh prefill after `install_original_rope_index` (so the
positions follow the original M-RoPE rule); the round's text goes to `ManipulationEnv.step`. Deliberately
slow and simple: it is an oracle-style loop for tests and the SFT curve, not the rollout engine.
"""
from __future__ import annotations

import torch

from videocom_fast.chat import ChatTokens, num_media_tokens
from videocom_fast.mrope import install_original_rope_index, mm_token_type_ids
from videocom_fast.protocol import parse_actions
from videocom_fast.rewards import format_reward

from .sft_data import preprocess_items


def _inputs(ids, media, chat, device):
    processed = preprocess_items(media)
    batch = {"input_ids": torch.tensor([ids], device=device)}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["mm_token_type_ids"] = mm_token_type_ids(batch["input_ids"], chat.image_pad, chat.video_pad)
    imgs = [p for m, p in zip(media, processed) if m.kind == "image"]
    vids = [(m, p) for m, p in zip(media, processed) if m.kind == "video"]
    if imgs:
        batch["pixel_values"] = torch.cat([p for p, _ in imgs]).to(device)
        batch["image_grid_thw"] = torch.cat([g for _, g in imgs]).to(device)
    if vids:
        batch["pixel_values_videos"] = torch.cat([p for _, (p, _) in vids]).to(device)
        batch["video_grid_thw"] = torch.cat([g for _, (_, g) in vids]).to(device)
        batch["second_per_grid_ts"] = torch.tensor([m.second_per_grid_t for m, _ in vids], device=device)
    return batch, [num_media_tokens(g[0]) for _, g in processed]


@torch.no_grad()
def run_episode(model, processor, sample: dict, media_config, *, cache=None, max_rounds: int = 5,
                max_new_tokens: int = 64) -> dict:
    from videocom_fast.env import ManipulationEnv

    chat = ChatTokens(processor.tokenizer)
    env = ManipulationEnv(sample, cache=cache, config=media_config)
    media = [env.main_video()]
    _, n = _inputs([], media, chat, "cpu")
    ids = chat.prompt(env.question, [("video", n[0])])
    rounds, reasons = [], []
    device = next(model.parameters()).device
    for _ in range(max_rounds):
        batch, _ = _inputs(ids, media, chat, device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=chat.im_end, pad_token_id=processor.tokenizer.pad_token_id)
        new = out[0, len(ids):].tolist()
        ended = bool(new) and new[-1] == chat.im_end
        text = chat.decode(new[:-1] if ended else new)
        rounds.append(text)
        obs = env.step(text)
        reasons.append(obs.reason)
        if obs.done:
            break
        ids = ids + (new if ended else new + [chat.im_end])
        _, n = _inputs([], obs.media, chat, "cpu") if obs.media else (None, [])
        ids += chat.observation(obs.text, [(m.kind, k) for m, k in zip(obs.media, n)])
        media += obs.media
    completion = "\n".join(rounds)
    kinds = [a.kind for a in parse_actions(completion)]
    return {"rounds": rounds, "reasons": reasons, "completion": completion,
            "well_formed": format_reward([completion])[0] == 1.0,
            "uses_manipulations": any(k in ("segment", "frame", "zoom") for k in kinds),
            "actions": kinds}


def run_episodes(model, processor, samples, media_config, **kw) -> dict:
    from videocom_fast.media import FrameCache

    install_original_rope_index(model)
    model.eval()
    cache = kw.pop("cache", None) or FrameCache()
    eps = [run_episode(model, processor, s, media_config, cache=cache, **kw) for s in samples]
    n = max(len(eps), 1)
    return {"episodes": eps,
            "well_formed": sum(e["well_formed"] for e in eps) / n,
            "uses_manipulations": sum(e["uses_manipulations"] for e in eps) / n,
            "good": sum(e["well_formed"] and e["uses_manipulations"] for e in eps) / n}
