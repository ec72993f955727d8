"""Trajectory: one rollout episode, token in / token out, with everything training needs to re-run it.

The contract is /work/brief/trajectory.md. Training re-runs the whole sequence with
`videocom_fast.modeling` (vision_embeds for images and videos, embed with the features in sequence order,
text_forward with `position_ids[:, None, :]`), so ids, positions and media here are all it needs; no text
is ever re-tokenized (spec section 7, defect 8).

Token layout of an episode (Qwen's chat format, videocom_fast.chat):
  prompt (system + user with the main video + question + assistant header)
  round 1 text [+ <|im_end|>]  \\n <|im_start|>user\\n {media} {reply} <|im_end|>\\n <|im_start|>assistant\\n
  round 2 text ...                                            (no observation after the last round)
`generated_mask` is True exactly at sampled tokens. A round the engine stopped itself (completed action
line, per-round token limit) gets an INJECTED <|im_end|> (mask False, logprob 0.0) so the sequence stays
in the format the model was trained on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class _Concatenated:
    """A tensor field that may be set to a list of parts, concatenated on first read (then cached).

    The engine hands every rollout its media as references to the group's shared tensors: concatenating
    them eagerly copied the main video's pixels once per rollout (measured: 1.2 s of a 16x8 rollout batch's
    wall time) for trajectories whose pixels training may never read in that form.
    """

    def __set_name__(self, owner, name):
        self.slot = "_" + name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return None                       # the dataclass default
        v = obj.__dict__.get(self.slot)
        if isinstance(v, list):
            v = obj.__dict__[self.slot] = torch.cat(v) if v else None
        return v

    def __set__(self, obj, value):
        obj.__dict__[self.slot] = value


@dataclass
class Trajectory:
    sample_index: int
    rollout_index: int
    token_ids: list[int] = field(default_factory=list)
    generated_mask: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    rounds: list[tuple[int, int]] = field(default_factory=list)   # [start, end) of each generated round
    round_texts: list[str] = field(default_factory=list)
    actions: list = field(default_factory=list)                   # Action | None per round
    observations: list = field(default_factory=list)              # Observation | None per round
    finish_reason: str = ""
    media: list = field(default_factory=list)                     # MediaItem per vision block, in order
    position_ids: torch.Tensor | None = None                      # (3, len(token_ids))
    pixel_values: torch.Tensor | None = _Concatenated()             # (settable as a list of parts)
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = _Concatenated()
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: torch.Tensor | None = None

    @property
    def completion_text(self) -> str:
        return "\n".join(self.round_texts)

    @property
    def num_generated(self) -> int:
        return sum(self.generated_mask)

    @property
    def num_rounds(self) -> int:
        return len(self.rounds)

    def media_in_order(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(kind, pixel rows, grid (3,)) per vision block in sequence order (images and videos interleaved)."""
        out, pi, pv, ii, iv = [], 0, 0, 0, 0
        for item in self.media:
            if item.kind == "video":
                g = self.video_grid_thw[iv]
                n = int(g.prod())
                out.append(("video", self.pixel_values_videos[pv:pv + n], g))
                pv, iv = pv + n, iv + 1
            else:
                g = self.image_grid_thw[ii]
                n = int(g.prod())
                out.append(("image", self.pixel_values[pi:pi + n], g))
                pi, ii = pi + n, ii + 1
        return out
