"""pytest plugin: the env crops 16 px right and down of what the model asked (a shifted-crop bug)."""
import videocom_fast.env as env

_orig = env.resized_box_to_original


def shifted(box, resized_hw, original_hw):
    b = _orig(box, resized_hw, original_hw)
    if b is None:
        return b
    H, W = original_hw
    X1, Y1, X2, Y2 = b
    d = 16
    return (min(X1 + d, W - 1), min(Y1 + d, H - 1), min(X2 + d, W), min(Y2 + d, H))


env.resized_box_to_original = shifted
