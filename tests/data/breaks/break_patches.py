"""pytest plugin: the images' pixel_values rows (14x14 patches) reach the vision tower in a shuffled order."""
import torch

from videocom_fast.rollout.engine import RolloutEngine

_orig = RolloutEngine._vision_forward


def _vision_forward(self):
    f = _orig(self)

    def shuffled(pv, grids, video):
        if not video:
            g = torch.Generator().manual_seed(0)
            pv = pv[torch.randperm(pv.shape[0], generator=g).to(pv.device)]
        return f(pv, grids, video)
    return shuffled


RolloutEngine._vision_forward = _vision_forward
