"""The engine's packed text forward (videocom_fast/rollout/packed_forward.py) against transformers' own.

Oracle: the model's `language_model(...)` on each WHOLE sequence with explicit 3-D positions and its stock
attention (no paged anything). The packed path runs the same sequences cut into random chunks, several
sequences per step, decodes mixed with prefill chunks, K/V through the paged pool: every row's hidden state
must match. Plus: which models it refuses (and that the engine then falls back), and greedy rollouts equal
to the transformers path.
"""
from __future__ import annotations

import random

import pytest
import torch

from helpers_rollout import env_factory, forced_scripts, rollout_samples, tiny_dir  # noqa: F401
from videocom_fast import modeling
from videocom_fast.models import load
from videocom_fast.rollout import RolloutEngine, attention as attn, packed_forward
from videocom_fast.rollout.kv_cache import PagedKVPool

BS = 16


def _positions(n: int, rng: random.Random) -> torch.Tensor:
    """(3, n) M-RoPE-like positions: text runs (t = h = w, increasing) and vision-like runs (rows differ)."""
    out, p = [], rng.randrange(0, 50)
    while sum(x.shape[1] for x in out) < n:
        k = rng.randrange(1, 12)
        if rng.random() < 0.5:
            out.append(torch.arange(p, p + k).expand(3, k))
            p += k
        else:
            t = torch.full((k,), p)
            h = p + torch.randint(0, 4, (k,))
            w = p + torch.randint(0, 6, (k,))
            out.append(torch.stack([t, h, w]))
            p += 6
    return torch.cat(out, 1)[:, :n].contiguous()


def _run_packed(model, xs, poss, rng, backend):
    """Feed sequences through PackedForward in random chunks (several sequences per step); hidden rows out."""
    tc = modeling.inner(model).language_model.config
    dtype = xs[0].dtype
    pool = PagedKVPool(tc.num_hidden_layers, 256, BS, tc.num_key_value_heads,
                       tc.hidden_size // tc.num_attention_heads, dtype=dtype)
    fwd = packed_forward.PackedForward(model)
    tables, nxt = [], 0
    for x in xs:
        nb = -(-x.shape[0] // BS)
        tables.append(list(range(nxt, nxt + nb))[::-1])   # blocks out of order: tables must be honoured
        nxt += nb
    done = [0] * len(xs)
    outs = [torch.full_like(x, float("nan")) for x in xs]
    while any(d < x.shape[0] for d, x in zip(done, xs)):
        q_starts, q_lens, ctx, tabs, rows, slots, pos, who = [], [], [], [], [], [], [], []
        for s, x in enumerate(xs):
            left = x.shape[0] - done[s]
            if left == 0 or rng.random() < 0.2:
                continue
            n = 1 if done[s] and rng.random() < 0.5 else rng.randint(1, left)   # decode-like or a chunk
            n = min(n, left)
            a, b = done[s], done[s] + n
            q_starts.append(len(slots))
            q_lens.append(n)
            ctx.append(b)
            tabs.append(tables[s])
            slots += [tables[s][p // BS] * BS + p % BS for p in range(a, b)]
            rows.append(x[a:b])
            pos.append(poss[s][:, a:b])
            who.append((s, a, b))
        if not who:
            continue
        meta = attn.PagedBatch(pool, q_starts, q_lens, ctx, tabs, backend=backend)
        h = fwd(torch.cat(rows), torch.cat(pos, 1), torch.tensor(slots), meta)
        for (s, a, b), q0 in zip(who, q_starts):
            outs[s][a:b] = h[q0:q0 + b - a]
            done[s] = b
    return outs


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("backend", ["cpp", "sdpa"])
def test_packed_forward_equals_transformers_forward(tiny_dir, dtype, tol, backend):
    if backend == "cpp" and not attn.cpp_available("cpu", dtype):
        pytest.skip("C++ extension not built")
    model, _ = load(tiny_dir, dtype=dtype)
    lm = modeling.inner(model).language_model
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    lens = [rng.randint(1, 90) for _ in range(6)] + [BS, BS + 1, 97]
    xs = [torch.randn(n, lm.config.hidden_size, dtype=dtype) for n in lens]
    poss = [_positions(n, rng) for n in lens]
    with torch.no_grad():
        got = _run_packed(model, xs, poss, rng, backend)
        for x, p, g, n in zip(xs, poss, got, lens):
            want = lm(inputs_embeds=x[None], position_ids=p[:, None, :], use_cache=False).last_hidden_state[0]
            err = (g - want).abs().max().item()
            assert err <= tol * max(1.0, want.abs().max().item()), f"seed {seed}, length {n}: max error {err}"


def test_supports_names_what_it_cannot_run(tiny_dir):
    model, _ = load(tiny_dir, dtype=torch.float32)
    assert packed_forward.supports(model) is None
    lm = modeling.inner(model).language_model
    h = lm.layers[1].mlp.register_forward_pre_hook(lambda *a: None)
    assert "hooks" in packed_forward.supports(model)
    h.remove()
    from peft import LoraConfig, get_peft_model
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    reason = packed_forward.supports(lora)
    assert reason is not None and "nn.Linear" in reason
    with pytest.raises(ValueError, match="unsupported model"):
        packed_forward.PackedForward(lora)


def test_engine_falls_back_and_both_forwards_give_the_same_greedy_rollouts(tiny_dir, rollout_samples):
    model, proc = load(tiny_dir, dtype=torch.float64)
    samples = rollout_samples[:2]
    forced = forced_scripts(samples, proc.tokenizer)

    def run(text_forward, m=model):
        eng = RolloutEngine(m, proc, env_factory=env_factory(), max_rounds=4, max_new_tokens=24,
                            forced_rounds=forced, text_forward=text_forward)
        out = eng.generate(samples, num_generations=3, greedy=True)
        return eng, [(t.token_ids, t.finish_reason) for g in out for t in g]

    eng_p, packed = run("packed")
    eng_t, plain = run("transformers")
    assert eng_p.packed is not None and eng_t.packed is None
    inner = modeling.inner(model)   # the engine's attention implementations are undone after generate()
    assert inner.visual.config._attn_implementation == "sdpa"
    assert inner.language_model.config._attn_implementation == "sdpa"
    assert packed == plain
    assert sum(len(t[0]) for t in packed) > 6 * 300   # real episodes (media observations), not empty ones
    with pytest.raises(ValueError, match="text_forward"):
        RolloutEngine(model, proc, text_forward="fast")
    h = modeling.inner(model).language_model.norm.register_forward_hook(lambda *a: None)
    try:
        eng_auto, hooked = run("auto")   # a hooked model takes the transformers path, same tokens
        assert eng_auto.packed is None and hooked == plain
        with pytest.raises(ValueError, match="cannot run this model"):
            run("packed")
    finally:
        h.remove()
