"""Media item -> (pixel_values, grid_thw) for the vision tower, in the processors' layout, through the
fused crop/resize/normalize/patchify kernels (`videocom_fast.preprocess.preprocess_media`)."""
from __future__ import annotations

import torch

from ..preprocess import preprocess_media


def preprocess_items(items, processor=None, dtype=torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (pixel_values (P, 1176), grid_thw (3,) long) per item, in order (`processor` is unused: the
    fused path computes the processors' tensors itself)."""
    if not items:
        return []
    return [(pv.to(dtype), grid.reshape(-1, 3)[0].long()) for pv, grid in preprocess_media(items)]
