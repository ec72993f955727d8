"""Teacher-forced log-probs of the generated tokens of a multi-turn Trajectory (policy, old policy, reference).

One forward over the whole episode exactly as the engine produced it: the Trajectory's token ids (no decode
and re-tokenize, defect 8), its media features scattered in sequence order, and its (3, L) M-RoPE positions
(defect 1: explicit 3-D positions always). Then the log-softmax is taken ONLY at the positions that predict
a generated token, in chunks of `chunk` rows, in fp32 (defect 9): full-vocabulary logits for the whole
sequence, (L, V), are never held; with autograd each chunk is checkpointed, so backward recomputes its
(chunk, V) logits instead of keeping every chunk's alive.

Generated token i (generated_mask[i] True) is predicted by the hidden state at i - 1, so the rows gathered
are `gen_idx - 1`. Output order = order of generated tokens in the sequence, matching `traj.logprobs` at
generated positions. Legend: L tokens, D hidden, N generated tokens, V vocabulary.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils.checkpoint import checkpoint

from videocom_fast import modeling, vision_forward
from videocom_fast.kernels.logprobs import token_logprobs

# --- what the forward needs from a Trajectory ----------------------------------------------------------


def generated_index(traj) -> torch.Tensor:
    """Indices (N,) of generated tokens in `traj.token_ids`; the first token can never be generated."""
    mask = torch.as_tensor(traj.generated_mask, dtype=torch.bool)
    if mask.shape[0] != len(traj.token_ids):
        raise ValueError(f"trajectory {traj.sample_index}/{traj.rollout_index}: generated_mask has "
                         f"{mask.shape[0]} entries for {len(traj.token_ids)} tokens")
    if mask.numel() and bool(mask[0]):
        raise ValueError(f"trajectory {traj.sample_index}/{traj.rollout_index}: token 0 is marked generated "
                         "but nothing precedes it")
    return mask.nonzero().squeeze(-1)


def sampling_logprobs(traj) -> torch.Tensor:
    """fp32 (N,) log-probs the engine recorded when sampling, at generated positions."""
    idx = generated_index(traj)
    return torch.as_tensor(traj.logprobs, dtype=torch.float32)[idx]


def block_kinds(input_ids_L: torch.Tensor, image_pad: int, video_pad: int) -> list[str]:
    """"image" / "video" per vision block, in sequence order (a block = a maximal run of one pad id)."""
    is_img, is_vid = input_ids_L == image_pad, input_ids_L == video_pad
    pad = is_img | is_vid
    starts = pad & ~torch.cat([pad.new_zeros(1), pad[:-1]])
    # a run switching directly from image to video pads never happens in Qwen's format (vision_end between)
    return ["image" if bool(is_img[i]) else "video" for i in starts.nonzero().squeeze(-1).tolist()]


def media_embeds(model, traj, input_ids_L: torch.Tensor | None = None,
                 cache: dict | None = None) -> list[torch.Tensor]:
    """Vision features of every block of the episode, in sequence order (one tower call per modality).

    Host and device: the Trajectory keeps its media and grids on the host (the engine's copies); the block
    layout is read from them and from the host token ids (`input_ids_L` is ignored unless it is a host
    tensor; no device value is read), and each tower call's pixels and grid are moved to the tower's device.

    NOTE: runs under no_grad when the vision tower and merger are frozen (the method's setting), so no
    activations of the tower are kept for backward. Then `cache` (a dict living for one training step) reuses
    features by MediaItem.key: the G rollouts of a group share the main video, and often their rewatches,
    frames and crops, so each is encoded once per step, as the engine does during rollouts.
    """
    cfg = modeling.inner(model).config
    visual = modeling.inner(model).visual
    for name, pix, grid in (("image", traj.pixel_values, traj.image_grid_thw),
                            ("video", traj.pixel_values_videos, traj.video_grid_thw)):
        rows = int(grid.prod(-1).sum()) if grid is not None and grid.numel() else 0
        if rows != (0 if pix is None else pix.shape[0]):
            raise ValueError(f"trajectory {traj.sample_index}/{traj.rollout_index}: {name} grids need {rows} pixel "
                             f"rows but {0 if pix is None else pix.shape[0]} were given")
    if input_ids_L is None or input_ids_L.device.type != "cpu":
        input_ids_L = torch.as_tensor(traj.token_ids)
    kinds = block_kinds(input_ids_L, cfg.image_token_id, cfg.video_token_id)
    n_img = 0 if traj.image_grid_thw is None else traj.image_grid_thw.shape[0]
    n_vid = 0 if traj.video_grid_thw is None else traj.video_grid_thw.shape[0]
    if kinds.count("image") != n_img or kinds.count("video") != n_vid:
        raise ValueError(f"trajectory {traj.sample_index}/{traj.rollout_index}: {kinds.count('image')} image and "
                         f"{kinds.count('video')} video blocks in token_ids but {n_img} image and "
                         f"{n_vid} video grids")
    device, dtype = next(visual.parameters()).device, next(visual.parameters()).dtype
    grad = torch.is_grad_enabled() and any(p.requires_grad for p in visual.parameters())
    media = list(getattr(traj, "media", None) or [])
    keyed = (cache is not None and not grad and len(media) == len(kinds)
             and [m.kind for m in media] == kinds and all(getattr(m, "key", None) is not None for m in media))
    blocks = _blocks_in_order(traj, kinds)
    keys = [(k, media[i].key, tuple(int(x) for x in g)) if keyed else None for i, (k, _, g) in enumerate(blocks)]
    todo = [i for i, key in enumerate(keys) if key is None or key not in cache]
    feats: dict[int, torch.Tensor] = {}
    with torch.set_grad_enabled(grad):
        for kind in ("image", "video"):
            idx = [i for i in todo if blocks[i][0] == kind]
            if not idx:
                continue
            # clone: engine inference tensors
            pix = torch.cat([blocks[i][1] for i in idx]).to(device, dtype, non_blocking=True).clone()
            grid = torch.stack([blocks[i][2] for i in idx])
            for i, f in zip(idx, _tower(model, grad)(pix, grid, kind == "video")):
                feats[i] = f
                if keys[i] is not None:
                    cache[keys[i]] = f
    return [feats[i] if i in feats else cache[keys[i]] for i in range(len(blocks))]


_FROZEN_TOWERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> VisionForward


def _tower(model, grad: bool):
    """(pixels on the device, HOST grid (N, 3), video) -> features per item.

    A frozen tower runs the engine's own forward (vision_forward.py: equal to transformers' to the bit, reads
    only the host grid, so no sync); its grid plans stay cached with the model across steps. A trained or
    hooked (ZeRO-3) tower runs transformers', which needs the grid on its device and reads it back there
    (about a dozen host reads per call, measured on the stand-in device)."""
    if not grad and vision_forward.supports(model) is None:
        fwd = _FROZEN_TOWERS.get(model)
        if fwd is None:
            fwd = _FROZEN_TOWERS[model] = vision_forward.VisionForward(model)
        return lambda pix, grid, video: fwd(pix, grid)
    return lambda pix, grid, video: modeling.vision_embeds(model, pix, grid.to(pix.device, non_blocking=True),
                                                           video=video)


def _blocks_in_order(traj, kinds) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(kind, pixel rows, grid (3,)) per vision block in sequence order."""
    out, at = [], {"image": 0, "video": 0}
    rows = {"image": 0, "video": 0}
    pix = {"image": traj.pixel_values, "video": traj.pixel_values_videos}
    grids = {"image": traj.image_grid_thw, "video": traj.video_grid_thw}
    for k in kinds:
        g = grids[k][at[k]]
        n = int(g.prod())
        out.append((k, pix[k][rows[k]:rows[k] + n], g))
        at[k] += 1
        rows[k] += n
    return out


# --- chunked log-probs -------------------------------------------------------------------------------


def _chunk_logprobs(hidden_ND, target_N, head, temperature, backend):
    logits_NV = head(hidden_ND)     # a module call: ZeRO-3 gathers the weight in its hooks
    return token_logprobs(logits_NV, target_N, temperature, backend=backend)


def chunked_logprobs(model, hidden_ND: torch.Tensor, target_N: torch.Tensor, *, temperature: float = 1.0,
                     chunk: int = 1024, backend: str | None = None) -> torch.Tensor:
    """fp32 (N,) log p(target | hidden); at most (chunk, V) logits alive at a time, forward and backward."""
    if chunk < 1:
        raise ValueError(f"chunked_logprobs: chunk must be >= 1, got {chunk}")
    head = modeling.lm_head(model)
    if getattr(head, "bias", None) is not None:
        raise ValueError("chunked_logprobs: an lm_head with bias is not supported")
    out = []
    for s in range(0, hidden_ND.shape[0], chunk):
        args = (hidden_ND[s:s + chunk], target_N[s:s + chunk], head, temperature, backend)
        if torch.is_grad_enabled() and (hidden_ND.requires_grad or head.weight.requires_grad):
            out.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(*args))
    return torch.cat(out) if out else hidden_ND.new_zeros(0, dtype=torch.float32)


# --- one episode ----------------------------------------------------------------------------------------


def trajectory_logprobs(model, traj, *, temperature: float = 1.0, chunk: int = 1024, backend: str | None = None,
                        embeds: list[torch.Tensor] | None = None) -> torch.Tensor:
    """fp32 (N,) teacher-forced log-probs of the episode's generated tokens under `model`.

    `embeds` reuses media features computed once (e.g. the policy's, for the reference model when both share
    a frozen vision tower).
    """
    device = modeling.lm_head(model).weight.device
    ids_L = torch.as_tensor(traj.token_ids, dtype=torch.long, device=device)
    # NOTE: clone: the engine builds these under inference_mode, and inference tensors cannot enter autograd
    pos_3L = torch.as_tensor(traj.position_ids, dtype=torch.long, device=device).clone()
    if pos_3L.shape != (3, ids_L.shape[0]):
        raise ValueError(f"trajectory {traj.sample_index}/{traj.rollout_index}: position_ids has shape "
                         f"{tuple(pos_3L.shape)}, expected (3, {ids_L.shape[0]})")
    gen_N = generated_index(traj).to(device)
    if embeds is None:
        embeds = media_embeds(model, traj)
    x_LD = modeling.embed(model, ids_L, embeds)
    hidden_LD = modeling.text_forward(model, x_LD[None], pos_3L[:, None, :])[0]
    return chunked_logprobs(model, hidden_LD[gen_N - 1], ids_L[gen_N], temperature=temperature, chunk=chunk,
                            backend=backend)


def batch_logprobs(model, trajs, **kw) -> list[torch.Tensor]:
    """`trajectory_logprobs` of each episode (one forward per episode: no padding, no cross-talk)."""
    return [trajectory_logprobs(model, t, **kw) for t in trajs]


# --- several episodes in one packed forward --------------------------------------------------------------


def packed_attention_installed(model) -> bool:
    from .packing import ATTN_NAME
    return getattr(modeling.inner(model).language_model.config, "_attn_implementation", None) == ATTN_NAME


def packed_logprobs(model, trajs, *, temperature: float = 1.0, chunk: int = 1024, backend: str | None = None,
                    embeds: list | None = None) -> list[torch.Tensor]:
    """`trajectory_logprobs` of several episodes from ONE forward: sequences concatenated (B = 1) with
    cu_seqlens so attention stays within each episode (training/packing.py's attention), positions per
    episode. Falls back to one forward per episode when that attention is not installed on the model."""
    if not packed_attention_installed(model) or len(trajs) == 1:
        embeds = embeds if embeds is not None else [None] * len(trajs)
        return [trajectory_logprobs(model, t, temperature=temperature, chunk=chunk, backend=backend, embeds=e)
                for t, e in zip(trajs, embeds)]
    device = modeling.lm_head(model).weight.device
    xs, poss, rows, tgts, counts, lens = [], [], [], [], [], []
    off = 0
    for k, t in enumerate(trajs):
        ids_L = torch.as_tensor(t.token_ids, dtype=torch.long, device=device)
        pos_3L = torch.as_tensor(t.position_ids, dtype=torch.long, device=device).clone()   # see trajectory_logprobs
        if pos_3L.shape != (3, ids_L.shape[0]):
            raise ValueError(f"trajectory {t.sample_index}/{t.rollout_index}: position_ids has shape "
                             f"{tuple(pos_3L.shape)}, expected (3, {ids_L.shape[0]})")
        gen_N = generated_index(t).to(device)
        e = embeds[k] if embeds is not None and embeds[k] is not None else media_embeds(model, t)
        xs.append(modeling.embed(model, ids_L, e))
        poss.append(pos_3L)
        rows.append(off + gen_N - 1)
        tgts.append(ids_L[gen_N])
        counts.append(gen_N.shape[0])
        lens.append(ids_L.shape[0])
        off += ids_L.shape[0]
    cu = torch.tensor([0, *lens], dtype=torch.int32).cumsum(0).to(torch.int32)
    attn = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))
    hidden_LD = modeling.text_forward(model, torch.cat(xs)[None], torch.cat(poss, dim=1)[:, None, :], **attn)[0]
    lps = chunked_logprobs(model, hidden_LD[torch.cat(rows)], torch.cat(tgts), temperature=temperature,
                           chunk=chunk, backend=backend)
    return list(lps.split(counts))
