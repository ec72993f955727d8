"""Next-token sampling for rollouts: temperature, top-k, top-p, greedy, one seeded generator per rollout.

Legend: N rows (one per sequence that samples this step), V vocabulary.

What the log-prob means (the trainer relies on it): `logprob = log_softmax(logits / temperature)[token]`
in fp32, computed BEFORE top-k / top-p truncation and before token suppression. That is what GRPO's
teacher-forced forward computes from the same weights (logits / temperature, full vocabulary), so the
importance ratio of an on-policy step is exactly 1 (spec section 6; defect 9: fp32, never bf16).

Filtering follows transformers' logits processors (TopKLogitsWarper then TopPLogitsWarper, the order
`generate` applies them): top-k keeps the k largest logits (ties at the k-th value kept), top-p keeps the
smallest set of most likely tokens whose probability reaches top_p (at least one token).
`suppress_ids` are token ids that may never be sampled (vision pads and markers: a sampled
<|image_pad|> would break the media layout of the sequence); `generate(suppress_tokens=...)` does the same,
so the naive loop and the engine agree.

Each rollout owns a `torch.Generator` seeded from (seed, sample index, rollout index): its samples do not
depend on which other sequences happen to share its engine step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.9
    top_k: int = 50          # 0 or None: no top-k
    top_p: float = 1.0       # 1.0: no top-p
    greedy: bool = False

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative int or None, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


def rollout_generator(seed: int, sample_index: int, rollout_index: int, device="cpu") -> torch.Generator:
    """A generator private to one rollout; the mixing constants only spread nearby seeds apart."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + sample_index * 7919 + rollout_index * 104_729 + 17) % (2**63 - 1))
    return g


def filter_logits(logits_NV: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """Logits with everything outside top-k / top-p set to -inf (new tensor)."""
    out = logits_NV.clone()
    V = out.shape[-1]
    if top_k and top_k < V:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(out, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= (1 - top_p)
        drop_sorted[..., -1:] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample(logits_NV: torch.Tensor, params: SamplingParams, generators: list[torch.Generator] | None = None,
           suppress_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (N,) int64, logprobs (N,) fp32). One generator per row (ignored when greedy)."""
    if logits_NV.ndim != 2:
        raise ValueError(f"sample: logits must be (N, V), got shape {tuple(logits_NV.shape)}")
    N = logits_NV.shape[0]
    if not params.greedy and (generators is None or len(generators) != N):
        raise ValueError(f"sample: need one generator per row ({N}), got "
                         f"{None if generators is None else len(generators)}")
    scaled = logits_NV.float() / params.temperature
    work = scaled
    if suppress_ids is not None and suppress_ids.numel():
        work = work.index_fill(-1, suppress_ids.to(work.device), float("-inf"))
    if params.greedy:
        tokens = work.argmax(-1)
    else:
        # inverse-CDF draw: one uniform per row from the row's own generator, then one vectorized search
        # (a per-row torch.multinomial call cost ~15x more on the CPU)
        u = torch.stack([torch.rand((), generator=g, device=work.device, dtype=torch.float64) for g in generators])
        tokens = _draw_top_k(work, params, u) if _top_k_only_applies(work, params) else None
        if tokens is None:
            probs = filter_logits(work, params.top_k, params.top_p).softmax(-1)
            cdf = probs.double().cumsum(-1)
            tokens = _search(cdf, u)
    # log_softmax itself (not x - logsumexp, which rounds differently): bit-equal to the trainer's log-probs
    return tokens, scaled.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


def _search(cdf_NK: torch.Tensor, u_N: torch.Tensor) -> torch.Tensor:
    pos = torch.searchsorted(cdf_NK, (u_N * cdf_NK[:, -1])[:, None], right=True).squeeze(-1)
    return pos.clamp_(max=cdf_NK.shape[-1] - 1)


def _top_k_only_applies(work_NV: torch.Tensor, params: SamplingParams) -> bool:
    return bool(params.top_k) and params.top_k < work_NV.shape[-1]


def _draw_top_k(work_NV: torch.Tensor, params: SamplingParams, u_N: torch.Tensor) -> torch.Tensor | None:
    """The same filtered distribution as `filter_logits`, computed on the k largest logits only (sorted, so
    top-p needs no full-vocabulary sort): ~V/k less work per row. None when a row has ties at its k-th
    value (top-k keeps them all; the caller then takes the full-vocabulary path)."""
    k = params.top_k
    vals_NK, idx_NK = work_NV.topk(k, dim=-1)                 # descending
    if bool(((work_NV >= vals_NK[:, -1:]).sum(-1) > k).any()):
        return None
    asc = vals_NK.flip(-1)
    if params.top_p < 1.0:
        cum = asc.softmax(-1).cumsum(-1)
        drop = cum <= (1 - params.top_p)
        drop[..., -1:] = False                                 # always keep the most likely token
        asc = asc.masked_fill(drop, float("-inf"))
    cdf = asc.softmax(-1).double().cumsum(-1)
    return idx_NK.flip(-1).gather(-1, _search(cdf, u_N)[:, None]).squeeze(-1)
