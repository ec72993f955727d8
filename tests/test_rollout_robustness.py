"""Garbage, endless and action-spamming output, observations larger than the step budget, KV budgets
smaller than one group: every episode ends with a defined finish reason, never a hang or crash; memory
stays bounded over 1,000 rollouts."""
from __future__ import annotations

import gc
import resource

import pytest
import torch

from helpers_rollout import env_factory, rollout_samples, tiny_dir  # noqa: F401
from videocom_fast.models import load
from videocom_fast.rollout import RolloutEngine

REASONS = {"answer", "max_rounds", "max_new_tokens", "kv_budget"}


@pytest.fixture(scope="module")
def model32(tiny_dir):
    return load(tiny_dir, dtype=torch.float32)


def _script(proc, text):
    return proc.tokenizer(text, add_special_tokens=False)["input_ids"]


def _all_done(trajs, G):
    assert all(len(g) == G and all(t is not None and t.finish_reason in REASONS for t in g) for g in trajs)


def test_garbage_and_endless_output_end_by_limits(model32, rollout_samples):
    model, proc = model32
    eng = RolloutEngine(model, proc, env_factory=env_factory(), max_rounds=3, max_new_tokens=7)
    trajs = eng.generate(rollout_samples[:3], num_generations=4, temperature=1.5, top_k=0, seed=1)
    _all_done(trajs, 4)
    for g in trajs:
        for t in g:
            assert t.num_rounds <= 3 and all(b - a <= 7 for a, b in t.rounds)
            if t.finish_reason == "max_new_tokens":
                assert t.rounds[-1][1] - t.rounds[-1][0] == 7 and not t.generated_mask[-1]   # injected <|im_end|>


def test_action_spamming_runs_one_action_per_round(model32, rollout_samples):
    model, proc = model32
    spam = _script(proc, "FIND_FRAME(a) = 3\nFIND_SEGMENT(b) = [1]\nSPATIAL_ZOOM(c) = [0, 0, 9, 9]\n" * 20)
    eng = RolloutEngine(model, proc, env_factory=env_factory(), max_rounds=4, max_new_tokens=300,
                        forced_rounds=lambda si, ri, r: spam)
    trajs = eng.generate(rollout_samples[:2], num_generations=2, greedy=True)
    _all_done(trajs, 2)
    for g in trajs:
        for t in g:
            assert t.finish_reason == "max_rounds" and t.num_rounds == 4
            assert all(txt == "FIND_FRAME(a) = 3\n" for txt in t.round_texts)
            assert [o.action.kind for o in t.observations[:3]] == ["frame"] * 3


def test_final_answer_ends_the_episode_without_dummy_rounds(model32, rollout_samples):
    model, proc = model32
    ans = _script(proc, "It is red. FINAL_ANSWER: B. red\nthen more text")
    eng = RolloutEngine(model, proc, env_factory=env_factory(), max_rounds=5, max_new_tokens=64,
                        forced_rounds=lambda si, ri, r: ans)
    trajs = eng.generate(rollout_samples[:2], num_generations=3, greedy=True)
    for g in trajs:
        for t in g:
            assert t.finish_reason == "answer" and t.num_rounds == 1
            assert t.round_texts == ["It is red. FINAL_ANSWER: B. red\n"]
            assert t.token_ids[-1] == proc.tokenizer.convert_tokens_to_ids("<|im_end|>") and not t.generated_mask[-1]


def test_tiny_step_budget_chunks_every_prefill(model32, rollout_samples):
    model, proc = model32
    kw = dict(env_factory=env_factory(), max_rounds=3, max_new_tokens=6)
    ref = RolloutEngine(model, proc, **kw).generate(rollout_samples[:2], num_generations=2, greedy=True)
    eng = RolloutEngine(model, proc, max_batch_tokens=5, **kw)
    got = eng.generate(rollout_samples[:2], num_generations=2, greedy=True)
    assert [t.token_ids for g in got for t in g] == [t.token_ids for g in ref for t in g]
    assert eng.stats["steps"] > sum(len(t.token_ids) for g in got for t in g) // (5 * 4)


@pytest.mark.parametrize("budget_blocks", [3, 30])
def test_kv_budget_smaller_than_a_group_or_a_prompt(model32, rollout_samples, budget_blocks):
    """3 blocks hold no prompt at all ("kv_budget" for everyone); 30 hold a prompt but not the group's
    growing sequences (forks fall back, preemption), and everything still finishes."""
    model, proc = model32
    eng = RolloutEngine(model, proc, env_factory=env_factory(), max_rounds=3, max_new_tokens=12,
                        kv_budget_tokens=16 * budget_blocks, block_size=16)
    trajs = eng.generate(rollout_samples[:2], num_generations=4, seed=2)
    _all_done(trajs, 4)
    reasons = {t.finish_reason for g in trajs for t in g}
    if budget_blocks == 3:
        assert reasons == {"kv_budget"}
    else:
        assert reasons - {"kv_budget"} and eng.stats["preemptions"] > 0
    assert eng.stats["scheduler"]["num_free_blocks"] == budget_blocks == eng.stats["kv_pool_blocks"]


@pytest.mark.slow
def test_memory_bounded_over_1000_rollouts(model32, rollout_samples):
    model, proc = model32
    eng = RolloutEngine(model, proc, env_factory=env_factory(), max_rounds=2, max_new_tokens=3)
    samples = rollout_samples[:16]

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    done, rss = 0, []
    for it in range(8):                                   # 8 x 16 x 8 = 1,024 rollouts
        trajs = eng.generate(samples, num_generations=8, seed=it)
        done += sum(len(g) for g in trajs)
        del trajs
        gc.collect()
        rss.append(rss_mb())
        assert eng.stats["scheduler"]["num_free_blocks"] == eng.stats["kv_pool_blocks"]
    assert done >= 1000
    # after warm-up (first 2 calls) resident memory stays flat: allow 40 MB of allocator noise
    assert max(rss[2:]) - rss[2] < 40, rss



# --- one sample's bad media fails only its own episodes ------------------------------------------------

@pytest.mark.parametrize("num_workers", [1, 0])
def test_one_unreadable_video_fails_only_its_own_episodes(model32, rollout_samples, tmp_path, num_workers):
    """A truncated and a missing video in the batch: their G episodes end with "error: ..." naming the file,
    and every other sample's episodes are exactly those of a batch without the bad videos (env work on a
    worker, or inline)."""
    from videocom_fast.rollout.engine import failed

    model, proc = model32
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(open(rollout_samples[1]["video"], "rb").read()[:3000])
    good = rollout_samples[:4]
    bad = [good[0], dict(good[1], video=str(cut)), good[2], dict(good[3], video=str(tmp_path / "missing.mp4"))]
    kw = dict(env_factory=env_factory(), max_rounds=2, max_new_tokens=6)
    ref = RolloutEngine(model, proc, **kw).generate(good, num_generations=2, greedy=True)
    eng = RolloutEngine(model, proc, num_workers=num_workers, **kw)
    got = eng.generate(bad, num_generations=2, greedy=True)
    for i, name in ((1, "cut.mp4"), (3, "missing.mp4")):
        assert all(failed(t) and name in t.finish_reason and t.token_ids == [] for t in got[i]), \
            [t.finish_reason for t in got[i]]
    for i in (0, 2):
        assert all(t.finish_reason in REASONS for t in got[i])
        assert [t.token_ids for t in got[i]] == [t.token_ids for t in ref[i]]
    assert eng.stats["failed_episodes"] == 4
    assert eng.stats["scheduler"]["num_free_blocks"] == eng.stats["kv_pool_blocks"]


@pytest.mark.parametrize("num_workers", [1, 0])
def test_failed_observation_ends_only_that_episode(model32, rollout_samples, monkeypatch, num_workers):
    """Preprocessing of one sample's FIND_FRAME image raises (on the worker, or inline): that sample's
    episodes end after the round that asked for it (reason names the error), the others go on to later
    rounds."""
    from helpers_rollout import forced_scripts
    from videocom_fast.rollout import engine as engine_mod

    model, proc = model32
    samples = rollout_samples[:3]
    real = engine_mod.preprocess_items

    def flaky(items, *a, **k):
        if any(it.kind == "image" and samples[1]["video"] in str(it.key) for it in items):
            raise RuntimeError("injected preprocessing failure")
        return real(items, *a, **k)

    monkeypatch.setattr(engine_mod, "preprocess_items", flaky)
    eng = RolloutEngine(model, proc, env_factory=env_factory(), max_rounds=4, max_new_tokens=40,
                        forced_rounds=forced_scripts(samples, proc.tokenizer), num_workers=num_workers)
    got = eng.generate(samples, num_generations=2, greedy=True)
    for t in got[1]:
        assert t.finish_reason == "error: RuntimeError: injected preprocessing failure"
        assert t.num_rounds == 2 and len(t.actions) == len(t.observations) == 2 and t.actions[1] is None
        assert len(t.token_ids) == len(t.generated_mask) == t.position_ids.shape[1]
    for i in (0, 2):
        assert all(t.finish_reason in REASONS and t.num_rounds >= 3 for t in got[i])
    assert eng.stats["failed_episodes"] == 2
    assert eng.stats["scheduler"]["num_free_blocks"] == eng.stats["kv_pool_blocks"]


def _episodes(reasons_per_group, text="FIND_SEGMENT(x) = [1]\nFINAL_ANSWER: A. x"):
    from videocom_fast.rollout import Trajectory
    out = []
    for i, reasons in enumerate(reasons_per_group):
        for r, reason in enumerate(reasons):
            t = Trajectory(sample_index=i, rollout_index=r, finish_reason=reason)
            if not reason.startswith("error"):
                t.round_texts, t.generated_mask = [text], [True] * 5
            out.append(t)
    return out


def test_grpo_skips_groups_with_failed_episodes_and_says_so(capsys):
    from types import SimpleNamespace

    from videocom_fast.training.grpo import drop_failed_groups

    one = SimpleNamespace(world_size=1)
    trajs = _episodes([["answer", "answer"], ["error: VideoError: b.mp4: truncated"] * 2,
                       ["answer", "error: RuntimeError: x"]])
    keep, skipped = drop_failed_groups(trajs, 2, 4, one)
    assert keep == trajs[:2] and skipped == 4
    err = capsys.readouterr().err
    assert "grpo step 5: 3 episode(s) failed" in err and "b.mp4" in err and "2 prompt group(s)" in err
    assert drop_failed_groups(trajs[:2], 2, 0, one) == (trajs[:2], 0) and capsys.readouterr().err == ""
    with pytest.raises(RuntimeError, match="nothing left to train on"):
        drop_failed_groups(trajs[2:4], 2, 0, one)
    with pytest.raises(RuntimeError, match="data parallelism"):
        drop_failed_groups(trajs, 2, 0, SimpleNamespace(world_size=2))


def test_eval_leaves_failed_episodes_out_of_the_means_and_counts_them(capsys):
    from videocom_fast.evaluate import score_episodes

    s = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "A. x"}],
         "valid_segments": [1]}
    trajs = _episodes([["answer", "answer"], ["error: VideoError: b.mp4: truncated"] * 2])
    per, summary = score_episodes([trajs[:2], trajs[2:]], [s, s])
    assert summary["episodes"] == 2 and summary["reward_mean"] == 2.0 and summary["accuracy_mean"] == 1.0
    assert summary["failed_episodes"] == 2
    assert summary["failed_reasons"] == {"error: VideoError: b.mp4: truncated": 2}
    assert per[2:] == [None, None] and per[0]["total"] == 2.0
    assert "evaluate: 2 of 4 episodes failed and are left out" in capsys.readouterr().err
