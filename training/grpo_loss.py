"""RA-GRPO loss: group advantages, clipped policy term, k3 KL, and the three reductions users expect.

Everything here is pure tensor math on padded (B, T) rows, one row per episode, holding ONLY the tokens the
model generated (every round's text and its sampled <|im_end|>); observation turns, media and templates
never enter these tensors (spec section 6), so `mask_BT` only marks padding.

Legend: B episodes (rollouts), T longest episode's generated-token count, G rollouts per prompt.

Per token (spec section 6; TRL 1.16 `GRPOTrainer._compute_loss` with importance_sampling_level="token"):
    ratio = exp(logp - old_logp)
    pg    = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)     (ratio capped at `delta` if set)
    kl    = exp(ref - logp) - (ref - logp) - 1                                (k3 estimator)
    loss  = pg + beta * kl
Reductions, each a small function selected by name in `LOSS_REDUCTIONS`:
    "grpo"     mean over episodes of each episode's token mean        (the method's; Video-CoM, DeepSeekMath)
    "dapo"     token-level: sum over all tokens / tokens in the whole batch (pass `num_tokens` when the batch
               is split over ranks or accumulation steps so every micro-batch shares one denominator)
    "dr_grpo"  sum over all tokens / (B * max_completion_length)        (Dr. GRPO: no length bias)
tests/test_grpo_loss.py checks per-token values, totals and gradients against TRL's own `_compute_loss`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# --- advantages ------------------------------------------------------------------------------------------


def group_advantages(rewards_N: torch.Tensor, group_size: int, *, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std (unbiased) + eps); consecutive `group_size` rewards form a group.

    `scale=False` gives Dr. GRPO's unscaled advantage r - mean.
    """
    rewards_N = torch.as_tensor(rewards_N, dtype=torch.float32)
    if rewards_N.dim() != 1:
        raise ValueError(f"group_advantages: rewards_N must be 1-D, got shape {tuple(rewards_N.shape)}")
    if group_size < 1 or rewards_N.numel() % group_size:
        raise ValueError(f"group_advantages: group_size={group_size} does not divide {rewards_N.numel()} rewards")
    r_GK = rewards_N.view(-1, group_size)
    adv_GK = r_GK - r_GK.mean(dim=1, keepdim=True)
    if scale:
        # a group of one has no spread: torch.std would give NaN (unbiased), treat it as 0
        std = r_GK.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r_GK[:, :1])
        adv_GK = adv_GK / (std + eps)
    return adv_GK.reshape(-1)


# --- per-token terms -------------------------------------------------------------------------------------


def k3_kl(logps_BT: torch.Tensor, ref_logps_BT: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref), per token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logps_BT - logps_BT
    return torch.exp(d) - d - 1


def clipped_policy_term(logps_BT, old_logps_BT, advantages_B1, *, epsilon_low: float, epsilon_high: float,
                        delta: float | None = None):
    """(per-token -min(r*A, clip(r)*A), ratio r). `delta` caps r from above (TRL's two-sided clipping)."""
    ratio_BT = torch.exp(logps_BT - old_logps_BT)
    clipped_BT = torch.clamp(ratio_BT, 1 - epsilon_low, 1 + epsilon_high)
    capped_BT = torch.clamp(ratio_BT, max=delta) if delta is not None else ratio_BT
    return -torch.min(capped_BT * advantages_B1, clipped_BT * advantages_B1), ratio_BT


# --- reductions -----------------------------------------------------------------------------------------


def reduce_grpo(per_token_BT, mask_BT, **_):
    return ((per_token_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1.0)).mean()


def reduce_dapo(per_token_BT, mask_BT, *, num_tokens=None, **_):
    denom = mask_BT.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=per_token_BT.dtype)
    return (per_token_BT * mask_BT).sum() / denom.clamp(min=1.0)


def reduce_dr_grpo(per_token_BT, mask_BT, *, max_completion_length=None, **_):
    if not max_completion_length:
        raise ValueError("dr_grpo: max_completion_length must be a positive int (episode token cap)")
    return (per_token_BT * mask_BT).sum() / (per_token_BT.shape[0] * max_completion_length)


LOSS_REDUCTIONS = {"grpo": reduce_grpo, "dapo": reduce_dapo, "dr_grpo": reduce_dr_grpo}


# --- the loss --------------------------------------------------------------------------------------------


@dataclass
class LossOutput:
    loss: torch.Tensor                  # scalar, differentiable
    per_token_BT: torch.Tensor          # pg + beta * kl, unmasked
    kl_BT: torch.Tensor | None
    stats: dict = field(default_factory=dict)   # floats for logging (the loss's value too), one device read


def grpo_loss(logps_BT: torch.Tensor, old_logps_BT: torch.Tensor | None, ref_logps_BT: torch.Tensor | None,
              advantages_B: torch.Tensor, mask_BT: torch.Tensor, *, loss_type: str = "grpo",
              beta: float = 0.04, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
              delta: float | None = None, max_completion_length: int | None = None,
              num_tokens=None) -> LossOutput:
    """The RA-GRPO loss over padded generated-token rows. `old_logps_BT=None` means on-policy (num_iterations
    1): the ratio is exp(logp - logp.detach()) = 1 with the policy gradient intact, as in TRL."""
    if loss_type not in LOSS_REDUCTIONS:
        raise ValueError(f"grpo_loss: loss_type must be one of {sorted(LOSS_REDUCTIONS)}, got {loss_type!r}")
    if logps_BT.dim() != 2 or mask_BT.shape != logps_BT.shape:
        raise ValueError(f"grpo_loss: logps_BT {tuple(logps_BT.shape)} and mask_BT {tuple(mask_BT.shape)} "
                         "must be the same (B, T) shape")
    if advantages_B.shape[0] != logps_BT.shape[0]:
        raise ValueError(f"grpo_loss: advantages_B has {advantages_B.shape[0]} rows, logps_BT {logps_BT.shape[0]}")
    if beta != 0.0 and ref_logps_BT is None:
        raise ValueError("grpo_loss: ref_logps_BT is required when beta != 0")
    # advantages come from host rewards and masks may be built on the host: both go to the log-probs' device
    mask_BT = mask_BT.to(logps_BT.device, logps_BT.dtype, non_blocking=True)
    old_logps_BT = logps_BT.detach() if old_logps_BT is None else old_logps_BT
    adv_B1 = advantages_B.to(logps_BT.device, logps_BT.dtype, non_blocking=True).view(-1, 1)

    per_token_BT, ratio_BT = clipped_policy_term(logps_BT, old_logps_BT, adv_B1, epsilon_low=epsilon_low,
                                                 epsilon_high=epsilon_high, delta=delta)
    kl_BT = None
    if beta != 0.0:
        kl_BT = k3_kl(logps_BT, ref_logps_BT)
        per_token_BT = per_token_BT + beta * kl_BT
    loss = LOSS_REDUCTIONS[loss_type](per_token_BT, mask_BT, num_tokens=num_tokens,
                                      max_completion_length=max_completion_length)
    return LossOutput(loss, per_token_BT, kl_BT, _stats(loss, ratio_BT, adv_B1, kl_BT, mask_BT, epsilon_low,
                                                         epsilon_high))


@torch.no_grad()
def _stats(loss, ratio_BT, adv_B1, kl_BT, mask_BT, epsilon_low, epsilon_high) -> dict:
    """Floats for logging, the loss's value included, read from the device in ONE transfer (one sync)."""
    n = mask_BT.sum().clamp(min=1.0)
    low = ((ratio_BT < 1 - epsilon_low) & (adv_B1 < 0)).to(mask_BT.dtype)
    high = ((ratio_BT > 1 + epsilon_high) & (adv_B1 > 0)).to(mask_BT.dtype)
    vals = {"loss": loss.detach().to(n.dtype), "clip_ratio/low": (low * mask_BT).sum() / n,
            "clip_ratio/high": (high * mask_BT).sum() / n,
            "clip_ratio/region": ((low + high).clamp(max=1) * mask_BT).sum() / n,
            "ratio_mean": (ratio_BT * mask_BT).sum() / n, "num_tokens": mask_BT.sum()}
    if kl_BT is not None:
        vals["kl"] = (kl_BT * mask_BT).sum() / n
    return dict(zip(vals, torch.stack(list(vals.values())).tolist()))


def pad_rows(rows: list[torch.Tensor], value: float = 0.0):
    """Ragged 1-D rows -> ((B, T) padded, (B, T) bool mask); keeps autograd through the rows."""
    if not rows:
        raise ValueError("pad_rows: no rows")
    T = max(1, max(r.shape[0] for r in rows))
    out_BT = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)
    if out_BT.shape[1] < T:
        out_BT = torch.nn.functional.pad(out_BT, (0, T - out_BT.shape[1]), value=value)
    # built on the host from Python lengths (no device read), then one copy to the rows' device
    lengths = torch.tensor([r.shape[0] for r in rows])
    mask_BT = (torch.arange(T)[None, :] < lengths[:, None]).to(out_BT.device, non_blocking=True)
    return out_BT, mask_BT
