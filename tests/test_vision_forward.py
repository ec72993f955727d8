"""VisionForward (the engine's own vision-tower forward) equals transformers' Qwen2.5-VL vision tower.

Oracle: `modeling.vision_embeds(model, ..., patch_matmul=True)`, i.e. transformers' get_video_features /
get_image_features. Fresh random pixel values every run; grids with partial windows (h/2 or w/2 not a
multiple of the 4-unit window), images and videos, many items in one call. Tolerances from the brief:
fp64 max abs diff <= 1e-10, fp32 <= 1e-4 of the output scale (on this machine fp32 and bf16 are in fact
bit-equal: same roundings in the same order); bf16 within a few ulps.
"""
import copy
import random

import pytest
import torch

from videocom_fast import modeling
from videocom_fast.vision_forward import VisionForward, supports

VIDEOS = [(2, 4, 6), (4, 18, 30), (3, 10, 14)]
IMAGES = [(1, 6, 12), (1, 4, 4), (1, 14, 10)]
ODD = [(1, 26, 22), (2, 10, 34), (1, 2, 2), (3, 2, 18), (1, 34, 2)]   # partial windows, 1-unit-wide frames


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    from videocom_fast.models import build_tiny
    return build_tiny(tmp_path_factory.mktemp("vision_tiny"), seed=0)


@pytest.fixture(scope="session")
def models(tiny_path):
    from videocom_fast.models import load
    return {dt: load(tiny_path, dtype=dt)[0] for dt in (torch.float64, torch.float32, torch.bfloat16)}


def _pixels(grid, dtype):
    g = torch.tensor(grid)
    return torch.randn(int(g.prod(-1).sum()), 3 * 2 * 14 * 14, dtype=dtype), g


def _check(model, grid, dtype, video=True):
    pv, g = _pixels(grid, dtype)
    want = modeling.vision_embeds(model, pv, g, video=video, patch_matmul=True)
    got = VisionForward(model)(pv, g)
    assert len(got) == len(want) == len(grid)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape == (grid[i][0] * grid[i][1] * grid[i][2] // 4, model.config.text_config.hidden_size)
        assert a.dtype == b.dtype == dtype
    err = max((a - b).abs().max().item() for a, b in zip(got, want))
    scale = max(b.abs().max().item() for b in want)
    assert scale > 1e-3                       # the outputs are not trivially zero
    if dtype == torch.float64:
        assert err <= 1e-10, err
    elif dtype == torch.float32:
        assert err <= 1e-4 * scale, (err, scale)
    else:   # bf16: a few ulps (2**-8 relative each) if the summation order ever differs
        assert err <= 2e-2 * scale, (err, scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("case", ["videos", "images", "odd", "mixed_many"])
def test_equals_transformers(models, dtype, case):
    rng = random.Random()
    if case == "videos":
        grid, video = VIDEOS, True
    elif case == "images":
        grid, video = IMAGES, False
    elif case == "odd":
        grid, video = ODD, True
    else:   # many items, shuffled, random sizes: equal window sizes and frame lengths shared across items
        grid = VIDEOS + IMAGES + ODD + [(rng.randint(1, 3), 2 * rng.randint(1, 12), 2 * rng.randint(1, 12))
                                        for _ in range(6)]
        rng.shuffle(grid)
        video = True
    _check(models[dtype], grid, dtype, video)


def test_one_item_each_alone_equals_batched(models):
    """Items do not leak into each other: each item alone gives the rows it gets in a batch."""
    model = models[torch.float64]
    grid = [(2, 6, 10), (1, 18, 30), (3, 4, 4)]
    pv, g = _pixels(grid, torch.float64)
    vf = VisionForward(model)
    batched = vf(pv, g)
    start = 0
    for i, (t, h, w) in enumerate(grid):
        alone = vf(pv[start:start + t * h * w], g[i:i + 1])[0]
        torch.testing.assert_close(alone, batched[i], rtol=0, atol=1e-12)
        start += t * h * w


def test_conv3d_patch_embedding_oracle(models):
    """Also equal to the stock path with the Conv3d patch embedding (fp64: only summation order differs)."""
    model = models[torch.float64]
    pv, g = _pixels(VIDEOS + IMAGES, torch.float64)
    want = modeling.vision_embeds(model, pv, g, video=True, patch_matmul=False)
    got = VisionForward(model)(pv, g)
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) <= 1e-10


def test_in_place_weight_edit_changes_output(models):
    """Nothing derived from weights is cached: an in-place optimizer-style update shows in the next call."""
    model = copy.deepcopy(models[torch.float64])
    vf = VisionForward(model)
    pv, g = _pixels([(2, 8, 12), (1, 6, 6)], torch.float64)
    before = vf(pv, g)
    vis = model.model.visual
    with torch.no_grad():
        vis.blocks[0].attn.qkv.weight.mul_(1.5)
        vis.blocks[1].mlp.down_proj.bias.add_(0.1)
        vis.patch_embed.proj.weight.add_(0.01)
    after = vf(pv, g)
    want = modeling.vision_embeds(model, pv, g, video=True, patch_matmul=True)
    assert max((a - b).abs().max().item() for a, b in zip(before, after)) > 1e-3
    assert max((a - b).abs().max().item() for a, b in zip(after, want)) <= 1e-10


def test_plan_cache_is_bounded_and_reused(models):
    model = models[torch.float32]
    vf = VisionForward(model)
    for s in range(1, 21):
        pv, g = _pixels([(1, 2, 2 * s)], torch.float32)
        vf(pv, g)
    assert len(vf._plans) <= 16
    pv, g = _pixels([(1, 2, 40)], torch.float32)
    a = vf(pv, g)[0]
    plan = vf._plans[(((1, 2, 40),), "cpu")]
    b = vf(pv, g)[0]
    assert vf._plans[(((1, 2, 40),), "cpu")] is plan
    assert torch.equal(a, b)


def test_plan_moves_every_tensor_to_the_activations_device(models):
    """On CUDA the plan's index tables must live on the GPU (index_select refuses CPU indices there):
    `_Plan.to` moves all of them; checked here with the meta device."""
    vf = VisionForward(models[torch.float32])
    pv, g = _pixels([(2, 4, 6), (3, 10, 14)], torch.float32)
    vf(pv, g)
    plan = next(iter(vf._plans.values())).to("meta")
    tensors = [plan.units_U, plan.out_U, plan.cos_RD, plan.sin_RD, plan.window.gather_U, plan.window.scatter_U,
               plan.frame.gather_U, plan.frame.scatter_U]
    assert any(t is not None for t in tensors[4:])   # at least one grouping reorders rows
    assert all(t is None or t.device.type == "meta" for t in tensors)


def test_empty_grid(models):
    vf = VisionForward(models[torch.float32])
    assert vf(torch.zeros(0, 1176), torch.zeros(0, 3, dtype=torch.long)) == []


def test_bad_input_is_a_clear_value_error(models):
    vf = VisionForward(models[torch.float32])
    pv, g = _pixels([(1, 4, 4), (1, 6, 6)], torch.float32)
    with pytest.raises(ValueError, match=r"grid_thw_N3\[1\]"):
        vf(pv, torch.tensor([[1, 4, 4], [1, 6, 5]]))
    with pytest.raises(ValueError, match="pixel_values_PC has"):
        vf(pv[:-1], g)
    with pytest.raises(ValueError, match="pixel_values_PC must be"):
        vf(pv[:, :100], g)
    with pytest.raises(ValueError, match="grid_thw_N3 must be"):
        vf(pv, g[:, :2])
    with pytest.raises(ValueError, match=r"grid_thw_N3\[0\]"):
        vf(pv, torch.tensor([[0, 4, 4], [1, 6, 6]]))


def test_supports_refuses_what_it_cannot_run(models):
    assert supports(models[torch.float32]) is None

    hooked = copy.deepcopy(models[torch.float32])
    hooked.model.visual.blocks[1].register_forward_hook(lambda *a: None)
    reason = supports(hooked)
    assert reason is not None and "visual.blocks.1" in reason and "hook" in reason
    with pytest.raises(ValueError, match="hook"):
        VisionForward(hooked)

    class LoraLinear(torch.nn.Linear):     # what a PEFT wrapper looks like to a type check
        pass

    wrapped = copy.deepcopy(models[torch.float32])
    qkv = wrapped.model.visual.blocks[0].attn.qkv
    lora = LoraLinear(qkv.in_features, qkv.out_features)
    lora.load_state_dict(qkv.state_dict())
    wrapped.model.visual.blocks[0].attn.qkv = lora
    reason = supports(wrapped)
    assert reason is not None and "visual.blocks.0.attn.qkv" in reason and "LoraLinear" in reason

    relu = copy.deepcopy(models[torch.float32])
    relu.model.visual.config.hidden_act = "relu"
    assert "hidden_act" in supports(relu)

    extra = copy.deepcopy(models[torch.float32])
    extra.model.visual.blocks[0].mlp.dropout = torch.nn.Dropout(0.1)
    assert "visual.blocks.0.mlp.dropout" in supports(extra)


def test_trainable_merger_equals_transformers_values_and_merger_grads(tiny_path):
    """SFT with a frozen tower and a training merger (training/packing.media_embeddings) runs the blocks
    here without autograd and the merger as its module: features and merger gradients equal transformers'
    whole-tower autograd run (fp64); the blocks get no gradient in either."""
    from videocom_fast.models import load
    from videocom_fast.training.packing import _frozen_tower_forward

    model = load(tiny_path, dtype=torch.float64)[0]
    vis = modeling.inner(model).visual
    assert _frozen_tower_forward(model) is None            # everything trains: the transformers path
    for n, p in vis.named_parameters():
        p.requires_grad_(n.startswith("merger."))
    fast = _frozen_tower_forward(model)
    assert isinstance(fast, VisionForward) and _frozen_tower_forward(model) is fast
    grid = random.sample(VIDEOS + ODD, 3)
    pv, g = _pixels(grid, torch.float64)
    weights = [torch.randn(t * h * w // 4, model.config.text_config.hidden_size, dtype=torch.float64)
               for t, h, w in grid]

    def grads(feats):
        model.zero_grad(set_to_none=True)
        sum((f * w).sum() for f, w in zip(feats, weights)).backward()
        return {n: p.grad.clone() for n, p in vis.named_parameters() if p.grad is not None}

    want = modeling.vision_embeds(model, pv, g, video=True, patch_matmul=True)
    got = fast.trainable_merger(pv, g)
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) <= 1e-10
    gw, gg = grads(want), grads(got)
    assert sorted(gw) == sorted(gg) and all(n.startswith("merger.") for n in gg) and len(gg) >= 4
    for n in gw:
        assert (gw[n] - gg[n]).abs().max().item() <= 1e-10 * max(1.0, gw[n].abs().max().item()), n
    vis.blocks[0].attn.qkv.weight.requires_grad_(True)      # a trainable block: the transformers path again
    assert _frozen_tower_forward(model) is None
