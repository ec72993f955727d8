"""M-RoPE positions by the rule Qwen2.5-VL was trained with, computed once, incrementally, for everyone.

Legend: L = sequence length, B = batch, positions are (3, L) rows (temporal, height, width).

The rule (spec section 4; transformers 4.51 and vLLM): text tokens take the same value on all three rows,
counting up; a vision block that starts at `s` with LLM grid (t, h, w) = grid_thw // (1, 2, 2) gets
T = s + long(i * tokens_per_second * second_per_grid_t) (images: interval 1), H = s + row, W = s + col;
the text after a block continues at the LARGEST position used so far + 1.
transformers 5.23's `get_rope_index` continues at `s + max(h, w)` instead, which overlaps a video's
temporal positions; it agrees with this rule on text and images only (issue 45381).

Reference defect 1 (spec section 7): the reference's training forwards silently fell back to 1-D
positions. Here the rollout engine, SFT and GRPO all pass these 3-D positions explicitly, and they are
computed by one `MRopeCursor` that appends turn by turn, so a turn's positions never need the history
to be re-scanned.
"""
from __future__ import annotations

import itertools

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values (vision_start/end count as text)


def vision_positions(start: int, grid_thw, *, spatial_merge: int = 2, time_interval: float = 1.0) -> torch.Tensor:
    """(3, t*h*w) positions of one vision block beginning at `start` (merge-window token order)."""
    t, h, w = (int(x) for x in grid_thw)
    h, w = h // spatial_merge, w // spatial_merge
    # float32 product then truncation, exactly as transformers computes the temporal index
    tpos = (torch.arange(t) * torch.tensor(time_interval, dtype=torch.float32)).long()
    T = tpos.view(t, 1, 1).expand(t, h, w)
    H = torch.arange(h).view(1, h, 1).expand(t, h, w)
    W = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([T, H, W]).reshape(3, -1) + start


class MRopeCursor:
    """Positions of a sequence built turn by turn; `next_position` is where the next text token goes."""

    def __init__(self, *, tokens_per_second: float = 2, spatial_merge: int = 2, next_position: int = 0):
        self.tokens_per_second = tokens_per_second
        self.spatial_merge = spatial_merge
        self.next_position = next_position

    def text(self, n: int) -> torch.Tensor:
        pos = torch.arange(self.next_position, self.next_position + n).expand(3, n)
        self.next_position += n
        return pos

    def vision(self, grid_thw, *, video: bool, second_per_grid_t: float = 0.0) -> torch.Tensor:
        interval = self.tokens_per_second * second_per_grid_t if video else 1.0
        pos = vision_positions(self.next_position, grid_thw, spatial_merge=self.spatial_merge,
                               time_interval=interval)
        if pos.numel():
            self.next_position = int(pos.max()) + 1
        return pos

    def copy(self) -> "MRopeCursor":
        return MRopeCursor(tokens_per_second=self.tokens_per_second, spatial_merge=self.spatial_merge,
                           next_position=self.next_position)


def token_runs(mm_token_type_ids_L) -> list[tuple[int, int, int]]:
    """(type, start, end) runs of equal token type."""
    runs, pos = [], 0
    for key, grp in itertools.groupby(mm_token_type_ids_L.tolist()):
        n = len(list(grp))
        runs.append((key, pos, pos + n))
        pos += n
    return runs


def sequence_positions(mm_token_type_ids_L, image_grid_thw=None, video_grid_thw=None,
                       second_per_grid_ts=None, *, tokens_per_second: float = 2,
                       spatial_merge: int = 2) -> torch.Tensor:
    """(3, L) positions of one unpadded sequence by the original rule.

    Grids are consumed in order per modality; each video block takes the next `second_per_grid_ts` entry.
    A run of vision tokens must hold exactly t*h*w/merge^2 tokens of one item: adjacent items of the same
    modality are always separated by <|vision_end|><|vision_start|> in Qwen's format.
    """
    cur = MRopeCursor(tokens_per_second=tokens_per_second, spatial_merge=spatial_merge)
    imgs = iter(image_grid_thw if image_grid_thw is not None else [])
    vids = iter(video_grid_thw if video_grid_thw is not None else [])
    sgts = iter(second_per_grid_ts if second_per_grid_ts is not None else [])
    out = []
    for kind, start, end in token_runs(mm_token_type_ids_L):
        if kind == TEXT:
            out.append(cur.text(end - start))
            continue
        grid = next(imgs) if kind == IMAGE else next(vids)
        sgt = float(next(sgts, 1.0)) if kind == VIDEO else 0.0
        pos = cur.vision(grid, video=kind == VIDEO, second_per_grid_t=sgt)
        if pos.shape[1] != end - start:
            raise ValueError(f"sequence_positions: a {'video' if kind == VIDEO else 'image'} run at token {start} "
                             f"has {end - start} tokens but its grid {tuple(int(x) for x in grid)} needs {pos.shape[1]}")
        out.append(pos)
    return torch.cat(out, dim=1) if out else torch.zeros(3, 0, dtype=torch.long)


def rope_index(input_ids_BL, mm_token_type_ids_BL, image_grid_thw=None, video_grid_thw=None,
               second_per_grid_ts=None, attention_mask_BL=None, *, tokens_per_second: float = 2,
               spatial_merge: int = 2):
    """Batched drop-in for `get_rope_index` with the original rule: (position_ids (3, B, L), deltas (B, 1)).

    Grids are consumed across the batch in order, as transformers does; padded positions get 1.
    """
    B, L = input_ids_BL.shape
    pos = torch.ones(3, B, L, dtype=torch.long, device=input_ids_BL.device)
    deltas = []
    n_img = n_vid = 0
    for b in range(B):
        keep = attention_mask_BL[b].bool() if attention_mask_BL is not None else torch.ones(L, dtype=torch.bool)
        types = mm_token_type_ids_BL[b][keep.to(mm_token_type_ids_BL.device)].cpu()
        runs = token_runs(types)
        ni = sum(1 for k, _, _ in runs if k == IMAGE)
        nv = sum(1 for k, _, _ in runs if k == VIDEO)
        p = sequence_positions(
            types,
            image_grid_thw[n_img:n_img + ni] if image_grid_thw is not None else None,
            video_grid_thw[n_vid:n_vid + nv] if video_grid_thw is not None else None,
            second_per_grid_ts[n_vid:n_vid + nv] if second_per_grid_ts is not None else None,
            tokens_per_second=tokens_per_second, spatial_merge=spatial_merge)
        n_img, n_vid = n_img + ni, n_vid + nv
        pos[:, b, keep.to(pos.device)] = p.to(pos.device)
        deltas.append((int(p.max()) + 1 if p.numel() else 0) - int(keep.sum()))
    return pos, torch.tensor(deltas, device=input_ids_BL.device).unsqueeze(1)


def mm_token_type_ids(input_ids, image_token_id: int, video_token_id: int) -> torch.Tensor:
    t = torch.zeros_like(input_ids, dtype=torch.int32)
    t[input_ids == image_token_id] = IMAGE
    t[input_ids == video_token_id] = VIDEO
    return t


def install_original_rope_index(model) -> None:
    """Make a transformers 5.x Qwen2.5-VL compute M-RoPE by the original rule (generate and forwards).

    Replaces `model.model.get_rope_index`; idempotent. Users of transformers 5.x who load a checkpoint trained
    with the original rule (every released Qwen2.5-VL) need this for video inputs.
    """
    inner = model.model if hasattr(model, "model") else model
    if getattr(inner, "_videocom_original_rope", False):
        return
    vc = inner.config.vision_config

    def get_rope_index(input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                       second_per_grid_ts=None, attention_mask=None, **kwargs):
        if mm_token_type_ids is None:
            cfg = inner.config
            mm_token_type_ids = globals()["mm_token_type_ids"](input_ids, cfg.image_token_id, cfg.video_token_id)
        return rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, second_per_grid_ts,
                          attention_mask, tokens_per_second=vc.tokens_per_second,
                          spatial_merge=vc.spatial_merge_size)

    inner.get_rope_index = get_rope_index
    inner._videocom_original_rope = True
