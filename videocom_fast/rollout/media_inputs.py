"""Media item -> (pixel_values, grid_thw) for the vision tower, in the processors' layout.

Uses `videocom_fast.preprocess.preprocess_media` (the fused crop/resize/patchify kernels) when it exists.
TEMPORARY FALLBACK until that module lands on main: transformers' Qwen2-VL image (PIL) and video
processors with the item's own min/max pixels, which define the layout anyway (spec section 4).
"""
from __future__ import annotations

import torch


def _fallback_one(item, processor, dtype):
    if item.kind == "image":
        frame_HWC = item.frames[0]
        if item.box is not None:
            x1, y1, x2, y2 = (int(v) for v in item.box)
            frame_HWC = frame_HWC[y1:y2, x1:x2]
        out = processor.image_processor(images=[frame_HWC.numpy()], return_tensors="pt",
                                        size={"shortest_edge": item.min_pixels, "longest_edge": item.max_pixels})
        return out["pixel_values"].to(dtype), out["image_grid_thw"][0]
    out = processor.video_processor(videos=[item.frames.permute(0, 3, 1, 2)], return_tensors="pt",
                                    do_sample_frames=False,
                                    size={"shortest_edge": item.min_pixels, "longest_edge": item.max_pixels})
    return out["pixel_values_videos"].to(dtype), out["video_grid_thw"][0]


def preprocess_items(items, processor, dtype=torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (pixel_values (P, 1176), grid_thw (3,) long) per item, in order."""
    if not items:
        return []
    try:
        from ..preprocess import preprocess_media
    except ImportError:
        preprocess_media = None
    if preprocess_media is not None:
        return [(pv.to(dtype), grid.reshape(-1, 3)[0].long()) for pv, grid in preprocess_media(items)]
    return [_fallback_one(item, processor, dtype) for item in items]
