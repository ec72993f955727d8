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

Randomness, two interchangeable sources, both private to one rollout so that its samples do not depend on
which other sequences happen to share its engine step:
- a `torch.Generator` per rollout (`rollout_generator`), or
- counter-based uniforms (`rollout_key` + `counter_uniforms`): u = splitmix64(key + (counter + 1) * golden)
  with counter = the number of tokens of the sequence so far. The engine uses these: one vectorised numpy
  call per step instead of one generator call per row (~6 us each, ~20k per bench run).
For CPU float32 logits the whole sampler is one C++ call when the extension is built (`_C.sample_rows`,
csrc/cpu/sampling.cpp: scaling, log-probs, suppression, draw, forced tokens), else torch; same distribution
and the same token for the same uniform (tests/test_sampling.py compares the two).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


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


def _splitmix64(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def rollout_key(seed: int, sample_index: int, rollout_index: int) -> int:
    """A 64-bit key private to one rollout (for `counter_uniforms`)."""
    z = (seed * 1_000_003 + sample_index * 7919 + rollout_index * 104_729 + 17) % 2**64
    return int(_splitmix64(np.array([z], dtype=np.uint64))[0])


def counter_uniforms(keys_N: np.ndarray, counters_N: np.ndarray) -> np.ndarray:
    """(N,) float64 uniforms in [0, 1): row n is a pure function of (keys[n], counters[n])."""
    with np.errstate(over="ignore"):
        z = keys_N.astype(np.uint64) + (counters_N.astype(np.uint64) + np.uint64(1)) * _GOLDEN
    return (_splitmix64(z) >> np.uint64(11)).astype(np.float64) * 2.0**-53


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
           suppress_ids: torch.Tensor | None = None, *, uniforms: np.ndarray | torch.Tensor | None = None,
           forced: torch.Tensor | None = None, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (N,) int64, logprobs (N,) fp32). Randomness: one generator per row, or `uniforms` (N,) in
    [0, 1) (ignored when greedy): a numpy array (checked here) or a float64 tensor on the logits' device (the
    engine's uploaded step metadata; its host copy was checked when it was built). `forced` (N,) int64: where
    >= 0, that token replaces the draw (scripted rounds) and its log-prob is returned, computed the same way.
    `impl`: "auto" (the one-call C++ sampler for CPU float32 logits when built), "cpp" (require it), "torch".
    Sync-free on devices other than the CPU (no host read of a device value): the engine's step relies on it."""
    if logits_NV.ndim != 2:
        raise ValueError(f"sample: logits must be (N, V), got shape {tuple(logits_NV.shape)}")
    if impl not in ("auto", "cpp", "torch"):
        raise ValueError(f"sample: impl must be 'auto', 'cpp' or 'torch', got {impl!r}")
    N = logits_NV.shape[0]
    if isinstance(uniforms, torch.Tensor):
        if uniforms.shape != (N,) or uniforms.dtype != torch.float64:
            raise ValueError(f"sample: a uniforms tensor must be float64 (N,) = ({N},), got {uniforms.dtype} "
                             f"{tuple(uniforms.shape)}")
    elif uniforms is not None:
        uniforms = np.ascontiguousarray(uniforms, dtype=np.float64)
        if uniforms.shape != (N,) or not ((uniforms >= 0) & (uniforms < 1)).all():
            raise ValueError(f"sample: uniforms must be (N,) = ({N},) values in [0, 1), got shape {uniforms.shape}")
    elif not params.greedy and (generators is None or len(generators) != N):
        raise ValueError(f"sample: need one generator per row ({N}) or uniforms, got "
                         f"{None if generators is None else len(generators)}")
    if forced is not None and (forced.shape != (N,) or forced.dtype != torch.int64):
        raise ValueError(f"sample: forced must be int64 (N,) = ({N},), got {forced.dtype} {tuple(forced.shape)}")
    if impl != "torch" and _cpp_draw_ok(logits_NV):
        return _sample_rows(logits_NV, params, generators, suppress_ids, uniforms, forced)
    if impl == "cpp":
        raise ValueError("sample: impl='cpp' needs CPU float32 logits and the built videocom_fast._C")
    # log_softmax itself (not x - logsumexp, which rounds differently): bit-equal to the trainer's log-probs;
    # taken first, so the suppressed ids can then be set to -inf in place (the division made a new tensor)
    work = logits_NV.float() / params.temperature
    logp = work.log_softmax(-1)
    if suppress_ids is not None and suppress_ids.numel():
        work.index_fill_(-1, suppress_ids.to(work.device), float("-inf"))
    if params.greedy:
        tokens = work.argmax(-1)
    else:
        # inverse-CDF draw: one uniform per row from the row's own generator, then one vectorized search
        # (a per-row torch.multinomial call cost ~15x more on the CPU)
        if isinstance(uniforms, torch.Tensor):
            u = uniforms
        elif uniforms is not None:
            u = torch.from_numpy(uniforms).to(work.device)
        else:
            u = torch.stack([torch.rand((), generator=g, device=work.device, dtype=torch.float64) for g in generators])
        tokens = None
        if _top_k_only_applies(work, params):
            tokens, ties_N = _draw_top_k(work, params, u)
            # rows with ties at the k-th value take the full-vocabulary draw, the others keep theirs (the C++
            # draw decides per row too: same u, same token). On the CPU the full draw runs only when some row
            # ties; elsewhere no host read of the tie check (a sync): both draws, always
            if work.device.type != "cpu" or bool(ties_N.any()):
                tokens = torch.where(ties_N, _draw_full(work, params, u), tokens)
        if tokens is None:
            tokens = _draw_full(work, params, u)
    if forced is not None:
        tokens = torch.where(forced >= 0, forced, tokens)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def _cpp_draw_ok(work_NV: torch.Tensor) -> bool:
    if work_NV.device.type != "cpu" or work_NV.dtype != torch.float32:
        return False
    try:
        from videocom_fast import _C
    except ImportError:
        return False
    return hasattr(_C, "sample_rows")


_NONE = np.empty(0, dtype=np.int64)


def _sample_rows(logits_NV, params, generators, suppress_ids, uniforms, forced):
    """`sample` for CPU float32 logits: one C++ call (csrc/cpu/sampling.cpp `sample_rows`) for the whole step:
    the scaling, the log-probs, the suppression, the draw (or argmax) and the forced tokens. Log-probs within
    a few float32 ulps of the torch path's log_softmax (another exp and summation order; test_sampling.py)."""
    from videocom_fast import _C
    N = logits_NV.shape[0]
    if params.greedy:
        u = np.empty(0)
    elif isinstance(uniforms, torch.Tensor):
        u = np.ascontiguousarray(uniforms.numpy())
    elif uniforms is not None:
        u = uniforms
    else:
        u = np.array([torch.rand((), generator=g, dtype=torch.float64).item() for g in generators])
    tokens, lps = torch.empty(N, dtype=torch.int64), torch.empty(N, dtype=torch.float32)
    sup = _NONE if suppress_ids is None else np.ascontiguousarray(suppress_ids.cpu().numpy(), dtype=np.int64)
    forced = np.full(N, -1, dtype=np.int64) if forced is None else np.ascontiguousarray(forced.numpy())
    _C.sample_rows(logits_NV.detach().contiguous().numpy(), float(params.temperature), sup, u, forced,
                   params.top_k or 0, float(params.top_p), params.greedy, tokens.numpy(), lps.numpy())
    return tokens, lps


def _search(cdf_NK: torch.Tensor, u_N: torch.Tensor) -> torch.Tensor:
    pos = torch.searchsorted(cdf_NK, (u_N * cdf_NK[:, -1])[:, None], right=True).squeeze(-1)
    return pos.clamp_(max=cdf_NK.shape[-1] - 1)


def _top_k_only_applies(work_NV: torch.Tensor, params: SamplingParams) -> bool:
    return bool(params.top_k) and params.top_k < work_NV.shape[-1]


def _draw_full(work_NV: torch.Tensor, params: SamplingParams, u_N: torch.Tensor) -> torch.Tensor:
    cdf = filter_logits(work_NV, params.top_k, params.top_p).softmax(-1).double().cumsum(-1)
    return _search(cdf, u_N)


def _draw_top_k(work_NV: torch.Tensor, params: SamplingParams, u_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same filtered distribution as `filter_logits`, computed on the k largest logits only (sorted, so
    top-p needs no full-vocabulary sort): ~V/k less work per row. Also returns which rows have ties at their
    k-th value (top-k keeps them all: those rows must take the full-vocabulary draw)."""
    k = params.top_k
    vals_NK, idx_NK = work_NV.topk(k, dim=-1)                 # descending
    ties_N = (work_NV >= vals_NK[:, -1:]).sum(-1) > k
    asc = vals_NK.flip(-1)
    if params.top_p < 1.0:
        cum = asc.softmax(-1).cumsum(-1)
        drop = cum <= (1 - params.top_p)
        drop[..., -1:] = False                                 # always keep the most likely token
        asc = asc.masked_fill(drop, float("-inf"))
    cdf = asc.softmax(-1).double().cumsum(-1)
    return idx_NK.flip(-1).gather(-1, _search(cdf, u_N)[:, None]).squeeze(-1), ties_N
