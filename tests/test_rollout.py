"""RolloutEngine against its oracles: the naive re-prefill loop (token ids, greedy float64), the original
M-RoPE rule on the final sequence, and a teacher-forced forward (log-probs, fp32).

Episodes use all three manipulations through forced rounds (helpers_rollout.forced_scripts) on the
tiny random model; the later rounds are the model's own greedy output, so they depend on every KV row,
position and media embedding the observations put in.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers_rollout import env_factory, forced_scripts, rollout_samples, tiny_dir  # noqa: F401
from bench.naive_rollout import lockstep_rollouts, naive_rollout
from videocom_fast import modeling
from videocom_fast.models import load
from videocom_fast.mrope import mm_token_type_ids, sequence_positions
from videocom_fast.rollout import RolloutEngine, Trajectory


@pytest.fixture(scope="module")
def model64(tiny_dir):
    return load(tiny_dir, dtype=torch.float64)


@pytest.fixture(scope="module")
def model32(tiny_dir):
    return load(tiny_dir, dtype=torch.float32)


def _engine(model, proc, samples, **kw):
    forced = kw.pop("forced", True)
    return RolloutEngine(model, proc, env_factory=env_factory(), max_rounds=kw.pop("max_rounds", 5),
                         max_new_tokens=kw.pop("max_new_tokens", 40),
                         forced_rounds=forced_scripts(samples, proc.tokenizer) if forced else None, **kw)


def _check_naive(model, proc, samples, trajs, max_rounds=5, max_new_tokens=40, forced=True):
    fs = forced_scripts(samples, proc.tokenizer) if forced else None
    make_env = env_factory()
    for si, group in enumerate(trajs):
        for tr in group:
            nv = naive_rollout(model, proc, make_env(samples[si]).fork(), max_rounds=max_rounds,
                               max_new_tokens=max_new_tokens, greedy=True,
                               forced=(lambda r, si=si, ri=tr.rollout_index: fs(si, ri, r)) if fs else None)
            where = f"sample {si} rollout {tr.rollout_index}"
            assert tr.token_ids == nv.token_ids, where
            assert tr.generated_mask == nv.generated_mask, where
            assert tr.round_texts == nv.round_texts, where
            assert tr.finish_reason == nv.finish_reason, where


@pytest.mark.parametrize("attention", ["cpp", "sdpa"])
def test_greedy_equals_naive_loop_free_running(model64, rollout_samples, attention):
    """No forcing: the random model's own rounds (garbage text, no actions) for a few samples; both CPU
    attention paths (the C++ paged kernel, the default here, and gather + SDPA)."""
    model, proc = model64
    samples = rollout_samples[:2]
    eng = _engine(model, proc, samples, forced=False, max_rounds=3, attention=attention)
    assert eng.attn_backend == attention
    trajs = eng.generate(samples, num_generations=2, greedy=True)
    _check_naive(model, proc, samples, trajs, max_rounds=3, forced=False)
    # greedy rollouts of one group (forked from one prefill) are identical
    for g in trajs:
        assert g[0].token_ids == g[1].token_ids


def test_lockstep_baseline_generates_the_scripted_rounds(model32, rollout_samples):
    """The lock-step baseline decodes scripted rounds (forced logits) in batches of mixed rows; its rounds
    are the scripts cut by the engine's stopping rule (odd rollouts: the action line ends at its newline)."""
    model, proc = model32
    samples = rollout_samples[:2]
    fs = forced_scripts(samples, proc.tokenizer)
    make_env = env_factory()
    res = lockstep_rollouts(model, proc, [make_env(s) for s in samples], num_generations=3, max_rounds=3,
                            max_new_tokens=40, forced=fs, max_batch=4)
    for si, group in enumerate(res):
        assert len(group) == 3
        for ri, r in enumerate(group):
            want = [proc.tokenizer.decode(fs(si, ri, k)) for k in range(3)]
            want = [w.replace("<|im_end|>", "") if ri % 2 == 0 else w[:w.index("\n") + 1] for w in want]
            assert r.round_texts == want, (si, ri)


def test_chunked_prefill_and_preemption_keep_greedy_tokens(model64, rollout_samples):
    """Observations larger than the step budget (chunked prefill) and a KV pool that forces preemption."""
    model, proc = model64
    samples = rollout_samples[:2]
    ref = _engine(model, proc, samples).generate(samples, num_generations=3, greedy=True)
    eng = _engine(model, proc, samples, max_batch_tokens=40, kv_budget_tokens=16 * 80, block_size=16)
    got = eng.generate(samples, num_generations=3, greedy=True)
    assert eng.stats["preemptions"] > 0
    assert max(len(t.token_ids) for g in ref for t in g) > 40
    for gr, gg in zip(ref, got):
        for a, b in zip(gr, gg):
            if b.finish_reason != "kv_budget":
                assert a.token_ids == b.token_ids and a.generated_mask == b.generated_mask
    assert eng.stats["scheduler"]["num_free_blocks"] == 80


def _check_trajectory(t: Trajectory, proc):
    L = len(t.token_ids)
    assert len(t.generated_mask) == len(t.logprobs) == L and t.position_ids.shape == (3, L)
    assert all(lp == 0.0 for lp, m in zip(t.logprobs, t.generated_mask) if not m)
    assert sum(b - a for a, b in t.rounds) == t.num_generated
    assert len(t.round_texts) == len(t.rounds) == len(t.actions) == len(t.observations)
    for a, b in t.rounds:
        assert all(t.generated_mask[a:b])


def test_positions_equal_original_rule_on_final_sequence(model32, rollout_samples):
    model, proc = model32
    samples = rollout_samples[:3]
    trajs = _engine(model, proc, samples).generate(samples, num_generations=2, seed=3)
    cfg = model.config
    for g in trajs:
        for t in g:
            _check_trajectory(t, proc)
            types = mm_token_type_ids(torch.tensor(t.token_ids), cfg.image_token_id, cfg.video_token_id)
            ref = sequence_positions(types, t.image_grid_thw, t.video_grid_thw, t.second_per_grid_ts)
            assert torch.equal(ref, t.position_ids)


def test_logprobs_equal_teacher_forced_forward(model32, rollout_samples):
    """Sampling mode (temperature 0.9, top-k 50): the engine's log-probs equal a full-sequence forward's."""
    model, proc = model32
    samples = rollout_samples[3:6]
    trajs = _engine(model, proc, samples).generate(samples, num_generations=3, seed=7,
                                                                      temperature=0.9, top_k=50)
    for g in trajs:
        for t in g:
            blocks = t.media_in_order()
            feats = []
            for kind, pv, grid in blocks:
                with torch.no_grad():
                    feats += modeling.vision_embeds(model, pv, grid[None], video=kind == "video")
            ids = torch.tensor(t.token_ids)
            with torch.no_grad():
                x = modeling.embed(model, ids, feats)
                h = modeling.text_forward(model, x[None], t.position_ids[:, None, :])[0]
                gen = torch.tensor(t.generated_mask)
                idx = gen.nonzero().squeeze(-1)
                lp = modeling.chunked_token_logprobs(model, h[idx - 1], ids[idx], temperature=0.9)
            want = torch.tensor([x for x, m in zip(t.logprobs, t.generated_mask) if m])
            torch.testing.assert_close(lp, want, atol=1e-4, rtol=0)


def test_same_seed_same_rollouts_different_seed_differs(model32, rollout_samples):
    model, proc = model32
    samples = rollout_samples[:2]
    eng = _engine(model, proc, samples, forced=False, max_rounds=2, max_new_tokens=8)
    a = eng.generate(samples, num_generations=4, seed=11)
    b = eng.generate(samples, num_generations=4, seed=11)
    c = eng.generate(samples, num_generations=4, seed=12)
    ids = lambda tr: [t.token_ids for g in tr for t in g]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    # rollouts of a group differ from each other (own generators), while sharing the prompt prefill
    assert len({tuple(t.token_ids) for t in a[0]}) > 1
    assert eng.stats["prefix_tokens_shared"] > 0 and eng.stats["scheduler"]["num_forks"] == 2 * 3


def test_vision_cache_shares_identical_requests_within_a_group(model32, rollout_samples, monkeypatch):
    from videocom_fast.rollout import engine as engine_mod
    model, proc = model32
    samples = rollout_samples[:2]
    prepped = []

    def counting(items, *a, **k):
        prepped.extend(item.key for item in items)
        return real(items, *a, **k)
    real = engine_mod.preprocess_items
    monkeypatch.setattr(engine_mod, "preprocess_items", counting)
    eng = _engine(model, proc, samples, max_rounds=4)
    trajs = eng.generate(samples, num_generations=4, greedy=True)
    assert all(o.reason == "ok" for g in trajs for t in g for o in t.observations[:3])
    # 4 rollouts x 3 forced manipulations per group: each distinct request is encoded once per group
    assert eng.stats["vision_cache_misses"] == 2 * 3
    assert eng.stats["vision_cache_hits"] == 2 * 3 * 3
    # ... and preprocessed once per group: 2 main videos + 2 x 3 observations, no key twice
    assert len(prepped) == 2 + 2 * 3 and len(set(prepped)) == len(prepped)


@pytest.mark.parametrize("attention", ["cpp", "sdpa"])
def test_no_backend_reads_a_pool_row_it_never_wrote(model32, rollout_samples, monkeypatch, attention):
    """The C++ kernel's pool is left uninitialized (kv_cache.PagedKVPool `fill`): poisoned with NaN (what
    uninitialized memory may hold), sampled rollouts keep every token and log-prob of a zero-filled run, so
    no row past a context is ever read. SDPA reads whole blocks under a mask: the same poison changes its
    rollouts (the check can fail), and so its pool comes zero-filled."""
    from videocom_fast.rollout import engine as engine_mod
    model, proc = model32
    samples = rollout_samples[:2]
    fills, poison = [], [False]

    class Pool(engine_mod.PagedKVPool):
        def __init__(self, *a, **k):
            fills.append(k.get("fill"))
            super().__init__(*a, **k)
            if poison[0]:
                self._k.fill_(float("nan"))
                self._v.fill_(float("nan"))
    monkeypatch.setattr(engine_mod, "PagedKVPool", Pool)
    eng = _engine(model, proc, samples, attention=attention, max_rounds=4)
    runs = []
    for poison[0] in (False, True):
        trajs = eng.generate(samples, num_generations=3, seed=5)
        runs.append([(t.token_ids, t.logprobs) for g in trajs for t in g])
    # NOTE: not bit-equal: which sequences share a step depends on when the worker's observations arrive, and
    # a row's matmul rounding on the batch it is in (log-probs were seen to move by 5e-7)
    def same(a, b):
        return all(ta == tb and np.allclose(la, lb, rtol=0, atol=1e-5) for (ta, la), (tb, lb) in zip(a, b))
    if attention == "cpp":
        assert fills == [None, None]
        assert same(runs[0], runs[1])
    else:
        assert fills == [0.0, 0.0]
        assert not same(runs[0], runs[1])


def test_bad_arguments(model32):
    model, proc = model32
    with pytest.raises(ValueError, match="max_rounds"):
        RolloutEngine(model, proc, max_rounds=0)
    with pytest.raises(ValueError, match="kv_budget_tokens"):
        RolloutEngine(model, proc, kv_budget_tokens=3)
    with pytest.raises(ValueError, match="attention must be"):
        RolloutEngine(model, proc, attention="paged")
    with pytest.raises(ValueError, match="num_workers must be an int >= 0"):
        RolloutEngine(model, proc, num_workers=-1)
    with pytest.raises(ValueError, match="attention='cpp' needs"):
        RolloutEngine(model, proc, attention="cpp", dtype=torch.bfloat16)
    eng = RolloutEngine(model, proc)
    with pytest.raises(ValueError, match="num_generations"):
        eng.generate([], num_generations=0)
    with pytest.raises(ValueError, match="temperature"):
        eng.generate([], temperature=0.0)
    assert eng.generate([], num_generations=2) == []


def test_per_sequence_arrays_grow_and_reuse_slots(model32, rollout_samples, monkeypatch):
    """The step's per-sequence arrays (engine._SeqState) start at one slot here, so they grow while sequences
    hold pending round tokens, and groups admitted after others finished reuse freed slots: the sampled
    episodes are the same as with the default capacity (tokens, positions; log-probs to fp32 rounding)."""
    from videocom_fast.rollout import engine as engine_mod
    model, proc = model32
    samples = rollout_samples[:3]
    kw = dict(max_num_seqs=4, max_rounds=4)   # 2 groups of 3 at a time: the third reuses slots
    ref = _engine(model, proc, samples, **kw).generate(samples, num_generations=3, seed=3)
    caps, reused, released = [], [], set()

    class Tiny(engine_mod._SeqState):
        def __init__(self, width):
            super().__init__(width, cap=1)

        def _grow(self, cap):
            caps.append(cap)
            super()._grow(cap)

        def release(self, r):
            released.add(r)
            super().release(r)

        def alloc(self):
            r = super().alloc()
            reused.append(r in released)
            return r
    monkeypatch.setattr(engine_mod, "_SeqState", Tiny)
    eng = _engine(model, proc, samples, **kw)
    got = eng.generate(samples, num_generations=3, seed=3)
    assert caps[:3] == [1, 2, 4] and any(reused), (caps, reused)
    for gr, gg in zip(ref, got):
        for a, b in zip(gr, gg):
            assert a.token_ids == b.token_ids and a.generated_mask == b.generated_mask
            assert a.finish_reason == b.finish_reason and torch.equal(a.position_ids, b.position_ids)
            # which sequences share a step follows the workers' timing: fp32 rows differ in the last bits
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_inline_env_work_gives_the_same_rollouts(model32, rollout_samples):
    """num_workers=0 runs the env, preprocessing and observation tokens on the calling thread when a round
    ends: the same sampled episodes as with a worker (tokens, positions, finish reasons; log-probs to fp32
    rounding, since which sequences share a step differs), and no env is built on another thread."""
    import threading
    model, proc = model32
    samples = rollout_samples[:3]
    make_env, threads = env_factory(), set()

    def env_here(sample):
        threads.add(threading.current_thread() is threading.main_thread())
        return make_env(sample)
    ref = _engine(model, proc, samples).generate(samples, num_generations=3, seed=5)
    eng = _engine(model, proc, samples, num_workers=0)
    eng.env_factory = env_here
    got = eng.generate(samples, num_generations=3, seed=5)
    assert threads == {True}
    assert eng.stats["rounds"] > 2 * len(samples) * 3   # observations came back and later rounds ran
    for gr, gg in zip(ref, got):
        for a, b in zip(gr, gg):
            assert a.token_ids == b.token_ids and a.generated_mask == b.generated_mask
            assert a.finish_reason == b.finish_reason and torch.equal(a.position_ids, b.position_ids)
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
