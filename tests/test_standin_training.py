"""Training code on the stand-in accelerator (videocom_fast/testing/standin.py): the model on a device that
raises where CUDA raises (host tensor meets device tensor) and counts every host read of a device value.

Findings 2 and 3 of issue 14 (each test here failed before its fix with "Tensor on device cpu is not on the
expected device meta!" or the stand-in's "a cpu tensor ... meets a device tensor"):
- GRPO's media features: Trajectory pixel values and grids stay on the host (the engine keeps host copies)
  and were fed to the vision tower on the model's device;
- GRPO's loss: advantages from host rewards, and pad_rows' host mask, met device log-probs.
Then the whole GRPO update (media features, reference log-probs, policy log-probs, loss, backward, clip,
AdamW) runs on the stand-in with values equal to the CPU run, and its host reads are exactly the documented
ones; so does the SFT step.
"""
import copy
from types import SimpleNamespace

import pytest
import torch

from videocom_fast.testing.standin import StandIn
from videocom_fast.training.grpo_loss import grpo_loss, pad_rows

from test_logprobs import hand_episode


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from videocom_fast.models import build_tiny, load
    from videocom_fast.modeling import inner
    from videocom_fast.mrope import install_original_rope_index
    from videocom_fast.training.packing import install_packed_attention
    model, proc = load(build_tiny(tmp_path_factory.mktemp("tiny")), dtype=torch.float32)
    install_original_rope_index(model)
    install_packed_attention(model)            # as the GRPO trainer does
    for p in inner(model).visual.parameters():
        p.requires_grad_(False)
    return model, proc


# --- finding 3: the loss -----------------------------------------------------------------------------------

def test_grpo_loss_takes_host_advantages_and_pad_rows_mask():
    g = torch.Generator().manual_seed(torch.seed() % 10_000)
    lens = [5, 1, 9]
    host_rows = [torch.randn(n, generator=g) - 1 for n in lens]
    ref_rows = [r + 0.1 * torch.randn(r.shape, generator=g) for r in host_rows]
    adv = torch.randn(3, generator=g)                              # from host rewards, as group_advantages
    want = grpo_loss(*[pad_rows(host_rows)[0], None, pad_rows(ref_rows)[0]], adv, pad_rows(host_rows)[1])
    with StandIn() as dev:
        rows = [r.requires_grad_(True) for r in dev.put(host_rows)]
        lp_BT, mask_BT = pad_rows(rows)
        assert mask_BT.device == dev.device and mask_BT.dtype == torch.bool
        out = grpo_loss(lp_BT, None, pad_rows(dev.put(ref_rows))[0], adv, mask_BT)
        assert dev.num_syncs() == 1, dev.report()                   # the stats: one read for all of them
        out.loss.backward()
        assert dev.num_syncs() == 1, dev.report()
    assert dev.value(out.loss).item() == pytest.approx(want.loss.item(), rel=1e-6)
    assert out.stats == pytest.approx(want.stats, rel=1e-6) and out.stats["loss"] == pytest.approx(want.loss.item())
    assert dev.value(mask_BT).sum().item() == sum(lens)
    assert all(dev.value(r.grad).abs().sum() > 0 for r in rows)


# --- finding 2: the media features -------------------------------------------------------------------------

def test_media_embeds_feed_host_trajectory_media_to_the_tower_device(tiny):
    from videocom_fast.training.logprobs import media_embeds
    model, proc = tiny
    traj, _ = hand_episode(proc, seed=2)
    assert traj.pixel_values.device.type == "cpu" and traj.video_grid_thw.device.type == "cpu"
    with torch.no_grad():
        want = media_embeds(model, traj, torch.as_tensor(traj.token_ids))
        with StandIn() as dev:
            stand = dev.put(copy.deepcopy(model))
            got = media_embeds(stand, traj, torch.as_tensor(traj.token_ids))
    assert [g.device.type for g in got] == ["meta"] * 4
    for a, b in zip(dev.value(got), want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# --- the GRPO update end to end ----------------------------------------------------------------------------

def _trajs(proc, n):
    return [hand_episode(proc, seed=s)[0] for s in range(n)]


def _update(model, ref, trajs, adv, cfg):
    """update_step's stats, and the gradients each optimizer step saw (cloned by a pre-step hook)."""
    from videocom_fast.training.grpo import update_step
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    grads = []
    opt.register_step_pre_hook(lambda *_: grads.append([p.grad.detach().clone() for p in params]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stats = update_step(model, ref, trajs, adv, opt, sched, None, cfg, SimpleNamespace(rank=0, world_size=1))
    return stats, grads


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_grpo_update_on_the_standin_equals_cpu_with_documented_syncs(tiny, num_iterations):
    from videocom_fast.training.grpo import GRPOConfig, micro_batches
    model, proc = tiny
    trajs = _trajs(proc, 5)
    adv = torch.randn(5)
    cfg = GRPOConfig(micro_batch=2, micro_batch_tokens=0, num_iterations=num_iterations, beta=0.04,
                     temperature=0.9, gradient_checkpointing=False)
    n_micro = len(micro_batches(trajs, cfg.micro_batch))
    cpu_model, cpu_ref = copy.deepcopy(model), copy.deepcopy(model).eval()
    want, want_grads = _update(cpu_model, cpu_ref, trajs, adv, cfg)
    with StandIn() as dev:
        policy, ref = dev.put(copy.deepcopy(model)), dev.put(copy.deepcopy(model).eval())
        dev.reset()
        got, got_grads = _update(policy, ref, trajs, adv, cfg)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    # Meta picks SDPA's math decomposition where the CPU picks its fused kernel: values agree to fp32
    # rounding (measured: gradients within 4e-6 of each tensor's largest entry), not to the bit.
    assert len(got_grads) == len(want_grads) == num_iterations
    for gs, ws in zip(got_grads, want_grads):
        for g, w in zip(gs, ws):
            assert (dev.value(g) - w).abs().max() <= 1e-4 * w.abs().max() + 1e-9
    assert sum(bool(w.abs().sum() > 0) for w in want_grads[0]) > len(want_grads[0]) // 2
    # Documented host reads, by code line: one per micro-batch (grpo_loss's stats, one transfer), one per
    # update (the gradient norm), one per episode forward (modeling.embed checks its pad count), one per
    # model (VisionForward reads the rotary table once). Nothing else: not the media, not the loss.
    forwards = 5 * (1 + num_iterations + (num_iterations > 1))       # reference, policy, old policy
    assert _sync_counts(dev) == {"grpo_loss.py in _stats": n_micro * num_iterations,
                                 "grpo.py in update_step": num_iterations, "modeling.py in embed": forwards,
                                 "vision_forward.py in __init__": 1}, dev.report()


def _sync_counts(dev) -> dict:
    """{"file.py in function": syncs} over the innermost project frame of each sync."""
    out: dict = {}
    for e in dev.syncs():
        frame = e.where.split(" <- ")[-1]
        key = f"{frame.split(':')[0]} in {frame.split(' in ')[-1]}"
        out[key] = out.get(key, 0) + 1
    return out


# --- the SFT step ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_world(synth_small, tiny_dir):  # noqa: F811
    import json

    from videocom_fast.training.sft import SFTConfig, build_model
    from videocom_fast.training.sft_data import SFTDataset
    data, mc = synth_small
    cfg = SFTConfig(model=str(tiny_dir), dtype="float32", micro_batch_tokens=1500, lr=1e-3)
    model, processor = build_model(cfg, torch.device("cpu"))
    ds = SFTDataset(json.loads((data / "sft.json").read_text()), processor.tokenizer, mc, media_root=data)
    return cfg, model, ds


def _sft_step(model, ds, packs, cfg, device):
    from videocom_fast.training.sft import _VisionCache, _trainable, cosine_with_warmup, train_step
    params = _trainable(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, foreach=True)
    grads = []
    opt.register_step_pre_hook(lambda *_: grads.append([p.grad.detach().clone() for p in params]))
    sched = cosine_with_warmup(opt, 10, 0.0)
    st = train_step(model, model, ds, packs, opt, sched, None, _VisionCache(True), cfg,
                    SimpleNamespace(rank=0, world_size=1), device)
    return st, grads[0]


def test_sft_step_on_the_standin_equals_cpu_with_documented_syncs(sft_world):
    from videocom_fast.training.packing import pack_indices
    cfg, model, ds = sft_world
    packs = pack_indices([ds[i].num_tokens for i in range(len(ds))], cfg.micro_batch_tokens)
    assert len(packs) >= 2
    want, want_g = _sft_step(copy.deepcopy(model), ds, packs, cfg, torch.device("cpu"))
    with StandIn() as dev:
        stand = dev.put(copy.deepcopy(model))
        dev.reset()
        got, got_g = _sft_step(stand, ds, packs, cfg, dev.device)
    assert got == pytest.approx(want, rel=1e-5)
    for g, w in zip(got_g, want_g):
        assert (dev.value(g) - w).abs().max() <= 1e-4 * w.abs().max() + 1e-9
    # Documented host reads: ONE per step of the trainer's own (loss and grad norm in one transfer; it was
    # one per micro-batch plus two per step), and per micro-batch the forward's: modeling.embed's pad-count
    # check and packing.packed_loss_sum's two boolean-mask row picks (hidden[keep], targets[keep]); the
    # frozen tower reads its rotary table once per model. Nothing per layer (cu_seqlens stays on the host).
    n = len(packs)
    assert _sync_counts(dev) == {"sft.py in train_step": 1, "modeling.py in embed": n,
                                 "packing.py in packed_loss_sum": 2 * n, "vision_forward.py in __init__": 1}, \
        dev.report()


def test_frozen_tower_trainable_merger_on_the_standin_equals_cpu(tiny):
    """Scene SFT's vision path (training/packing.media_embeddings: tower blocks frozen, merger trains) on the
    stand-in: features and merger gradients equal the CPU run's; host reads: VisionForward's rotary table once
    per model, and one read of the (N, 3) grid per call (it sizes the plan, as in the engine's tower call)."""
    from videocom_fast.modeling import inner
    from videocom_fast.training.packing import _frozen_tower_forward

    model, _ = tiny
    model = copy.deepcopy(model)
    for n, p in inner(model).visual.named_parameters():
        p.requires_grad_(n.startswith("merger."))
    grid = torch.tensor([[2, 4, 6], [1, 6, 10]])
    pv = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    weights = [torch.randn(t * h * w // 4, model.config.text_config.hidden_size) for t, h, w in grid.tolist()]

    def run(m, pv, grid, weights):
        feats = _frozen_tower_forward(m).trainable_merger(pv, grid)
        sum((f * w).sum() for f, w in zip(feats, weights)).backward()
        return feats, [p.grad for n, p in inner(m).visual.named_parameters() if n.startswith("merger.")]

    stand_model = copy.deepcopy(model)
    want, want_g = run(model, pv, grid, weights)
    with StandIn() as dev:
        stand = dev.put(stand_model)
        dev.reset()
        args = dev.put((pv, grid, weights))
        got, got_g = run(stand, *args)
        got_values = [v.clone() for v in dev.value(got) + dev.value(got_g)]
        run(stand, *args)                                      # a second call reads only its grid
    assert [g.device.type for g in got] == ["meta"] * 2 and len(got_g) == len(want_g) >= 4
    for a, b in zip(got_values, want + want_g):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * max(1.0, b.abs().max().item()))
    assert _sync_counts(dev) == {"vision_forward.py in __init__": 1, "vision_forward.py in _check": 2}, dev.report()
