"""The engine's own forward of the Qwen2.5-VL vision tower: same values as transformers, fewer memory passes.

Why: at the method's media budgets the vision tower is ~30-40% of the rollout engine's wall time, and on the
CPU half of that was elementwise work (rotary: mul/neg/cat/add over q and k) and ~830 separate SDPA calls
(one per window, one per frame) for 4 videos of grid (16, 18, 30). What this module does instead:

1. Rows are put once, at the input, into a "window-sorted" order: windows of equal size are contiguous
   (transformers orders windows item by item, frame by frame). A window block then runs ONE SDPA call per
   distinct window size (a window grid has at most 4 sizes: full, cut at the bottom, right, both), on a
   zero-copy (n_windows, heads, size, head_dim) view of the fused QKV output. Full-attention blocks (each
   frame attends to itself) gather their rows into frame order, one SDPA call per distinct frame length,
   and scatter back; whichever grouping serves more blocks is the primary order (window-sorted for Qwen's
   28 window + 4 full blocks). Rows are restored once, after the merger (transformers does the same).
2. Rotary: cos/sin are computed once per grid, in float32 as transformers does (it also upcasts q/k to
   float32 and casts back), and cached by grid. q and k are rotated together, in place in the QKV output:
   z = x*sin, x *= cos, x1 -= z2, x2 += z1 (2 full + 2 half passes; transformers: mul, neg, cat, mul, add
   for q and again for k). Every product is rounded before its sum as in `q*cos + rotate_half(q)*sin`, so
   results equal transformers' to the bit (fp32/bf16 measured bit-equal; fp64 within 2e-16).
   NOTE: not addcmul: its kernel fuses to an FMA and lands 1 ulp off.
3. Fewer passes and allocations: each SDPA group's output goes straight into the output projection
   (addmm into a slice, what F.linear runs; no per-window cat, no copy); residual adds, SiLU and the gate
   product run in place. Inference only (no autograd), like the engine that calls it.

Nothing derived from weights is cached: the optimizer updates the policy in place between rollouts. Only
grid-derived tables (row orders, group shapes, cos/sin) are cached, keyed by the grid tuple, LRU-bounded.

Legend: P patch rows, U merge units (P / merge**2), D vision width, H heads, d head dim, N media items.
Run the check: .venv/bin/pytest tests/test_vision_forward.py ; speed: bench/bench_vision_forward.py
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from videocom_fast.modeling import inner

_PLAN_CACHE_SIZE = 16
_ACTS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


# --- which models the fast path can run ------------------------------------------------------------------

def _expected_types():
    from transformers.activations import GELUActivation, GELUTanh, SiLUActivation
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as q
    return q, {"silu": (SiLUActivation, torch.nn.SiLU), "swish": (SiLUActivation, torch.nn.SiLU),
               "gelu": (GELUActivation,), "gelu_pytorch_tanh": (GELUTanh,)}


def supports(model) -> str | None:
    """None if `VisionForward` computes this model's vision tower exactly, else the reason it cannot."""
    q, act_types = _expected_types()
    vis = getattr(inner(model), "visual", None)
    if type(vis) is not q.Qwen2_5_VisionTransformerPretrainedModel:
        return f"vision tower is {type(vis).__name__}, not Qwen2_5_VisionTransformerPretrainedModel"
    cfg = vis.config
    if cfg.hidden_act not in _ACTS:
        return f"vision hidden_act {cfg.hidden_act!r} is not one of {sorted(_ACTS)}"
    if vis.rotary_pos_emb.rope_type != "axial":
        return f"vision rope_type {vis.rotary_pos_emb.rope_type!r} is not 'axial'"
    expected = {
        "": q.Qwen2_5_VisionTransformerPretrainedModel, "patch_embed": q.Qwen2_5_VisionPatchEmbed,
        "patch_embed.proj": torch.nn.Conv3d, "rotary_pos_emb": q.Qwen2_5_VLVisionRotaryEmbedding,
        "blocks": torch.nn.ModuleList, "merger": q.Qwen2_5_VLPatchMerger, "merger.ln_q": q.Qwen2_5_VLRMSNorm,
        "merger.mlp": torch.nn.Sequential, "merger.mlp.0": torch.nn.Linear, "merger.mlp.1": torch.nn.GELU,
        "merger.mlp.2": torch.nn.Linear,
    }
    for i in range(len(vis.blocks)):
        b = f"blocks.{i}"
        expected.update({b: q.Qwen2_5_VLVisionBlock, f"{b}.norm1": q.Qwen2_5_VLRMSNorm,
                         f"{b}.norm2": q.Qwen2_5_VLRMSNorm, f"{b}.attn": q.Qwen2_5_VLVisionAttention,
                         f"{b}.attn.qkv": torch.nn.Linear, f"{b}.attn.proj": torch.nn.Linear,
                         f"{b}.mlp": q.Qwen2_5_VLMLP, f"{b}.mlp.gate_proj": torch.nn.Linear,
                         f"{b}.mlp.up_proj": torch.nn.Linear, f"{b}.mlp.down_proj": torch.nn.Linear,
                         f"{b}.mlp.act_fn": act_types[cfg.hidden_act]})
    seen = set()
    for name, mod in vis.named_modules():
        seen.add(name)
        want = expected.get(name)
        label = f"visual.{name}" if name else "visual"
        if want is None:
            return f"unexpected vision submodule {label} ({type(mod).__name__})"
        if type(mod) not in (want if isinstance(want, tuple) else (want,)):
            return f"{label} is {type(mod).__name__} (a wrapped or replaced module, e.g. PEFT), not " \
                   f"{'/'.join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))}"
        if (mod._forward_hooks or mod._forward_pre_hooks or getattr(mod, "_backward_hooks", None)
                or getattr(mod, "_forward_hooks_with_kwargs", None)):
            return f"{label} has module hooks (e.g. ZeRO-3 parameter gathering)"
        if "forward" in vars(mod):          # e.g. inside modeling.patch_embed_as_matmul, or a monkey-patch
            return f"{label} has an instance-level forward override"
    if missing := sorted(set(expected) - seen):
        return f"vision submodules missing: {missing[:3]}"
    if getattr(torch.nn.modules.module, "_global_forward_hooks", None) or \
            getattr(torch.nn.modules.module, "_global_forward_pre_hooks", None):
        return "global module forward hooks are registered"
    conv = vis.patch_embed.proj
    if tuple(conv.kernel_size) != tuple(conv.stride) or any(conv.padding) or conv.groups != 1 or \
            conv.bias is not None:
        return "visual.patch_embed.proj is not a bias-free Conv3d with kernel == stride"
    if any(p.numel() == 0 for p in vis.parameters()):
        return "vision parameters are empty (partitioned by ZeRO-3 and not gathered?)"
    dtypes = {p.dtype for p in vis.parameters()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        return f"vision parameters have dtypes {sorted(map(str, dtypes))} (one floating dtype expected)"
    if vis.blocks and vis.blocks[0].attn.head_dim % 4:
        return f"vision head_dim {vis.blocks[0].attn.head_dim} is not a multiple of 4"
    return None


# --- grid plan: row orders, attention groups, rotary tables (derived from grids only) --------------------

@dataclass
class _Groups:
    gather_U: torch.Tensor | None   # units of the primary order, in this grouping's order (None: identity)
    scatter_U: torch.Tensor | None  # its inverse
    shapes: list                    # [(row_start, n_sequences, length)] in this grouping's order


@dataclass
class _Plan:
    units_U: torch.Tensor           # primary order -> merge unit in item order (the input gather)
    out_U: torch.Tensor             # merged rows in item order <- index into primary-order units
    window: _Groups
    frame: _Groups
    cos_RD: torch.Tensor            # (P, d) float32, primary order, as transformers lays it out
    sin_RD: torch.Tensor
    split_sizes: list

    def to(self, device) -> "_Plan":
        """The plan with every tensor on `device` (index tensors must live with the activations)."""
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        grp = lambda g: _Groups(mv(g.gather_U), mv(g.scatter_U), g.shapes)  # noqa: E731
        return _Plan(mv(self.units_U), mv(self.out_U), grp(self.window), grp(self.frame), mv(self.cos_RD),
                     mv(self.sin_RD), self.split_sizes)


def _units_hf_order(grid: list, merge: int, win: int):
    """Per item: HF's window order of merge units (global unit ids), each unit's window length (rows) and
    each unit's frame id. Mirrors transformers' get_vision_window_index, vectorized per frame."""
    units, win_len, frame_id = [], [], []
    base, frame = 0, 0
    for t, h, w in grid:
        mh, mw = h // merge, w // merge
        bh, bw = np.arange(mh) // win, np.arange(mw) // win     # window row/col of each unit row/col
        nwh, nww = -(-mh // win), -(-mw // win)
        key = (bh[:, None] * nww + bw[None, :]).reshape(-1)       # window id of each unit in a frame
        order = np.argsort(key, kind="stable")                     # windows row-major, units row-major within
        counts = np.bincount(key, minlength=nwh * nww)
        per_frame_len = (counts[key] * merge * merge)[order]
        offs = base + np.arange(t)[:, None] * (mh * mw)
        units.append((offs + order[None, :]).reshape(-1))
        win_len.append(np.tile(per_frame_len, t))
        frame_id.append(np.repeat(np.arange(frame, frame + t), mh * mw))
        base += t * mh * mw
        frame += t
    return np.concatenate(units), np.concatenate(win_len), np.concatenate(frame_id)


def _group_shapes(lengths_R: np.ndarray) -> list:
    """[(row_start, n, L)] for runs of equal-length sequences, rows already grouped."""
    shapes, start, P = [], 0, len(lengths_R)
    while start < P:
        L = int(lengths_R[start])
        end = start + int(np.searchsorted(lengths_R[start:] != L, True))   # lengths are sorted
        shapes.append((start, (end - start) // L, L))
        start = end
    return shapes


def _build_plan(grid: list, merge: int, win: int, inv_freq: torch.Tensor, scaling: float,
                primary_is_window: bool) -> _Plan:
    mu = merge * merge
    units_hf, wlen_hf, frame_hf = _units_hf_order(grid, merge, win)
    U = len(units_hf)
    flen = np.array([(h // merge) * (w // merge) * mu for t, h, w in grid for _ in range(t)])
    # window-sorted: stable by window length (keeps HF's order within a length); frame order: HF's order
    # within a frame (same SDPA key order as transformers), frames stably sorted by length.
    by_window = np.argsort(wlen_hf, kind="stable")           # positions in HF order
    by_frame = np.argsort(flen[frame_hf], kind="stable")
    primary = by_window if primary_is_window else by_frame
    inv_primary = np.empty(U, dtype=np.int64)
    inv_primary[primary] = np.arange(U)
    sub = np.arange(mu)

    def groups(order, length_of_hf_pos):
        lengths = np.repeat(length_of_hf_pos[order], mu)
        shapes = _group_shapes(lengths)
        gather = inv_primary[order]
        if np.array_equal(gather, np.arange(U)):
            return _Groups(None, None, shapes)
        scatter = np.empty(U, dtype=np.int64)
        scatter[gather] = np.arange(U)
        return _Groups(torch.from_numpy(gather), torch.from_numpy(scatter), shapes)

    # rotary positions of every row in the primary order (block-major (bh, bw, ih, iw) layout of each frame)
    units_p = units_hf[primary]
    hpos, wpos = [], []
    for t, h, w in grid:
        mh, mw = h // merge, w // merge
        hh = (np.arange(mh)[:, None, None, None] * merge + np.arange(merge)[None, None, :, None])
        ww = (np.arange(mw)[None, :, None, None] * merge + np.arange(merge)[None, None, None, :])
        hh, ww = np.broadcast_arrays(hh, ww)
        hpos.append(np.tile(hh.reshape(-1), t))
        wpos.append(np.tile(ww.reshape(-1), t))
    src_rows = torch.from_numpy((units_p[:, None] * mu + sub[None, :]).reshape(-1))
    pos_R2 = torch.from_numpy(np.stack([np.concatenate(hpos), np.concatenate(wpos)], -1))[src_rows]
    # transformers: (pos.float() * inv_freq).cos() * scaling, in float32; cos = [cos_h, cos_w, cos_h, cos_w]
    freqs = pos_R2[..., None].float() * inv_freq.float()
    cos, sin = freqs.cos() * scaling, freqs.sin() * scaling
    cos_RD = torch.cat([cos[:, 0], cos[:, 1], cos[:, 0], cos[:, 1]], -1).contiguous()
    sin_RD = torch.cat([sin[:, 0], sin[:, 1], sin[:, 0], sin[:, 1]], -1).contiguous()
    # merged output rows back in item order: unit u of the item order sits at inv_primary[hf_pos_of(u)]
    hf_pos = np.empty(U, dtype=np.int64)
    hf_pos[units_hf] = np.arange(U)
    out_U = torch.from_numpy(inv_primary[hf_pos])
    return _Plan(units_U=torch.from_numpy(units_p), out_U=out_U, window=groups(by_window, wlen_hf),
                 frame=groups(by_frame, flen[frame_hf]), cos_RD=cos_RD, sin_RD=sin_RD,
                 split_sizes=[t * h * w // mu for t, h, w in grid])


# --- the forward ---------------------------------------------------------------------------------------

def _rms_norm(x, norm):
    """transformers' Qwen2_5_VLRMSNorm, same roundings: float32 math, cast back, then the weight."""
    dt = x.dtype
    x32 = x.to(torch.float32)
    var = x32.pow(2).mean(-1, keepdim=True)
    y = x32 * torch.rsqrt(var + norm.variance_epsilon)
    return (y.to(dt) if dt != torch.float32 else y).mul_(norm.weight)     # weight * y: same product


def _rotary_(qkv_R3HD, cos_RD, sin_RD):
    """Rotate q and k of the fused QKV output in place: q*cos + rotate_half(q)*sin in float32, each product
    rounded before its sum exactly as transformers does. NOTE: not addcmul: it fuses to an FMA (1 ulp off)."""
    d2 = qkv_R3HD.shape[-1] // 2
    qk = qkv_R3HD[:, :2]
    x = qk if qk.dtype == torch.float32 else qk.float()
    z = x * sin_RD[:, None, None, :]            # [q1*s, q2*s]
    x.mul_(cos_RD[:, None, None, :])            # [q1*c, q2*c]
    x[..., :d2].sub_(z[..., d2:])               # q1*c + (-q2)*s
    x[..., d2:].add_(z[..., :d2])               # q2*c + q1*s
    if x is not qk:
        qk.copy_(x)


def _units(x_R, idx_U):
    """Rows of x gathered merge unit by merge unit (index_select on (U, mu*width) rows: ~3x faster than by row)."""
    U = idx_U.shape[0]
    return x_R.reshape(U, -1).index_select(0, idx_U).view(x_R.shape)


def _attend_proj(qkv_R3HD, groups: _Groups, scale: float, proj) -> torch.Tensor:
    """proj(attention) (P, D) in the primary order: one SDPA call per (n, L) group of equal-length sequences,
    each group's output projected straight from SDPA's (n, L, H, d) buffer (no concatenation)."""
    P, _, H, d = qkv_R3HD.shape
    src = qkv_R3HD if groups.gather_U is None else _units(qkv_R3HD, groups.gather_U)
    out_RD = src.new_empty(P, proj.weight.shape[0])
    for start, n, L in groups.shapes:
        blk = src[start:start + n * L].view(n, L, 3, H, d)
        q, k, v = (blk[:, :, i].transpose(1, 2) for i in range(3))
        o = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(n * L, H * d)
        dst = out_RD[start:start + n * L]
        if proj.bias is None:
            torch.mm(o, proj.weight.t(), out=dst)
        else:                                   # what F.linear runs: addmm(bias, x, W^T)
            torch.addmm(proj.bias, o, proj.weight.t(), out=dst)
    return out_RD if groups.scatter_U is None else _units(out_RD, groups.scatter_U)


class VisionForward:
    """`VisionForward(model)(pixel_values_PC, grid_thw_N3)` == `modeling.vision_embeds(model, ...)`:
    one (t*h*w/merge**2, out_hidden) tensor per item. Check `supports(model)` first."""

    def __init__(self, model):
        reason = supports(model)
        if reason is not None:
            raise ValueError(f"VisionForward: {reason}")
        self.model = model
        self._plans: OrderedDict = OrderedDict()
        # host copy of the rotary frequencies, read once here (per new grid it would be a device sync)
        self._inv_freq = inner(model).visual.rotary_pos_emb.inv_freq.detach().cpu()

    def _plan(self, grid: tuple, vis, device) -> _Plan:
        """The grid's plan on `device` (built on the CPU once, moved once per device, LRU-cached)."""
        key = (grid, str(device))
        plan = self._plans.get(key)
        if plan is None:
            cfg = vis.config
            n_full = sum(i in cfg.fullatt_block_indexes for i in range(len(vis.blocks)))
            plan = _build_plan(list(grid), cfg.spatial_merge_size,
                               cfg.window_size // cfg.spatial_merge_size // cfg.patch_size,
                               self._inv_freq, float(vis.rotary_pos_emb.attention_scaling),
                               primary_is_window=len(vis.blocks) - n_full >= n_full)
            if torch.device(device).type != "cpu":
                plan = plan.to(device)
            self._plans[key] = plan
            while len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def _check(self, pixel_values_PC, grid_thw_N3, vis) -> tuple:
        cfg = vis.config
        if not isinstance(grid_thw_N3, torch.Tensor) or grid_thw_N3.dim() != 2 or grid_thw_N3.shape[1] != 3:
            raise ValueError(f"grid_thw_N3 must be an (N, 3) tensor, got "
                             f"{getattr(grid_thw_N3, 'shape', type(grid_thw_N3))}")
        if grid_thw_N3.is_floating_point():
            raise ValueError("grid_thw_N3 must hold integers")
        grid = tuple(tuple(int(v) for v in row) for row in grid_thw_N3.tolist())
        m = cfg.spatial_merge_size
        for i, (t, h, w) in enumerate(grid):
            if t < 1 or h < 1 or w < 1 or h % m or w % m:
                raise ValueError(f"grid_thw_N3[{i}] = {(t, h, w)}: t, h, w must be positive and h, w multiples "
                                 f"of spatial_merge_size {m}")
        width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        if not isinstance(pixel_values_PC, torch.Tensor) or pixel_values_PC.dim() != 2 or \
                pixel_values_PC.shape[1] != width:
            raise ValueError(f"pixel_values_PC must be a (P, {width}) tensor, got "
                             f"{getattr(pixel_values_PC, 'shape', type(pixel_values_PC))}")
        P = sum(t * h * w for t, h, w in grid)
        if pixel_values_PC.shape[0] != P:
            raise ValueError(f"pixel_values_PC has {pixel_values_PC.shape[0]} rows but grid_thw_N3 sums to {P}")
        return grid

    @torch.no_grad()
    def __call__(self, pixel_values_PC: torch.Tensor, grid_thw_N3: torch.Tensor) -> list[torch.Tensor]:
        if grid_thw_N3 is None or grid_thw_N3.numel() == 0:
            return []
        h_RD, plan = self._tower(pixel_values_PC, grid_thw_N3)
        mg = inner(self.model).visual.merger
        z = _rms_norm(h_RD, mg.ln_q).view(-1, mg.hidden_size)
        z = F.linear(F.gelu(F.linear(z, mg.mlp[0].weight, mg.mlp[0].bias), approximate=mg.mlp[1].approximate),
                     mg.mlp[2].weight, mg.mlp[2].bias)
        return list(z.index_select(0, plan.out_U).split(plan.split_sizes))

    def trainable_merger(self, pixel_values_PC: torch.Tensor, grid_thw_N3: torch.Tensor) -> list[torch.Tensor]:
        """Same as calling it, but the merger (the projector) runs as its own module under autograd: for
        training the merger on a frozen tower (SFT of issue 17), whose blocks need no graph."""
        if grid_thw_N3 is None or grid_thw_N3.numel() == 0:
            return []
        with torch.no_grad():
            h_RD, plan = self._tower(pixel_values_PC, grid_thw_N3)
        z = inner(self.model).visual.merger(h_RD)
        return list(z.index_select(0, plan.out_U).split(plan.split_sizes))

    def _tower(self, pixel_values_PC: torch.Tensor, grid_thw_N3: torch.Tensor):
        """(h_RD, plan): the last block's output, rows in the plan's order, before the merger."""
        vis = inner(self.model).visual
        grid = self._check(pixel_values_PC, grid_thw_N3, vis)
        dev = pixel_values_PC.device
        plan = self._plan(grid, vis, dev)
        w = vis.patch_embed.proj.weight
        # patch embedding: Conv3d with kernel == stride on rows that already are patches = one matmul
        x = pixel_values_PC.to(w.dtype)
        h_RD = _units(F.linear(x, w.reshape(w.shape[0], -1)), plan.units_U)
        cos, sin = plan.cos_RD, plan.sin_RD
        full = set(vis.config.fullatt_block_indexes)
        for i, blk in enumerate(vis.blocks):
            a = blk.attn
            qkv = F.linear(_rms_norm(h_RD, blk.norm1), a.qkv.weight, a.qkv.bias)
            qkv = qkv.view(qkv.shape[0], 3, a.num_heads, a.head_dim)
            _rotary_(qkv, cos, sin)
            h_RD += _attend_proj(qkv, plan.frame if i in full else plan.window, a.scaling, a.proj)
            mlp = blk.mlp
            y = _rms_norm(h_RD, blk.norm2)
            g = _ACTS[vis.config.hidden_act](F.linear(y, mlp.gate_proj.weight, mlp.gate_proj.bias))
            g.mul_(F.linear(y, mlp.up_proj.weight, mlp.up_proj.bias))
            h_RD += F.linear(g, mlp.down_proj.weight, mlp.down_proj.bias)
        return h_RD, plan
