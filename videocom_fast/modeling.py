"""Driving a transformers Qwen2.5-VL without `generate`: vision tower, embedding scatter, text forward.

Shared by the rollout engine, SFT and GRPO so that all three run the same arithmetic (FACTS.md: this path
is exact against the model's own forward when positions are passed explicitly).

Legend: L tokens, D hidden, N media items, P patches (rows of pixel_values).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F


def inner(model):
    """The Qwen2_5_VLModel inside a ForConditionalGeneration (or the model itself); unwraps peft/DDP."""
    m = model
    for attr in ("module", "base_model", "model"):
        while hasattr(m, attr) and not hasattr(m, "visual") and not hasattr(m, "language_model"):
            m = getattr(m, attr)
    if hasattr(m, "model") and hasattr(m.model, "visual"):
        m = m.model
    return m


def lm_head(model):
    m = model
    while not hasattr(m, "lm_head"):
        m = m.module if hasattr(m, "module") else m.base_model if hasattr(m, "base_model") else m.model
    return m.lm_head


def vision_embeds(model, pixel_values_PC, grid_thw_N3, *, video: bool,
                  patch_matmul: bool = False) -> list[torch.Tensor]:
    """One (t*h*w/4, D) tensor per media item, after the merger (one vision-tower call for all items).
    `patch_matmul`: run the patch embedding as a matmul (see `patch_embed_as_matmul`; inference only)."""
    m = inner(model)
    if grid_thw_N3 is None or grid_thw_N3.numel() == 0:
        return []
    fn = m.get_video_features if video else m.get_image_features
    with patch_embed_as_matmul(model) if patch_matmul else nullcontext():
        out = fn(pixel_values_PC, grid_thw_N3)
    return list(out.pooler_output if hasattr(out, "pooler_output") else out)


@contextmanager
def patch_embed_as_matmul(model):
    """Within the block, the vision tower's patch embedding runs as one matmul.

    Qwen2.5-VL embeds patches with a Conv3d whose kernel equals its stride, applied to rows of pixel_values
    that already ARE flattened (C, T, p, p) patches: that is `rows @ W.view(E, -1).T`. oneDNN's conv3d took
    ~4x the matmul's time here (25 ms per 32-frame video, ~7% of the engine's time at the spec's budgets).
    Same numbers up to summation order (tests/test_modeling.py). Leaves any other patch module untouched."""
    pe = getattr(getattr(inner(model), "visual", None), "patch_embed", None)
    conv = getattr(pe, "proj", None)
    if (type(conv) is not torch.nn.Conv3d or tuple(conv.kernel_size) != tuple(conv.stride) or any(conv.padding)
            or conv.groups != 1 or pe._forward_hooks or pe._forward_pre_hooks or conv._forward_hooks
            or conv._forward_pre_hooks or "forward" in vars(pe)):
        yield
        return
    w = conv.weight

    def forward(hidden_states):
        x = hidden_states.to(w.dtype).reshape(-1, w[0].numel())
        return F.linear(x, w.reshape(w.shape[0], -1), conv.bias)

    pe.forward = forward
    try:
        yield
    finally:
        del pe.forward


def embed(model, input_ids_L, media_embeds: list[torch.Tensor] = ()) -> torch.Tensor:
    """(L, D) input embeddings with media features scattered at the pad positions, in sequence order.

    `media_embeds` holds one tensor per vision block of the sequence, images and videos interleaved in the
    order their blocks appear; each must have as many rows as its block has pad tokens.
    """
    m = inner(model)
    cfg = m.config
    x = m.get_input_embeddings()(input_ids_L)
    if not media_embeds:
        return x
    is_pad = (input_ids_L == cfg.image_token_id) | (input_ids_L == cfg.video_token_id)
    feats = torch.cat([e.to(x.dtype) for e in media_embeds], dim=0)
    n_pad = int(is_pad.sum())
    if n_pad != feats.shape[0]:
        raise ValueError(f"embed: the sequence has {n_pad} media pad tokens but {feats.shape[0]} media "
                         f"feature rows were given ({len(media_embeds)} items)")
    return x.masked_scatter(is_pad.unsqueeze(-1), feats)


def text_forward(model, inputs_embeds_BLD, position_ids_3BL, **attn_kwargs):
    """Last hidden states (B, L, D) of the language model with explicit 3-D positions.

    NOTE: positions are always explicit; without them transformers reuses a stale rope_deltas (FACTS.md).
    """
    m = inner(model)
    out = m.language_model(inputs_embeds=inputs_embeds_BLD, position_ids=position_ids_3BL, use_cache=False,
                           **attn_kwargs)
    return out.last_hidden_state


def chunked_token_logprobs(model, hidden_LD, target_ids_L, *, temperature: float = 1.0,
                           chunk: int = 1024) -> torch.Tensor:
    """log p(target_i | hidden_i) in fp32, `chunk` rows of full-vocabulary logits at a time.

    Reference defect 9 (spec section 7): the reference took log-softmax in bf16; here logits are upcast.
    """
    head = lm_head(model)
    out = []
    for s in range(0, hidden_LD.shape[0], chunk):
        logits = head(hidden_LD[s:s + chunk])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
        out.append(torch.gather(logits.log_softmax(-1), -1, target_ids_L[s:s + chunk, None]).squeeze(-1))
    return torch.cat(out) if out else hidden_LD.new_zeros(0, dtype=torch.float32)
