"""Reference rollout loops (the baselines of bench_rollout.py and the oracle of tests/test_rollout*.py).

1. `naive_rollout` (Video-CoM style, spec section 8): one rollout at a time; every round rebuilds the whole
   conversation with ALL its media, runs transformers' processor on it again, and calls `generate` with a
   fresh prefill (vision tower on every item again). It follows the engine's protocol choices exactly
   (stopping.py, injected <|im_end|>, no dummy rounds, suppressed vision tokens, the original M-RoPE rule
   via `install_original_rope_index`) and keeps token ids as generated (no re-tokenization, defect 8), so
   in greedy float64 its token ids must equal the engine's.
2. `lockstep_rollouts` (TRL tool-loop style): all unfinished rollouts of a round generate together in one
   left-padded batched `generate`, then everyone re-prefills everything at the next round.

Media go through transformers' processors here (the external oracle of the pixel layout): images as the
reference did, PIL resize (fetch_image) then the PIL image processor; the engine uses videocom_fast.preprocess.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from videocom_fast.mrope import install_original_rope_index, mm_token_type_ids
from videocom_fast.protocol import smart_resize
from videocom_fast.rollout.stopping import action_line_done, has_answer, has_line_break

_PAD = {"image": "<|vision_start|><|image_pad|><|vision_end|>", "video": "<|vision_start|><|video_pad|><|vision_end|>"}


def _item_input(item):
    """What the processor takes for one MediaItem: the cropped frame (H, W, 3) or the frames (T, H, W, 3).

    Images are resized first as the reference's fetch_image does (qwen-vl-utils' smart_resize, PIL bicubic),
    so the processor's own resize is the identity. Without this, a thin crop (a side under 14 px, e.g. a
    6 x 183 zoom box) gets a different grid: transformers' smart_resize rounds that side to 0 and rescales
    by min_pixels (336 x 28), qwen-vl-utils raises it to 28 first (196 x 28)."""
    if item.kind == "image":
        f = item.frames[0]
        if item.box is not None:
            x1, y1, x2, y2 = (int(v) for v in item.box)
            f = f[y1:y2, x1:x2]
        h, w = smart_resize(f.shape[0], f.shape[1], min_pixels=item.min_pixels, max_pixels=item.max_pixels)
        img = Image.fromarray(np.ascontiguousarray(f.numpy())).resize((w, h), Image.Resampling.BICUBIC)
        return np.array(img)   # writable: the processor wraps it with torch.from_numpy
    return np.ascontiguousarray(item.frames.numpy())


@dataclass
class Conversation:
    """One episode as turns: user texts with media, and generated rounds as token ids (token in/out)."""
    question: str
    main: object
    rounds: list = field(default_factory=list)        # token ids of each round incl. its <|im_end|>
    injected: list = field(default_factory=list)      # per round: its <|im_end|> was injected, not sampled
    observations: list = field(default_factory=list)  # (text, media items) after each round but the last

    def pieces(self):
        """(text, items) per user turn, and round ids in between, in order: [(kind, payload), ...]."""
        out = [("user", (None, [self.main]))]
        for i, r in enumerate(self.rounds):
            out.append(("ids", r))
            if i < len(self.observations):
                out.append(("user", self.observations[i]))
        return out


_PIL_PROCESSORS: dict = {}


def pil_processor(processor):
    """`processor` with its image processor swapped for `Qwen2VLImageProcessorPil` (same settings).

    The reference fed PIL images to a PIL-based image processor; the torchvision-based default rescales and
    normalizes in another float order and differs by 1 fp32 ulp on some pixels (2.4e-7), enough to move a
    near-tie of a greedy argmax. The engine's fused kernel reproduces the PIL processor bit for bit."""
    key = id(processor)
    hit = _PIL_PROCESSORS.get(key)
    if hit is None or hit[0] is not processor:
        ip = processor.image_processor
        p = copy.copy(processor)
        p.image_processor = Qwen2VLImageProcessorPil(**{k: getattr(ip, k) for k in (
            "size", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")})
        hit = _PIL_PROCESSORS[key] = (processor, p)
    return hit[1]


def encode_conversation(processor, conv: Conversation) -> dict:
    """Re-run the processor over the whole conversation: ids (1, L) and every media tensor, from scratch."""
    processor = pil_processor(processor)
    ids, pv, ig, pvv, vg, sgt, spans = [], [], [], [], [], [], []
    for kind, payload in conv.pieces():
        if kind == "ids":
            spans.append((len(ids), len(ids) + len(payload)))
            ids.extend(payload)
            continue
        text, items = payload
        if text is None:   # the prompt: through the chat template itself
            msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": conv.question}]}]
            rendered = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        else:              # an observation after a round that ended at <|im_end|>
            rendered = ("\n<|im_start|>user\n" + "".join(_PAD[it.kind] for it in items) + text
                        + "<|im_end|>\n<|im_start|>assistant\n")
        imgs = [_item_input(it) for it in items if it.kind == "image"]
        vids = [_item_input(it) for it in items if it.kind == "video"]
        kw = {}
        if imgs:
            it = next(it for it in items if it.kind == "image")
            kw["images"] = imgs
            kw["images_kwargs"] = dict(size={"shortest_edge": it.min_pixels, "longest_edge": it.max_pixels})
        if vids:
            it = next(it for it in items if it.kind == "video")
            kw["videos"] = vids
            kw["videos_kwargs"] = dict(size={"shortest_edge": it.min_pixels, "longest_edge": it.max_pixels},
                                       do_sample_frames=False, cap_pixels_per_frame=False)
        out = processor(text=[rendered], return_tensors="pt", **kw)
        ids.extend(out["input_ids"][0].tolist())
        if imgs:
            pv.append(out["pixel_values"])
            ig.append(out["image_grid_thw"])
        if vids:
            pvv.append(out["pixel_values_videos"])
            vg.append(out["video_grid_thw"])
            sgt.extend(float(it.second_per_grid_t) for it in items if it.kind == "video")
    res = {"input_ids": torch.tensor([ids]), "round_spans": spans}
    if pv:
        res["pixel_values"], res["image_grid_thw"] = torch.cat(pv), torch.cat(ig)
    if pvv:
        res["pixel_values_videos"], res["video_grid_thw"] = torch.cat(pvv), torch.cat(vg)
        res["second_per_grid_ts"] = torch.tensor(sgt)
    return res


class _RoundStop(StoppingCriteria):
    """Per row: stop when the round's text completes an action line (stopping.py)."""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        done = []
        for row in input_ids:
            gen = row[self.prompt_len:].tolist()
            done.append(bool(gen) and has_line_break(self.tokenizer.decode(gen[-1:]))
                        and action_line_done(self.tokenizer.decode(gen)))
        return torch.tensor(done, device=input_ids.device)


class _Force(LogitsProcessor):
    """Scripted rounds still GENERATE (test/bench hook): row b's i-th new token is scripts[b][i] while its
    script lasts (every other logit -inf), so a scripted round costs what a free one does (prefill + one
    decode per token), as in the reference where the model emits these tokens itself. Rows whose script is
    None sample freely. Runs after generate's own processors (temperature, top-k), so the draw is certain."""

    def __init__(self, scripts: list, prompt_len: int):
        self.scripts, self.prompt_len = scripts, prompt_len

    def __call__(self, input_ids, scores):
        i = input_ids.shape[1] - self.prompt_len
        for b, sc in enumerate(self.scripts):
            if sc is not None and i < len(sc):
                scores[b] = float("-inf")
                scores[b, sc[i]] = 0.0
        return scores


def _cut_round(tokenizer, gen: list[int], im_end: int, max_new_tokens: int) -> tuple[list[int], bool, bool]:
    """Apply the round stopping rule to a token list: (round ids incl. <|im_end|>, sampled_end, truncated)."""
    for i, t in enumerate(gen[:max_new_tokens]):
        if t == im_end:
            return gen[:i + 1], True, False
        if has_line_break(tokenizer.decode([t])) and action_line_done(tokenizer.decode(gen[:i + 1])):
            return gen[:i + 1] + [im_end], False, False
    return gen[:max_new_tokens] + [im_end], False, True


def _media_kwargs(enc: dict, model) -> dict:
    cfg = model.config
    kw = {k: enc[k].to(model.device) for k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                               "video_grid_thw", "second_per_grid_ts") if k in enc}
    for k in ("pixel_values", "pixel_values_videos"):
        if k in kw:
            kw[k] = kw[k].to(model.dtype)
    kw["mm_token_type_ids"] = mm_token_type_ids(enc["input_ids"], cfg.image_token_id, cfg.video_token_id).to(model.device)
    return kw


def suppress_ids(tokenizer) -> list[int]:
    return tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
                                            "<|im_start|>"])


@dataclass
class NaiveResult:
    token_ids: list
    generated_mask: list
    round_texts: list
    finish_reason: str
    observations: list
    greedy_logprobs: list      # per generated token, log_softmax(logits / temperature) from generate's logits
    conversation: object = None   # the Conversation (lock-step fills it instead of token_ids: no final encode)


def naive_rollout(model, processor, env, *, max_rounds: int = 5, max_new_tokens: int = 512, greedy: bool = True,
                  temperature: float = 1.0, forced=None) -> NaiveResult:
    """One episode, the slow way. `forced(round_index) -> ids | None` scripts rounds (test hook; the scripted
    tokens are generated, see `_Force`)."""
    install_original_rope_index(model)
    tok = processor.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    main = env.main_video()
    conv = Conversation(env.question, main)
    gen_lp, obs_all, texts = [], [], []
    finish = "max_rounds"
    for r in range(max_rounds):
        enc = encode_conversation(processor, conv)
        script = forced(r) if forced is not None else None
        ids_1L = enc["input_ids"].to(model.device)
        L = ids_1L.shape[1]
        force = LogitsProcessorList([_Force([script], L)]) if script is not None else None
        out = model.generate(ids_1L, attention_mask=torch.ones_like(ids_1L), **_media_kwargs(enc, model),
                             max_new_tokens=max_new_tokens, do_sample=not greedy,
                             temperature=None if greedy else temperature, top_k=None, top_p=None,
                             suppress_tokens=suppress_ids(tok), eos_token_id=im_end, pad_token_id=tok.pad_token_id,
                             stopping_criteria=StoppingCriteriaList([_RoundStop(tok, L)]), logits_processor=force,
                             return_dict_in_generate=True, output_logits=True)
        gen = out.sequences[0, L:].tolist()
        ids, sampled_end, truncated = _cut_round(tok, gen, im_end, max_new_tokens)
        n_gen = len(ids) - (0 if sampled_end else 1)
        gen_lp.extend(float((out.logits[i][0].double() / temperature).log_softmax(-1)[ids[i]]) for i in range(n_gen))
        conv.rounds.append(ids)
        conv.injected.append(not sampled_end)
        text = tok.decode(ids[:-1])
        texts.append(text)
        if has_answer(text):
            obs = env.step(text)
            obs_all.append(obs)
            if obs.done:
                finish = "answer"
                break
            obs_all.pop()
        if r == max_rounds - 1:
            finish = "max_new_tokens" if truncated else "max_rounds"
            obs_all.append(None)
            break
        obs = env.step(text)
        obs_all.append(obs)
        if obs.done:
            finish = "answer"
            break
        conv.observations.append((obs.text, list(obs.media)))
    enc = encode_conversation(processor, conv)
    full = enc["input_ids"][0].tolist()
    mask = [False] * len(full)
    for (a, b), injected in zip(enc["round_spans"], conv.injected):
        mask[a:b - (1 if injected else 0)] = [True] * (b - a - (1 if injected else 0))
    return NaiveResult(full, mask, texts, finish, obs_all, gen_lp)


# --- lock-step baseline (TRL tool-loop style) ----------------------------------------------------------


def _batch(encs: list[dict], pad_id: int, model) -> dict:
    """Left-pad several encoded conversations into one batch; media concatenated in row order."""
    L = max(e["input_ids"].shape[1] for e in encs)
    ids = torch.full((len(encs), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(encs), L), dtype=torch.long)
    for i, e in enumerate(encs):
        n = e["input_ids"].shape[1]
        ids[i, L - n:] = e["input_ids"][0]
        att[i, L - n:] = 1
    out = {"input_ids": ids}
    for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        parts = [e[k] for e in encs if k in e]
        if parts:
            out[k] = torch.cat(parts)
    kw = _media_kwargs(out, model)
    kw["mm_token_type_ids"] = kw["mm_token_type_ids"] * att.to(kw["mm_token_type_ids"].device)
    return ids.to(model.device), att.to(model.device), kw


def lockstep_rollouts(model, processor, envs: list, *, num_generations: int = 8, max_rounds: int = 5,
                      max_new_tokens: int = 512, temperature: float = 0.9, top_k: int = 50, top_p: float = 1.0,
                      seed: int = 0, forced=None, max_batch: int | None = None) -> list[list[NaiveResult]]:
    """All unfinished rollouts of all samples generate each round in ONE batched `generate` (full re-prefill),
    or in batches of `max_batch` rows when memory needs it (128 rows x 4k tokens of padded prefill OOM'd 24 GiB).

    `forced(sample_index, rollout_index, round_index) -> ids | None` scripts rounds (`_Force`: scripted rows
    generate their script token by token in the same batch)."""
    install_original_rope_index(model)
    torch.manual_seed(seed)
    tok = processor.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    rollouts = []   # (sample index, env, conv, texts, finish)
    for si, env in enumerate(envs):
        main = env.main_video()
        for _ in range(num_generations):
            rollouts.append(dict(si=si, ri=len([r for r in rollouts if r["si"] == si]), env=env.fork(),
                                 conv=Conversation(env.question, main), texts=[], finish=None))
    for r in range(max_rounds):
        active = [ro for ro in rollouts if ro["finish"] is None]
        if not active:
            break
        scripts = [forced(ro["si"], ro["ri"], r) if forced is not None else None for ro in active]
        rows = [None] * len(active)
        encs = [encode_conversation(processor, ro["conv"]) for ro in active]   # everyone re-prefills
        step = max_batch or len(active)
        for b0 in range(0, len(active), step):
            part = list(range(b0, min(b0 + step, len(active))))
            ids, att, kw = _batch([encs[i] for i in part], tok.pad_token_id, model)
            L = ids.shape[1]
            force = [scripts[i] for i in part]
            out = model.generate(ids, attention_mask=att, **kw, max_new_tokens=max_new_tokens, do_sample=True,
                                 temperature=temperature, top_k=top_k, top_p=top_p,
                                 suppress_tokens=suppress_ids(tok), eos_token_id=im_end,
                                 pad_token_id=tok.pad_token_id,
                                 stopping_criteria=StoppingCriteriaList([_RoundStop(tok, L)]),
                                 logits_processor=LogitsProcessorList([_Force(force, L)]) if any(force) else None)
            for i, row in zip(part, out[:, L:].tolist()):
                rows[i] = row
        for ro, row in zip(active, rows):
            gen_ids, sampled_end, truncated = _cut_round(tok, row, im_end, max_new_tokens)
            conv = ro["conv"]
            conv.rounds.append(gen_ids)
            conv.injected.append(not sampled_end)
            text = tok.decode(gen_ids[:-1])
            ro["texts"].append(text)
            if has_answer(text) and ro["env"].step(text).done:
                ro["finish"] = "answer"
            elif r == max_rounds - 1:
                ro["finish"] = "max_new_tokens" if truncated else "max_rounds"
            else:
                obs = ro["env"].step(text)
                conv.observations.append((obs.text, list(obs.media)))
    results = [[] for _ in envs]
    for ro in rollouts:
        conv = ro["conv"]
        n_gen = sum(len(x) - (1 if inj else 0) for x, inj in zip(conv.rounds, conv.injected))
        results[ro["si"]].append(NaiveResult([], [True] * n_gen, ro["texts"], ro["finish"], [], [], conv))
    return results
