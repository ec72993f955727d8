"""GRPO loss parity with TRL 1.16's own `GRPOTrainer._compute_loss` (the oracle), plus advantage rules.

TRL computes the loss only inside the trainer method, so the oracle is that method called on a minimal
stand-in for `self` (the attributes it reads with importance_sampling_level="token", no vLLM, no entropy
mask/bonus, one process, no accumulation) whose `_get_per_token_logps_and_entropies` returns our log-probs.
Per-token values come from the same method with "dapo" and a one-hot mask, num_items_in_batch=1, which makes
TRL's total equal exactly the selected token's loss.
"""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from videocom_fast.training.grpo_loss import LOSS_REDUCTIONS, grpo_loss, group_advantages, k3_kl, pad_rows

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")


class _Accel:
    num_processes = 1

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def trl_loss(logps_BT, old_BT, ref_BT, adv_B, mask_BT, *, loss_type, beta, eps_low, eps_high, delta=None,
             max_completion_length=None, num_items=None):
    """TRL's scalar loss for these tensors (gradients flow back into `logps_BT`)."""
    B, T = logps_BT.shape
    fake = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
        accelerator=_Accel(), _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps_BT, torch.zeros_like(logps_BT), None),
    )
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask_BT.float(),
              "advantages": adv_B, "old_per_token_logps": old_BT, "ref_per_token_logps": ref_BT,
              "num_items_in_batch": torch.tensor(float(mask_BT.sum() if num_items is None else num_items))}
    return trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs), fake._metrics["train"]


def random_case(seed, B=None, T=None):
    g = torch.Generator().manual_seed(seed)
    B = B or int(torch.randint(2, 7, (1,), generator=g))
    T = T or int(torch.randint(1, 23, (1,), generator=g))
    logps = -torch.rand(B, T, generator=g) * 4
    old = logps + 0.4 * torch.randn(B, T, generator=g)          # ratios well outside [0.8, 1.2] too
    ref = logps + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    return logps, old, ref, adv, mask


CASES = [  # (loss_type, beta, eps_low, eps_high, delta)
    ("grpo", 0.04, 0.2, 0.2, None), ("grpo", 0.0, 0.2, 0.28, None), ("dapo", 0.04, 0.2, 0.28, None),
    ("dr_grpo", 0.04, 0.1, 0.3, None), ("grpo", 0.04, 0.2, 0.2, 1.5), ("dapo", 0.5, 0.3, 0.25, None),
]


@pytest.mark.parametrize("loss_type,beta,eps_low,eps_high,delta", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_total_and_grad_equal_trl(loss_type, beta, eps_low, eps_high, delta, seed):
    logps, old, ref, adv, mask = random_case(seed * 31 + len(loss_type))
    mcl = logps.shape[1] + 5
    ours_lp = logps.clone().requires_grad_(True)
    out = grpo_loss(ours_lp, old, ref, adv, mask, loss_type=loss_type, beta=beta, epsilon_low=eps_low,
                    epsilon_high=eps_high, delta=delta, max_completion_length=mcl)
    out.loss.backward()
    theirs_lp = logps.clone().requires_grad_(True)
    ref_loss, metrics = trl_loss(theirs_lp, old, ref, adv, mask, loss_type=loss_type, beta=beta,
                                 eps_low=eps_low, eps_high=eps_high, delta=delta, max_completion_length=mcl)
    ref_loss.backward()
    assert torch.allclose(out.loss, ref_loss, atol=1e-6, rtol=0), (float(out.loss), float(ref_loss))
    assert torch.allclose(ours_lp.grad, theirs_lp.grad, atol=1e-6, rtol=0)
    assert ours_lp.grad.abs().sum() > 0
    assert out.stats["clip_ratio/region"] == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-6)
    if beta:
        assert out.stats["kl"] == pytest.approx(metrics["kl"][0], abs=1e-6)


@pytest.mark.parametrize("beta,eps_low,eps_high,delta", [(0.04, 0.2, 0.2, None), (0.1, 0.15, 0.3, 1.3)])
def test_per_token_loss_equals_trl(beta, eps_low, eps_high, delta):
    logps, old, ref, adv, mask = random_case(7, B=3, T=7)
    out = grpo_loss(logps, old, ref, adv, mask, beta=beta, epsilon_low=eps_low, epsilon_high=eps_high, delta=delta)
    for i in range(3):
        for t in range(7):
            onehot = torch.zeros(3, 7, dtype=torch.bool)
            onehot[i, t] = True
            tok, _ = trl_loss(logps, old, ref, adv, onehot, loss_type="dapo", beta=beta, eps_low=eps_low,
                              eps_high=eps_high, delta=delta, num_items=1)
            assert abs(float(out.per_token_BT[i, t]) - float(tok)) <= 1e-6, (i, t)


def test_on_policy_ratio_is_one_with_live_gradient():
    logps, _, ref, adv, mask = random_case(3)
    lp = logps.clone().requires_grad_(True)
    out = grpo_loss(lp, None, ref, adv, mask, beta=0.0)
    assert out.stats["ratio_mean"] == pytest.approx(1.0)
    out.loss.backward()
    # d/dlogp of -A*exp(logp - sg(logp)) = -A / n_i / B at each valid token
    n = mask.sum(-1, keepdim=True).float()
    expect = (-adv[:, None] / n / logps.shape[0]) * mask
    assert torch.allclose(lp.grad, expect, atol=1e-7)


def test_k3_is_nonnegative_and_zero_at_equality():
    a = torch.randn(50) * 3
    b = torch.randn(50) * 3
    assert (k3_kl(a, b) >= 0).all()
    assert torch.equal(k3_kl(a, a), torch.zeros(50))


def test_group_advantages_against_loop():
    g = torch.Generator().manual_seed(11)
    r = torch.rand(5 * 8, generator=g) * 2
    adv = group_advantages(r, 8)
    for k in range(5):
        grp = r[8 * k: 8 * k + 8].tolist()
        mean = sum(grp) / 8
        std = (sum((x - mean) ** 2 for x in grp) / 7) ** 0.5        # unbiased
        for j, x in enumerate(grp):
            assert adv[8 * k + j].item() == pytest.approx((x - mean) / (std + 1e-4), rel=1e-5, abs=1e-5)
    # equal rewards -> zero advantage (no NaN), and Dr. GRPO's unscaled form
    assert torch.equal(group_advantages(torch.ones(8), 4), torch.zeros(8))
    assert torch.allclose(group_advantages(r, 8, scale=False), (r.view(5, 8) - r.view(5, 8).mean(1, keepdim=True)).view(-1))


def test_bad_inputs_raise_named_errors():
    logps, old, ref, adv, mask = random_case(5)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logps, old, ref, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logps_BT"):
        grpo_loss(logps, old, None, adv, mask, beta=0.04)
    with pytest.raises(ValueError, match="mask_BT"):
        grpo_loss(logps, old, ref, adv, mask[:, :-1] if mask.shape[1] > 1 else mask[:1])
    with pytest.raises(ValueError, match="advantages_B"):
        grpo_loss(logps, old, ref, adv[:-1], mask)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logps, old, ref, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(7), 2)
    assert set(LOSS_REDUCTIONS) == {"grpo", "dapo", "dr_grpo"}


def test_pad_rows_keeps_gradient():
    rows = [torch.randn(n, requires_grad=True) for n in (3, 0, 5)]
    out, mask = pad_rows(rows)
    assert out.shape == (3, 5) and mask.sum() == 8 and not mask[1].any()
    out.sum().backward()
    assert all(r.grad is not None and torch.equal(r.grad, torch.ones_like(r)) for r in rows)
