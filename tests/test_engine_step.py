"""The engine's lean step (issue 16): kernels per decoder layer on the real step, fused weights re-read after a
weight update, and the lean step's rollouts equal to the unfused step's.

Op counts come from tests/helpers_op_count.py (a TorchDispatchMode plus counting wrappers on the C++ kernels):
every kernel a decoder layer issues inside `PackedForward._layer` during a real `generate`, views excluded.
"""
from __future__ import annotations

import pytest
import torch

from helpers_op_count import KernelOpCounter
from helpers_rollout import env_factory, forced_scripts, rollout_samples, tiny_dir  # noqa: F401
from videocom_fast import modeling
from videocom_fast.models import load
from videocom_fast.rollout import RolloutEngine, engine_step, packed_forward

MAX_OPS_PER_LAYER = 12


def _engine(model, proc, samples, **kw):
    return RolloutEngine(model, proc, env_factory=env_factory(), max_rounds=2, max_new_tokens=8,
                         forced_rounds=forced_scripts(samples, proc.tokenizer), **kw)


@pytest.fixture(scope="module")
def model32(tiny_dir):
    return load(tiny_dir, dtype=torch.float32)


def test_cpu_step_issues_at_most_12_kernels_per_layer(model32, rollout_samples):
    model, proc = model32
    samples = rollout_samples[:2]
    eng = _engine(model, proc, samples)
    with KernelOpCounter() as c:
        eng.generate(samples, num_generations=4, seed=3)
    layers = modeling.inner(model).language_model.config.num_hidden_layers
    assert c.layer_calls == layers * eng.stats["steps"] > 0
    # exactly: add+norm, qkv, rotary, kv write, attention, o_proj, add+norm, gate/up, silu*mul, down
    assert c.per_layer <= MAX_OPS_PER_LAYER, dict(c.layer_by_op)
    assert c.per_layer == 10, dict(c.layer_by_op)
    assert c.layer_by_op["_C.paged_attention"] == c.layer_calls
    assert c.layer_by_op["_C.fused_add_rms_norm"] == 2 * c.layer_calls


def test_unfused_step_counts_more_kernels(model32, rollout_samples):
    """The counter can fail: the previous step's layers issue far more than 12 kernels each."""
    model, proc = model32
    samples = rollout_samples[:1]
    eng = _engine(model, proc, samples)
    eng.step_impl = "unfused"
    ops = {}
    for impl in ("unfused", "lean"):
        eng.step_impl = impl
        with KernelOpCounter() as c:
            eng.generate(samples, num_generations=2, seed=1)
        ops[impl] = c.total / eng.stats["steps"]
    assert ops["unfused"] > 2 * ops["lean"], ops


def test_lean_and_unfused_steps_give_the_same_rollouts(tiny_dir, rollout_samples, monkeypatch):
    """Greedy float64 token ids equal; sampled float32 log-probs within rounding (same uniforms, same draws).
    The lean step hands its tokens over in C++ (`_C.hand_off`) and, as without the extension, with numpy; the
    unfused step one token at a time through `_on_token`."""
    samples = rollout_samples[:2]
    c_hand_off = engine_step._hand_off
    assert c_hand_off is not None, "videocom_fast._C is built for the tests"
    for dtype, greedy in ((torch.float64, True), (torch.float32, False)):
        model, proc = load(tiny_dir, dtype=dtype)
        eng = _engine(model, proc, samples, max_batch_tokens=96)   # chunked prefills too
        out = {}
        for impl, hand_off in (("unfused", None), ("lean", c_hand_off), ("lean", None)):
            monkeypatch.setattr(engine_step, "_hand_off", hand_off)
            eng.step_impl = impl
            trajs = eng.generate(samples, num_generations=3, greedy=greedy, seed=5)
            out[impl, hand_off is None] = [t for g in trajs for t in g]
        for key in (("lean", False), ("lean", True)):
            for a, b in zip(out[key], out["unfused", True], strict=True):
                assert a.token_ids == b.token_ids, key
                assert a.generated_mask == b.generated_mask
                torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5,
                                           rtol=0)


def test_cpp_hand_off_appends_plain_tokens_and_returns_the_others():
    """`_C.hand_off` on a hand-made state: a plain token is appended (round arrays, counters, scheduler id), a
    token that may end its round, one not classified yet and one at the round's last allowed place are
    returned; bad buffers are refused by name."""
    import numpy as np

    from videocom_fast import _C
    S, width = 4, 6
    cols = {f: np.zeros(S, np.int64) for f in ("pend", "rl", "npos", "ntok", "known", "last")}
    sid = np.array([10, 11, 12, 13])
    cols["rl"][3] = 4      # slot 3: its next token is the round's last allowed (max_new 5)
    rt_tok, rt_lp, rt_gen = np.zeros((S, width), np.int64), np.zeros((S, width)), np.zeros((S, width), bool)
    may_end = np.array([0, 1, -1, 0], np.int8)   # id 1 may end a round, id 2 not classified, ids >= 4 unknown
    who, toks, lps = np.array([0, 1, 2, 3, 0 + 1]), np.array([3, 1, 2, 0, 7]), np.array([-.5, -1, -2, -3, -4])
    state = (sid, *cols.values(), rt_tok, rt_lp, rt_gen)
    end, sids = _C.hand_off(who[:4], toks[:4], lps[:4], may_end, 5, *state)
    assert end.tolist() == [1, 2, 3] and sids.tolist() == [10]
    assert rt_tok[0, 0] == 3 and rt_lp[0, 0] == -0.5 and rt_gen[0, 0] and not rt_gen[1:].any()
    assert [int(cols[f][0]) for f in ("pend", "rl", "npos", "ntok", "known", "last")] == [1, 1, 1, 1, 1, 3]
    assert all(int(cols[f][1:].sum()) == 4 * (f == "rl") for f in cols)
    end, _ = _C.hand_off(who[4:], toks[4:], lps[4:], may_end, 5, *state)
    assert end.tolist() == [0]                        # id 7: past the table
    args = [who[:1], toks[:1], lps[:1], may_end, 5, *state]
    for i, bad, match in [(-1, rt_gen.astype(np.int32), "rt_gen"), (0, np.array([4]), "who: slot 4"),
                          (6, sid[:2], "pend"), (-3, rt_tok[:, :2], "rt_tok"),
                          (-2, np.zeros((S, 2)), "rt_lp"), (7, np.zeros(S), "rl")]:
        with pytest.raises(ValueError, match=match):
            _C.hand_off(*[bad if k == (i % len(args)) else a for k, a in enumerate(args)])


def test_fused_weights_are_rebuilt_after_a_weight_update(model32):
    model, _ = model32
    model = type(model)(model.config)   # a private copy: this test changes weights
    model.load_state_dict(model32[0].state_dict())
    model.eval()
    lm = modeling.inner(model).language_model
    fw = packed_forward.fused_weights(lm)
    assert packed_forward.fused_weights(lm) is fw            # unchanged weights: the same cache
    q = lm.layers[0].self_attn.q_proj
    opt = torch.optim.SGD(lm.parameters(), lr=0.1)
    lm.norm.weight.sum().backward()                          # a gradient on one parameter only
    q.weight.grad = torch.randn_like(q.weight)
    opt.step()                                               # in place: the parameters' versions move
    fw2 = packed_forward.fused_weights(lm)
    assert fw2 is not fw
    Hq = q.weight.shape[0]
    assert torch.equal(fw2.layers[0]["wqkv_t"].t()[:Hq], q.weight.detach())
    assert not torch.equal(fw.layers[0]["wqkv_t"].t()[:Hq], q.weight.detach())
    up = lm.layers[1].mlp.up_proj
    up.weight.data = up.weight.data * 2                      # a swapped tensor: the pointer moves
    fw3 = packed_forward.fused_weights(lm)
    assert fw3 is not fw2
    F = up.weight.shape[0]
    assert torch.equal(fw3.layers[1]["wgu_t"].t()[F:], up.weight.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_layers_equal_the_generic_layer_loop_bit_for_bit(tiny_dir, dtype):
    """PackedForward's CPU path (`_layers_cpu`: buffers and numpy views made once per forward) runs `_layer`'s
    kernels on the same values: its output must be bit-equal to the generic per-layer loop."""
    from videocom_fast.rollout import attention as attn, fused_step, packed_forward
    from videocom_fast.rollout.kv_cache import PagedKVPool
    if not attn.cpp_available("cpu", dtype):
        pytest.skip("C++ extension not built")
    model, _ = load(tiny_dir, dtype=dtype)
    tc = modeling.inner(model).language_model.config
    bs, lens = 16, [23, 1, 40]
    pool = PagedKVPool(tc.num_hidden_layers, 16, bs, tc.num_key_value_heads, tc.hidden_size // tc.num_attention_heads,
                       dtype=dtype, layout="k_transposed")
    tables = [[0, 1], [2], [5, 3, 4]]
    slots = torch.tensor([t[p // bs] * bs + p % bs for t, n in zip(tables, lens) for p in range(n)])
    starts = [0, lens[0], lens[0] + lens[1]]
    meta = attn.PagedBatch(pool, starts, lens, lens, tables, backend="cpp")
    x = torch.randn(sum(lens), tc.hidden_size, dtype=dtype)
    pos = torch.arange(sum(lens)).expand(3, -1).contiguous()
    fwd = packed_forward.PackedForward(model)
    with torch.no_grad():
        got = fwd(x, pos, slots, meta)
        cos, sin = fwd.rope_half(pos, dtype)
        r, d = x.clone(), None
        for i in range(tc.num_hidden_layers):
            d = fwd._layer(i, r, d, cos, sin, slots, meta)
        want = fused_step.add_rms_norm(r, d, fwd.w.norm, fwd.w.norm_eps)
    assert fused_step.use_cpp(x) and torch.equal(got, want)


def test_fused_weights_are_released_when_generate_returns(model32, rollout_samples):
    """The concatenated QKV / gate-up copy (8.5 GB at 7B, docs/memory_7b.md) exists only while generate runs."""
    model, proc = model32
    lm = modeling.inner(model).language_model
    samples = rollout_samples[:1]
    eng = _engine(model, proc, samples)
    seen = []
    step = eng._step

    def spy(out):
        seen.append(lm in packed_forward._FUSED)
        return step(out)
    eng._step = spy
    eng.generate(samples, num_generations=2, seed=0)
    assert seen and all(seen)                    # the lean step ran on the fused weights
    assert lm not in packed_forward._FUSED       # and they were dropped when generate returned
