"""Packing SFT examples into one row per micro-batch, attention kept within each example, and the loss.

Legend: L packed tokens, N examples in the pack, D hidden, Hq/Hkv heads, Dh head dim.

Why: padding a batch of multi-turn video conversations to the longest wastes most of the compute (lengths
vary 3-10x); packing concatenates them into one row up to a token budget. Each example keeps its own M-RoPE
positions (they restart at 0), and attention must not cross examples:
- GPU with flash-attn importable: `flash_attn_varlen_func` with `cu_seqlens` (the FA2 varlen metadata);
- otherwise one causal SDPA call per example slice (exactly block-diagonal causal attention, O(sum L_i^2)),
  or, with CPU_CAUSAL set, training/causal_attention.py per slice (blocked matmuls around fused C++ softmax
  passes: faster than torch's CPU flash kernel alone, not beside a busy Python thread; see CPU_CAUSAL).
Both receive the metadata as `cu_seq_lens_q/k`, `max_length_q/k` kwargs, which transformers forwards
unchanged from `language_model(...)` to a registered attention function (FACTS.md). The vision tower keeps
its own attention (`set_attn_implementation({"text_config": ...})` touches only the LLM).

The loss is a token sum in fp32 (modeling.chunked_token_logprobs, never the full (L, V) logits), so
packed and unpacked runs give the same value up to summation order (tests/test_packing.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from videocom_fast.modeling import chunked_token_logprobs, embed, text_forward, vision_embeds

from . import causal_attention
from .sft_data import IGNORE_INDEX, SFTExample

ATTN_NAME = "videocom_packed"
# True: CPU float32 / float64 attention through training/causal_attention.py (opt-in). Measured on a 2-core
# AMD EPYC (AVX2), the demo's scene-SFT step, alternating steps: 1 torch thread 0.418 -> 0.375 s, 2 threads
# 0.335 -> 0.319 s, but with the demo's renderer thread beside the step 0.494 -> 0.577 s (its ~12 torch calls
# per block of 96 rows hand the GIL back each time; a 0.2 ms switch interval left 0.526 -> 0.557 s).
CPU_CAUSAL = False


# --- packing ---------------------------------------------------------------------------------------

def pack_indices(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Greedy packs in the given order: a pack is closed when the next example would exceed `max_tokens`.
    An example longer than the budget gets a pack of its own (never dropped silently)."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    packs, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if cur and used + n > max_tokens:
            packs.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        packs.append(cur)
    return packs


@dataclass
class PackedBatch:
    input_ids: torch.Tensor          # (L,)
    targets: torch.Tensor            # (L,) next-token target per position, -100 at each example's last token
    position_ids: torch.Tensor       # (3, 1, L), restarting per example
    cu_seqlens: torch.Tensor         # (N+1,) int32
    max_seqlen: int
    media_kinds: list[str]           # per vision block in sequence order
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    pixel_values_videos: torch.Tensor | None
    video_grid_thw: torch.Tensor | None
    num_visual_tokens: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_trained(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device):
        out = PackedBatch(**self.__dict__)
        for k, v in self.__dict__.items():
            # NOTE: cu_seqlens stays on the host: packed_attention slices by it there (on the device that is
            # a sync per layer); flash-attn's path copies it to the device itself
            if isinstance(v, torch.Tensor) and k != "cu_seqlens":
                setattr(out, k, v.to(device))
        return out


def _cat(xs):
    xs = [x for x in xs if x is not None]
    return torch.cat(xs) if xs else None


def collate(examples: list[SFTExample]) -> PackedBatch:
    if not examples:
        raise ValueError("collate: no examples")
    targets = []
    for ex in examples:
        t = ex.labels.roll(-1).clone()
        t[-1] = IGNORE_INDEX
        targets.append(t)
    lens = torch.tensor([ex.num_tokens for ex in examples])
    cu = torch.zeros(len(examples) + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    return PackedBatch(
        input_ids=torch.cat([ex.input_ids for ex in examples]),
        targets=torch.cat(targets),
        position_ids=torch.cat([ex.position_ids for ex in examples], dim=1).unsqueeze(1),
        cu_seqlens=cu, max_seqlen=int(lens.max()),
        media_kinds=[k for ex in examples for k in ex.media_kinds],
        pixel_values=_cat([ex.pixel_values for ex in examples]),
        image_grid_thw=_cat([ex.image_grid_thw for ex in examples]),
        pixel_values_videos=_cat([ex.pixel_values_videos for ex in examples]),
        video_grid_thw=_cat([ex.video_grid_thw for ex in examples]),
        num_visual_tokens=sum(ex.num_visual_tokens for ex in examples),
    )


# --- attention -------------------------------------------------------------------------------------

def block_causal_mask(cu_seqlens, length: int) -> torch.Tensor:
    """(L, L) bool, True where query i may attend key j: same example and j <= i (for tests/debugging)."""
    seg = torch.zeros(length, dtype=torch.long)
    for b, (s, e) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        seg[s:e] = b
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return causal & (seg[:, None] == seg[None, :])


def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
        return flash_attn_varlen_func
    except ImportError:
        return None


def packed_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """Causal attention within each packed example. query (1, Hq, L, Dh), key/value (1, Hkv, L, Dh) ->
    ((1, L, Hq, Dh), None). Without metadata: one causal sequence."""
    import torch.nn.functional as F

    L, Lk = query.shape[2], key.shape[2]
    if cu_seq_lens_q is None and Lk != L:
        # decoding against a KV cache (no packing): causal mask aligned to the last query
        mask = torch.ones(L, Lk, dtype=torch.bool, device=query.device).tril(Lk - L)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2), None
    cu = cu_seq_lens_q if cu_seq_lens_q is not None else torch.tensor([0, L], dtype=torch.int32)
    if query.is_cuda and (fa := _flash_varlen()) is not None:
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (L, H, Dh)
        cu_k = cu_seq_lens_k if cu_seq_lens_k is not None else cu
        out = fa(q, k, v, cu.to(q.device, torch.int32), cu_k.to(q.device, torch.int32),
                 max_length_q or L, max_length_k or L, dropout_p=dropout, softmax_scale=scaling, causal=True)
        return out.unsqueeze(0), None
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    if CPU_CAUSAL and not dropout and causal_attention.available(query):
        outs = [causal_attention.causal_attention(query[0, :, s:e], key[0, :, s:e], value[0, :, s:e], scaling)
                for s, e in bounds]
        return torch.cat(outs, dim=1).transpose(0, 1).unsqueeze(0), None
    gqa = query.shape[1] != key.shape[1]
    outs = []
    for s, e in bounds:
        outs.append(F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                                   is_causal=True, scale=scaling, enable_gqa=gqa))
    return torch.cat(outs, dim=2).transpose(1, 2), None


def install_packed_attention(model) -> None:
    """Register `packed_attention` and route the LLM's attention to it (the vision tower is untouched)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, packed_attention)
    model.set_attn_implementation({"text_config": ATTN_NAME})


def attention_kwargs(batch: PackedBatch) -> dict:
    return dict(cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
                max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen)


# --- forward and loss ------------------------------------------------------------------------------

def media_embeddings(model, batch: PackedBatch, *, grad: bool) -> list[torch.Tensor]:
    """Vision features per block in sequence order (one tower call per modality).

    With the tower's blocks frozen and only the merger trained (issue 17's SFT), the blocks run through the
    engine's `VisionForward` without autograd (same values, tests/test_vision_forward.py; ~3x faster on the
    CPU at the tiny model's sizes) and the merger as its module, under autograd."""
    fast = _frozen_tower_forward(model) if grad else None
    with torch.set_grad_enabled(grad):
        if fast is not None:
            imgs = iter(fast.trainable_merger(batch.pixel_values, batch.image_grid_thw))
            vids = iter(fast.trainable_merger(batch.pixel_values_videos, batch.video_grid_thw))
        else:
            imgs = iter(vision_embeds(model, batch.pixel_values, batch.image_grid_thw, video=False))
            vids = iter(vision_embeds(model, batch.pixel_values_videos, batch.video_grid_thw, video=True))
        return [next(imgs) if k == "image" else next(vids) for k in batch.media_kinds]


def _frozen_tower_forward(model):
    """A `VisionForward` for `model` when its tower blocks are frozen, its merger trains and it supports
    the model; else None. Kept on the tower module (weights are read at call time, never cached)."""
    from videocom_fast import vision_forward
    from videocom_fast.modeling import inner

    vis = inner(model).visual
    params = dict(vis.named_parameters())
    if any(p.requires_grad for n, p in params.items() if not n.startswith("merger.")) or \
            not any(p.requires_grad for n, p in params.items() if n.startswith("merger.")):
        return None
    fast = vis.__dict__.get("_videocom_frozen_forward")
    if fast is None:
        if vision_forward.supports(model) is not None:
            return None
        fast = vis.__dict__["_videocom_frozen_forward"] = vision_forward.VisionForward(model)
    return fast


def vision_trainable(model) -> bool:
    from videocom_fast.modeling import inner

    return any(p.requires_grad for p in inner(model).visual.parameters())


def packed_loss_sum(model, batch: PackedBatch, *, chunk: int = 1024, media=None) -> torch.Tensor:
    """Sum over trained tokens of -log p(target) in fp32, for one packed row (attention per example)."""
    if media is None:
        media = media_embeddings(model, batch, grad=vision_trainable(model))
    x = embed(model, batch.input_ids, media)
    hidden = text_forward(model, x.unsqueeze(0), batch.position_ids, **attention_kwargs(batch))[0]
    keep = batch.targets != IGNORE_INDEX
    logp = chunked_token_logprobs(model, hidden[keep], batch.targets[keep], chunk=chunk)
    return -logp.sum()
