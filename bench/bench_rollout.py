"""Rollout throughput: RolloutEngine vs the naive Video-CoM loop vs lock-step batching (same run).

Setup (tiny Qwen2.5-VL, CPU): 16 synthesized prompts, G = 8 rollouts each, 5 rounds, 40 new tokens per
round at most, temperature 0.9 / top-k 50. Rounds 1-3 are scripted FIND_SEGMENT / FIND_FRAME /
SPATIAL_ZOOM lines (tests/helpers_rollout.forced_scripts: the random tiny model would not emit actions by
itself; scripted tokens still run through the engine's decode path, one token per step, while the
baselines skip generation for them, which only favours the baselines); rounds 4-5 are sampled.
Media budgets are smaller than the spec's (helpers_rollout.SMALL_MEDIA: 8-frame main video, 4-frame
rewatch, images <= 16*28*28 pixels) so the whole file runs in a few minutes on 2 cores.
The naive loop is measured on 1 prompt x 4 rollouts and lock-step on 2 prompts x 8 (their cost per token
does not fall with more prompts: naive is sequential, lock-step re-prefills everything every round);
throughputs are per second, so the ratios compare rates.

Reported: generated tokens/s, visual tokens/s (visual tokens in the finished sequences per second),
prefill tokens saved by prefix sharing and KV reuse, fraction of wall time outside model forwards.
Run: .venv/bin/pytest bench/bench_rollout.py --benchmark-only -s
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from helpers_rollout import env_factory, forced_scripts, make_data, make_tiny  # noqa: E402

from bench.naive_rollout import lockstep_rollouts, naive_rollout  # noqa: E402
from videocom_fast.models import load  # noqa: E402
from videocom_fast.rollout import RolloutEngine  # noqa: E402

G, ROUNDS, NEW, PROMPTS = 8, 5, 40, 16
_rates: dict[str, dict] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cache = ROOT / ".cache" / "bench_rollout"
    model, proc = load(make_tiny(cache / "tiny"), dtype=torch.float32)
    samples = make_data(cache / "data")[:PROMPTS]
    return model, proc, samples, forced_scripts(samples, proc.tokenizer)


def _record(benchmark, name, gen_tokens, visual, wall, extra=None):
    info = dict(gen_tokens_per_s=gen_tokens / wall, visual_tokens_per_s=visual / wall, **(extra or {}))
    benchmark.extra_info.update(info)
    _rates[name] = info


def test_rollout_engine(benchmark, setup):
    model, proc, samples, forced = setup
    eng = RolloutEngine(model, proc, env_factory=env_factory(), max_rounds=ROUNDS, max_new_tokens=NEW,
                        forced_rounds=forced)
    eng.generate(samples[:2], num_generations=G, seed=99)   # warm-up (allocator, caches of the tokenizer)
    benchmark.pedantic(lambda: eng.generate(samples, num_generations=G, seed=0), rounds=1, iterations=1)
    st = eng.stats
    _record(benchmark, "engine", st["generated_tokens"], st["visual_tokens"], st["wall_s"],
            dict(prefill_tokens=st["prefill_tokens"], prefill_tokens_saved=st["prefill_tokens_saved"],
                 prefix_tokens_shared=st["prefix_tokens_shared"], kv_reuse_tokens=st["kv_reuse_tokens"],
                 outside_model_frac=st["outside_model_frac"], steps=st["steps"],
                 vision_cache_hits=st["vision_cache_hits"], role="candidate"))


def test_rollout_naive_loop(benchmark, setup):
    import time
    model, proc, samples, forced = setup
    make_env = env_factory()
    counts = dict(gen=0, visual=0)

    def run():
        for si in range(1):
            env = make_env(samples[si])
            for ri in range(4):
                r = naive_rollout(model, proc, env.fork(), max_rounds=ROUNDS, max_new_tokens=NEW, greedy=False,
                                  temperature=0.9, forced=lambda k, si=si, ri=ri: forced(si, ri, k))
                counts["gen"] += sum(r.generated_mask)
                counts["visual"] += sum(1 for t in r.token_ids if t in (model.config.image_token_id,
                                                                           model.config.video_token_id))
    t = time.perf_counter()
    benchmark.pedantic(run, rounds=1, iterations=1)
    _record(benchmark, "naive", counts["gen"], counts["visual"], time.perf_counter() - t, dict(role="baseline"))


def test_rollout_lockstep(benchmark, setup):
    import time
    model, proc, samples, forced = setup
    make_env = env_factory()
    counts = dict(gen=0)

    def run():
        res = lockstep_rollouts(model, proc, [make_env(s) for s in samples[:2]], num_generations=G, max_rounds=ROUNDS,
                                max_new_tokens=NEW, temperature=0.9, top_k=50, forced=forced)
        counts["gen"] = sum(sum(r.generated_mask) for g in res for r in g)
    t = time.perf_counter()
    benchmark.pedantic(run, rounds=1, iterations=1)
    _record(benchmark, "lockstep", counts["gen"], 0, time.perf_counter() - t)
    e = _rates.get("engine")
    if e:
        print("\n\nrollout throughput (tiny Qwen2.5-VL, 2-core CPU, G=8, 5 rounds)")
        print(f"{'loop':10} {'gen tok/s':>10} {'x naive':>8} {'x lockstep':>10}")
        for name, r in _rates.items():
            print(f"{name:10} {r['gen_tokens_per_s']:10.1f} "
                  f"{r['gen_tokens_per_s'] / _rates['naive']['gen_tokens_per_s'] if 'naive' in _rates else float('nan'):8.2f} "
                  f"{r['gen_tokens_per_s'] / _rates['lockstep']['gen_tokens_per_s']:10.2f}")
        print(f"engine: visual tok/s {e['visual_tokens_per_s']:.0f}, prefill tokens {e['prefill_tokens']}, saved "
              f"{e['prefill_tokens_saved']} (prefix sharing {e['prefix_tokens_shared']}, KV reuse "
              f"{e['kv_reuse_tokens']}), outside model forwards {100 * e['outside_model_frac']:.1f}%")
