"""The engine's text forward: Qwen2/2.5-VL's decoder as a dozen tensor ops over one packed step.

Legend: L packed tokens of the step (B = 1), D hidden, Hq/Hkv query/key-value heads, Dh head dim, F MLP width.

Why: on the tiny model, transformers' module machinery (hooks, kwargs plumbing, mask and cache objects,
per-call rotary recomputation in 3 x B x L layout) cost ~3x the arithmetic of a step (measured: 13 ms per
300-token step through `language_model(...)`, of which ~1.5 ms are the linear layers). vLLM and gpt-fast
own their model code for the same reason. This one owns no weights: it reads the model's own parameters
at every call, so a policy updated in place by the optimizer is what the next rollout runs.

Per layer, with the step's K/V rows scattered into the paged pool before attention:
    h = rms(x) ; q, k, v = h Wq + bq, h Wk + bk, h Wv + bv ; q, k = rope(q), rope(k)
    pool[slots] = k, v ; x = x + attend(q) Wo ; x = x + (silu(rms(x) Wg) * (rms(x) Wu)) Wd
M-RoPE: frequency j of a head uses position row sel[j] (temporal / height / width by `mrope_section`), so
cos/sin are computed once per step as (L, Dh) from the (3, L) positions -- the same float32 products as
transformers' rotary module (then cast to the model dtype), so the two paths agree to rounding of the final
sums (tests/test_packed_forward.py: logits vs the model's own forward, float64 and float32).

`supports(model)` says why a model must take the transformers path instead: PEFT/LoRA-wrapped or quantized
linears, module hooks (e.g. DeepSpeed ZeRO-3 parameter gathering), sliding-window layers, rope scaling
other than the default, activations other than SiLU. The engine then calls `language_model(...)` with the
registered paged attention (attention.py): same tokens, slower.
"""
from __future__ import annotations

import types
import weakref

import torch
import torch.nn.functional as F

from . import attention as attn
from . import fused_step as fused


def _plain_linear(m) -> bool:
    return type(m) is torch.nn.Linear


def supports(model) -> str | None:
    """None when the packed forward can run `model`'s language model, else the reason it cannot."""
    from .. import modeling
    lm = modeling.inner(model).language_model
    cfg = lm.config
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
        return "sliding-window layers"
    if (cfg.rope_parameters or {}).get("rope_type", "default") != "default":
        return f"rope_type {cfg.rope_parameters.get('rope_type')!r}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    rot = lm.rotary_emb
    if not hasattr(rot, "inv_freq") or not hasattr(rot, "mrope_section"):
        return "a rotary module without inv_freq / mrope_section"
    for name, m in lm.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return f"forward hooks on {name or 'the language model'}"
    for layer in lm.layers:
        a, mlp = layer.self_attn, layer.mlp
        lins = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if not all(_plain_linear(m) for m in lins):
            return "linear layers that are not torch.nn.Linear (PEFT adapters, quantization)"
        if any(p.numel() == 0 for m in lins for p in m.parameters()):
            return "partitioned (empty) parameters"
    return None


def _rms(x, norm):
    """transformers' Qwen RMSNorm: float32 statistics, weight applied in the input dtype."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


class FusedWeights:
    """Per layer: q/k/v and gate/up weights concatenated (one matmul each), norm weights as detached aliases.

    Built once per language model and kept while its parameters are unchanged: `key` is every source
    parameter's (`_version`, data_ptr), so an optimizer step (in-place update: the version moves), a
    `load_state_dict` (copy_: same) or a `param.data = ...` swap (the pointer moves) makes `fused_weights`
    rebuild them. NOTE: the concatenated copies cost one more copy of the q/k/v and gate/up weights (8.5 GB for
    Qwen2.5-VL-7B in bf16): they live only while a `generate` runs (`release_fused_weights`), and
    docs/memory_7b.md counts them in the rollout phase.
    """

    def __init__(self, lm, key):
        self.key = key
        cat = lambda *ps: torch.cat([p.detach() for p in ps])  # noqa: E731
        self.layers = []
        for layer in lm.layers:
            a, mlp = layer.self_attn, layer.mlp
            qb = (a.q_proj.bias, a.k_proj.bias, a.v_proj.bias)
            self.layers.append(dict(
                ln1=layer.input_layernorm.weight.detach(), ln2=layer.post_attention_layernorm.weight.detach(),
                ln1_np=_np(layer.input_layernorm.weight), ln2_np=_np(layer.post_attention_layernorm.weight),
                eps1=float(layer.input_layernorm.variance_epsilon),
                eps2=float(layer.post_attention_layernorm.variance_epsilon),
                wqkv_t=cat(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight).t(),
                bqkv=cat(*qb) if all(b is not None for b in qb) else None,
                wo_t=a.o_proj.weight.detach().t(), bo=_detached(a.o_proj.bias),
                wgu_t=cat(mlp.gate_proj.weight, mlp.up_proj.weight).t(),
                bgu=cat(mlp.gate_proj.bias, mlp.up_proj.bias) if mlp.gate_proj.bias is not None else None,
                wd_t=mlp.down_proj.weight.detach().t(), bd=_detached(mlp.down_proj.bias), scaling=a.scaling))
        self.norm, self.norm_eps = lm.norm.weight.detach(), float(lm.norm.variance_epsilon)


def _np(p):
    """numpy view of a float32/float64 CPU parameter (the C++ kernels' argument form), None otherwise."""
    return p.detach().numpy() if p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) else None


def _detached(p):
    return None if p is None else p.detach()


def weights_key(lm) -> tuple:
    return tuple((p._version, p.data_ptr()) for p in lm.parameters())


_FUSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def fused_weights(lm) -> FusedWeights:
    """The language model's fused weights, rebuilt when any of its parameters changed since they were built."""
    key = weights_key(lm)
    fw = _FUSED.get(lm)
    if fw is None or fw.key != key:
        fw = _FUSED[lm] = FusedWeights(lm, key)
    return fw


def release_fused_weights(lm) -> None:
    """Drop the language model's fused weights (the engine does at the end of `generate`: with full fine-tuning
    the next optimizer step invalidates them anyway, and at 7B they are ~8.5 GB the update needs)."""
    _FUSED.pop(lm, None)


def _linear(x, w_t, b):
    return torch.mm(x, w_t) if b is None else torch.addmm(b, x, w_t)


class _CpuStep(types.SimpleNamespace):
    """The buffers of one CPU forward (`PackedForward._layers_cpu`): activations and their numpy views."""


def _linear_into(out, x, w_t, b):
    return torch.mm(x, w_t, out=out) if b is None else torch.addmm(b, x, w_t, out=out)


class PackedForward:
    """`forward(x_LD, pos_3L, slots_L, paged) -> (L, D)` final-norm hidden states of a packed step.

    `fused=True` (the engine's lean step): per decoder layer 10 kernels -- add+RMSNorm, QKV matmul, rotary
    (q and k heads in place), K/V write, attention, o_proj, add+RMSNorm, gate/up matmul, SiLU*mul, down -- with
    each residual add folded into the next norm. `fused=False`: the op-by-op formulation (the baseline of
    bench/bench_engine_step.py and the reference of tests/test_engine_step.py)."""

    def __init__(self, model, *, fused: bool = True):
        from .. import modeling
        reason = supports(model)
        if reason is not None:
            raise ValueError(f"PackedForward: unsupported model ({reason})")
        self.lm = modeling.inner(model).language_model
        cfg = self.lm.config
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rot = self.lm.rotary_emb
        half = self.head_dim // 2
        sec = list(rot.mrope_section)
        if sum(sec) != half:
            raise ValueError(f"PackedForward: mrope_section {sec} must sum to head_dim / 2 = {half}")
        # frequency j reads position row sel[j]: sections of mrope_section cycle through t, h, w
        self.sel = torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(sec)])
        self.scaling = float(rot.attention_scaling)
        self.fused = fused
        self.w = fused_weights(self.lm) if fused else None
        dev = rot.inv_freq.device
        self._sel_dev = self.sel.to(dev)            # moved once, not per step
        self._inv = rot.inv_freq.to(dtype=torch.float32)

    def release(self) -> None:
        """Drop the fused weights (the copy) until the next call."""
        self.w = None
        release_fused_weights(self.lm)

    def rope_half(self, pos_3L: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (L, Dh/2) in `dtype`: the same float32 products as transformers' rotary module."""
        p = pos_3L.t().index_select(1, self._sel_dev).float()     # (L, Dh/2), contiguous
        f = p * self._inv
        cos, sin = f.cos(), f.sin()
        if self.scaling != 1.0:
            cos, sin = cos * self.scaling, sin * self.scaling
        return cos.to(dtype), sin.to(dtype)

    def rope(self, pos_3L: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (L, 1, Dh) in `dtype`, computed in float32 as transformers does."""
        inv = self.lm.rotary_emb.inv_freq.to(device=pos_3L.device, dtype=torch.float32)
        p = pos_3L.index_select(0, self.sel.to(pos_3L.device)).t().float()     # (L, Dh/2)
        f = p * inv
        cos, sin = f.cos(), f.sin()
        if self.scaling != 1.0:
            cos, sin = cos * self.scaling, sin * self.scaling
        cos, sin = torch.cat((cos, cos), -1).to(dtype), torch.cat((sin, sin), -1).to(dtype)
        return cos[:, None], sin[:, None]

    @staticmethod
    def _rotate(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def __call__(self, x_LD: torch.Tensor, pos_3L: torch.Tensor, slots_L: torch.Tensor,
                 paged: attn.PagedBatch) -> torch.Tensor:
        if not self.fused:
            return self._unfused(x_LD, pos_3L, slots_L, paged)
        if self.w is None:   # released after an earlier generate: re-read the model's current weights
            self.w = fused_weights(self.lm)
        cos, sin = self.rope_half(pos_3L, x_LD.dtype)
        x, d = x_LD.clone(), None        # x: the residual stream, updated in place by each add+norm
        if fused.use_cpp(x) and paged.pool.layout == "k_transposed":
            d = self._layers_cpu(x, cos, sin, slots_L, paged)
        else:
            for i in range(len(self.w.layers)):
                d = self._layer(i, x, d, cos, sin, slots_L, paged)
        return fused.add_rms_norm(x, d, self.w.norm, self.w.norm_eps)

    def _layers_cpu(self, x, cos, sin, slots_L, paged):
        """Every layer on the CPU with the C++ kernels: `_layer`'s kernels in the same order on the same values
        (bit-equal to it), with its host overhead cut: the step's activations live in buffers made once per forward
        (the matmuls write into them with out=) and the numpy views the kernels take are made once, not per call
        (measured: ~620 .numpy() and ~110 torch.empty calls per step, ~1 us each, on the 28-layer tiny model)."""
        L, Hq, Hkv, Dh = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        w0 = self.w.layers[0]
        new = lambda n: torch.empty(L, n, dtype=x.dtype)  # noqa: E731
        b = _CpuStep(x=x, h=new(x.shape[1]), ao=new(x.shape[1]), d=new(x.shape[1]), qkv=new(w0["wqkv_t"].shape[1]),
                     gu=new(w0["wgu_t"].shape[1]))
        b.act = new(b.gu.shape[1] // 2)
        for name in ("x", "h", "ao", "d", "qkv", "gu", "act"):
            setattr(b, name + "_np", getattr(b, name).numpy())
        b.rot_np, b.cos_np, b.sin_np = b.qkv_np[:, :(Hq + Hkv) * Dh], cos.numpy(), sin.numpy()
        b.k_np = b.qkv_np[:, Hq * Dh:(Hq + Hkv) * Dh].reshape(L, Hkv, Dh)   # strided rows: views, no copies
        b.v_np = b.qkv_np[:, (Hq + Hkv) * Dh:].reshape(L, Hkv, Dh)
        b.q = b.qkv[:, :Hq * Dh].view(L, Hq, Dh)
        b.o = torch.empty(L, Hq, Dh, dtype=x.dtype)   # attention output, every layer
        b.o_flat, b.q_np, b.o_np = b.o.view(L, Hq * Dh), b.q.numpy(), b.o.numpy()
        # every chunk on the C++ kernel (the default): called directly, with the step's metadata read once
        b.attn_meta = paged.cpp_meta() if len(paged.cpp_chunks) == len(paged.q_lens) else None
        b.slots_np = slots_L.to(torch.int64).contiguous().numpy()
        for i in range(len(self.w.layers)):
            self._layer_cpu(i, b, paged)
        return b.d

    def _layer_cpu(self, i, b, paged):
        """Layer i of `_layers_cpu` (b: its buffers). The kernels are looked up on the module at each call (the op
        counter of the tests wraps them, and this method)."""
        C, w, pool = fused._cpp(), self.w.layers[i], paged.pool
        C.fused_add_rms_norm(b.x_np, b.d_np if i else None, w["ln1_np"], b.h_np, w["eps1"])
        _linear_into(b.qkv, b.h, w["wqkv_t"], w["bqkv"])
        C.fused_rotary(b.rot_np, b.cos_np, b.sin_np, self.head_dim)
        C.paged_kv_write(pool.k_np[i], pool.v_np[i], b.slots_np, b.k_np, b.v_np)
        if b.attn_meta is not None:
            C.paged_attention(b.q_np, pool.k_np[i], pool.v_np[i], b.o_np, *b.attn_meta, w["scaling"])
        else:
            attn.attend(b.q, i, paged, w["scaling"], out=b.o)
        _linear_into(b.ao, b.o_flat, w["wo_t"], w["bo"])
        C.fused_add_rms_norm(b.x_np, b.ao_np, w["ln2_np"], b.h_np, w["eps2"])
        _linear_into(b.gu, b.h, w["wgu_t"], w["bgu"])
        C.fused_silu_mul(b.gu_np, b.act_np)
        _linear_into(b.d, b.act, w["wd_t"], w["bd"])

    def _layer(self, i, x, d, cos, sin, slots_L, paged):
        """Layer i on the residual stream x (updated in place by the pending output `d` of the layer before);
        returns this layer's MLP output, still to be added."""
        w = self.w.layers[i]
        L = x.shape[0]
        Hq, Hkv, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        h = fused.add_rms_norm(x, d, w["ln1"], w["eps1"])
        qkv = _linear(h, w["wqkv_t"], w["bqkv"])                       # (L, (Hq + 2 Hkv) Dh)
        fused.rotary_(qkv[:, :(Hq + Hkv) * Dh], cos, sin, Dh)
        k = qkv[:, Hq * Dh:(Hq + Hkv) * Dh].view(L, Hkv, Dh)     # strided rows: views, no copies
        v = qkv[:, (Hq + Hkv) * Dh:].view(L, Hkv, Dh)
        fused.kv_write(paged.pool, i, slots_L, k, v)
        o = attn.attend(qkv[:, :Hq * Dh].view(L, Hq, Dh), i, paged, w["scaling"])
        h = fused.add_rms_norm(x, _linear(o.view(L, Hq * Dh), w["wo_t"], w["bo"]), w["ln2"], w["eps2"])
        return _linear(fused.silu_mul(_linear(h, w["wgu_t"], w["bgu"])), w["wd_t"], w["bd"])

    def _unfused(self, x_LD, pos_3L, slots_L, paged):
        L = x_LD.shape[0]
        Hq, Hkv, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = self.rope(pos_3L, x_LD.dtype)
        pool = paged.pool
        x = x_LD
        for i, layer in enumerate(self.lm.layers):
            a, mlp = layer.self_attn, layer.mlp
            h = _rms(x, layer.input_layernorm)
            q = F.linear(h, a.q_proj.weight, a.q_proj.bias).view(L, Hq, Dh)
            k = F.linear(h, a.k_proj.weight, a.k_proj.bias).view(L, Hkv, Dh)
            v = F.linear(h, a.v_proj.weight, a.v_proj.bias).view(L, Hkv, Dh)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            pool.write(i, slots_L, k, v)
            o = attn.attend(q, i, paged, a.scaling)
            x = x + F.linear(o.reshape(L, Hq * Dh), a.o_proj.weight, a.o_proj.bias)
            h = _rms(x, layer.post_attention_layernorm)
            g = F.linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias)
            x = x + F.linear(F.silu(g) * F.linear(h, mlp.up_proj.weight, mlp.up_proj.bias),
                             mlp.down_proj.weight, mlp.down_proj.bias)
        return _rms(x, self.lm.norm)
