"""Media item -> (pixel_values, grid_thw) for the vision tower, in the processors' layout, through the
fused crop/resize/normalize/patchify kernels (`videocom_fast.preprocess.preprocess_media`).

pixel_values are written in `dtype` by the kernel on the device the frames are on (GPU-decoded frames: the
CUDA/Triton kernel, output on the GPU; no host copy); grids stay on the host (the engine's M-RoPE
positions and token counts read them there)."""
from __future__ import annotations

import torch

from ..preprocess import preprocess_media


def preprocess_items(items, processor=None, dtype=torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (pixel_values (P, 1176), grid_thw (3,) long) per item, in order (`processor` is unused: the
    fused path computes the processors' tensors itself)."""
    if not items:
        return []
    # the kernels write fp32/bf16/fp16; a float64 model (exactness tests) gets the fp32 values widened
    kernel_dtype = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    return [(pv.to(dtype), grid.reshape(-1, 3)[0].long()) for pv, grid in preprocess_media(items, dtype=kernel_dtype)]
