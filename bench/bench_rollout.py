"""Rollout throughput: RolloutEngine vs the naive Video-CoM loop vs lock-step batching (same run, same workload).

Setup (tiny Qwen2.5-VL, fp32, CPU): 16 prompts x G = 8 rollouts, 5 rounds, 40 new tokens per round at
most, temperature 0.9 / top-k 50. Rounds 1-3 are scripted FIND_SEGMENT / FIND_FRAME / SPATIAL_ZOOM lines
(tests/helpers_rollout.forced_scripts: the random tiny model would not emit actions by itself; scripted
tokens still run through the engine's decode path, one token per step, while the baselines skip
generation for them, which only favours the baselines); rounds 4-5 are sampled.
Two media budgets, each its own pair of groups:
- "small" (helpers_rollout.SMALL_MEDIA: 8-frame main video, 4-frame rewatch, images <= 16*28*28 pixels):
  ~200-token prompts, so forwards are cheap and per-token overheads dominate;
- "spec" (env.MediaConfig defaults = the method's budgets, spec section 3: 32-frame main video and 16-frame
  rewatch at up to 360*420 pixels per frame, images up to 128*28*28): ~2,300-token prompts, what a
  Video-CoM rollout really carries. The naive loop then takes ~5 minutes; the whole file ~8 minutes.

Groups (benchtable compares the benchmarks of one group; each group runs ONE workload, the issue's scale;
the spec-budget groups are named rollout_spec_vs_*):
- rollout_vs_naive: the engine vs the naive loop (per sample, per round: rebuild the conversation, run the
  processor, `generate` with fresh prefill; role "baseline");
- rollout_vs_lockstep: the engine vs lock-step `generate` (all unfinished rollouts of a round together,
  full re-prefill every round, the way TRL's tool loop does; role "baseline").
extra_info of every benchmark: generated tokens/s, visual tokens/s (visual tokens of the finished
sequences per second), prefill tokens (tokens pushed through forwards that were not decodes), prefill
tokens saved (prefix sharing + KV reuse; 0 for the baselines, which re-prefill everything), fraction of
wall time outside model forwards (baselines: timed with forward hooks on the model).
Run: .venv/bin/pytest bench/bench_rollout.py --benchmark-only -o python_files="bench_*.py" -s
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from helpers_rollout import env_factory, forced_scripts, make_data, make_tiny  # noqa: E402
from videocom_fast.env import ManipulationEnv, MediaConfig  # noqa: E402
from videocom_fast.media import FrameCache  # noqa: E402

from bench.naive_rollout import encode_conversation, lockstep_rollouts, naive_rollout  # noqa: E402
from videocom_fast.models import load  # noqa: E402
from videocom_fast.rollout import RolloutEngine  # noqa: E402

G, ROUNDS, NEW, PROMPTS = 8, 5, 40, 16
_rates: dict[str, dict] = {}


def _env_factory(media: str):
    if media == "small":
        return env_factory()
    cache, cfg = FrameCache(), MediaConfig()
    return lambda sample: ManipulationEnv(sample, cache=cache, config=cfg)


@pytest.fixture(scope="module")
def setup():
    cache = ROOT / ".cache" / "bench_rollout"
    model, proc = load(make_tiny(cache / "tiny"), dtype=torch.float32)
    samples = make_data(cache / "data")[:PROMPTS]
    return model, proc, samples, forced_scripts(samples, proc.tokenizer)


class _ForwardTimer:
    """Wall time inside the model's forward calls (each `generate` step is one call) and prefill tokens
    (forwards of more than one position; padding included: it is work the baseline really does)."""

    def __init__(self, model):
        self.model, self.seconds, self.prefill_tokens, self._t = model, 0.0, 0, None

    def __enter__(self):
        def pre(mod, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            shape = ids.shape if ids is not None else kwargs["inputs_embeds"].shape[:2]
            if shape[-1] > 1:
                self.prefill_tokens += shape.numel()
            self._t = time.perf_counter()

        def post(mod, args, kwargs, out):
            self.seconds += time.perf_counter() - self._t
        self._hooks = [self.model.register_forward_pre_hook(pre, with_kwargs=True),
                       self.model.register_forward_hook(post, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()


def _record(benchmark, name, *, gen_tokens, visual, wall, prefill_tokens, saved, model_s, role):
    info = dict(gen_tokens_per_s=gen_tokens / wall, visual_tokens_per_s=visual / wall, generated_tokens=gen_tokens,
                prefill_tokens=prefill_tokens, prefill_tokens_saved=saved, outside_model_frac=1.0 - model_s / wall,
                role=role)
    benchmark.extra_info.update(info)
    _rates[name] = info
    return info


def _engine(benchmark, setup, name, n_prompts, n_gen, media="small"):
    model, proc, samples, forced = setup
    eng = RolloutEngine(model, proc, env_factory=_env_factory(media), max_rounds=ROUNDS, max_new_tokens=NEW,
                        forced_rounds=forced)
    # steady state, as in RL training where one engine serves every step: one untimed warm-up run of the same
    # workload (first touch of the KV pool's pages, allocator growth, oneDNN primitives for new shapes); each
    # run gets a fresh FrameCache, so the timed run decodes its videos like the baselines do

    def fresh_frames():
        eng.env_factory = _env_factory(media)
        return (), {}
    benchmark.pedantic(lambda: eng.generate(samples[:n_prompts], num_generations=n_gen, seed=0), setup=fresh_frames,
                       rounds=1, warmup_rounds=1)
    st = eng.stats
    info = _record(benchmark, name, gen_tokens=st["generated_tokens"], visual=st["visual_tokens"], wall=st["wall_s"],
                   prefill_tokens=st["prefill_tokens"], saved=st["prefill_tokens_saved"],
                   model_s=st["model_s"] + st["vision_s"], role="candidate")
    info.update(prefix_tokens_shared=st["prefix_tokens_shared"], kv_reuse_tokens=st["kv_reuse_tokens"],
                steps=st["steps"], vision_cache_hits=st["vision_cache_hits"])


def _visual(model, ids) -> int:
    return sum(1 for t in ids if t in (model.config.image_token_id, model.config.video_token_id))


@pytest.mark.benchmark(group="rollout_vs_naive")
def test_engine_vs_naive(benchmark, setup):
    _engine(benchmark, setup, "engine", PROMPTS, G)


def _naive(benchmark, setup, name, media="small"):
    model, proc, samples, forced = setup
    make_env = _env_factory(media)
    counts = dict(gen=0, visual=0)

    def run():
        for si, sample in enumerate(samples[:PROMPTS]):
            env = make_env(sample)
            for ri in range(G):
                r = naive_rollout(model, proc, env.fork(), max_rounds=ROUNDS, max_new_tokens=NEW, greedy=False,
                                  temperature=0.9, forced=lambda k, si=si, ri=ri: forced(si, ri, k))
                counts["gen"] += sum(r.generated_mask)
                counts["visual"] += _visual(model, r.token_ids)
    with _ForwardTimer(model) as ft:
        t = time.perf_counter()
        benchmark.pedantic(run, rounds=1, iterations=1)
        wall = time.perf_counter() - t
    _record(benchmark, name, gen_tokens=counts["gen"], visual=counts["visual"], wall=wall,
            prefill_tokens=ft.prefill_tokens, saved=0, model_s=ft.seconds, role="baseline")


def _lockstep(benchmark, setup, name, media="small", max_batch=None):
    model, proc, samples, forced = setup
    make_env = _env_factory(media)
    out = {}

    def run():
        out["res"] = lockstep_rollouts(model, proc, [make_env(s) for s in samples[:PROMPTS]], num_generations=G,
                                       max_rounds=ROUNDS, max_new_tokens=NEW, temperature=0.9, top_k=50,
                                       forced=forced, max_batch=max_batch)
    with _ForwardTimer(model) as ft:
        t = time.perf_counter()
        benchmark.pedantic(run, rounds=1, iterations=1)
        wall = time.perf_counter() - t
    res = [r for g in out["res"] for r in g]
    gen = sum(sum(r.generated_mask) for r in res)
    visual = sum(_visual(model, encode_conversation(proc, r.conversation)["input_ids"][0].tolist()) for r in res)
    _record(benchmark, name, gen_tokens=gen, visual=visual, wall=wall, prefill_tokens=ft.prefill_tokens,
            saved=0, model_s=ft.seconds, role="baseline")


@pytest.mark.benchmark(group="rollout_vs_naive")
def test_naive_loop(benchmark, setup):
    _naive(benchmark, setup, "naive")


@pytest.mark.benchmark(group="rollout_vs_lockstep")
def test_engine_vs_lockstep(benchmark, setup):
    _engine(benchmark, setup, "engine_again", PROMPTS, G)


@pytest.mark.benchmark(group="rollout_vs_lockstep")
def test_lockstep(benchmark, setup):
    _lockstep(benchmark, setup, "lockstep")


@pytest.mark.benchmark(group="rollout_spec_vs_naive")
def test_engine_spec_vs_naive(benchmark, setup):
    _engine(benchmark, setup, "engine_spec", PROMPTS, G, media="spec")


@pytest.mark.benchmark(group="rollout_spec_vs_naive")
def test_naive_loop_spec(benchmark, setup):
    _naive(benchmark, setup, "naive_spec", media="spec")


@pytest.mark.benchmark(group="rollout_spec_vs_lockstep")
def test_engine_spec_vs_lockstep(benchmark, setup):
    _engine(benchmark, setup, "engine_spec_again", PROMPTS, G, media="spec")


@pytest.mark.benchmark(group="rollout_spec_vs_lockstep")
def test_lockstep_spec(benchmark, setup):
    # 16 rows per generate: all 128 at once (padded 4k-token prefills) ran out of 24 GiB
    _lockstep(benchmark, setup, "lockstep_spec", media="spec", max_batch=16)


@pytest.fixture(scope="module", autouse=True)
def _table():
    """After the file's last benchmark: the table of every workload measured (shown with -s)."""
    yield
    if _rates:
        _print_table()


def _print_table():
    print(f"\n\nrollout throughput (tiny Qwen2.5-VL fp32, 2-core CPU, {PROMPTS} prompts x G={G}, {ROUNDS} rounds, "
          f"<= {NEW} new tokens per round)")
    print("small = helpers_rollout.SMALL_MEDIA budgets, spec = the method's (env.MediaConfig defaults)")
    print(f"{'loop':18} {'gen tok/s':>10} {'vis tok/s':>10} {'prefill':>8} {'saved':>8} {'outside':>8}")
    for name, r in _rates.items():
        print(f"{name:18} {r['gen_tokens_per_s']:10.1f} {r['visual_tokens_per_s']:10.0f} {r['prefill_tokens']:8d} "
              f"{r['prefill_tokens_saved']:8d} {100 * r['outside_model_frac']:7.1f}%")
    for name, base in (("engine", "naive"), ("engine_again", "lockstep"), ("engine_spec", "naive_spec"),
                       ("engine_spec_again", "lockstep_spec")):
        if name in _rates and base in _rates:
            x = _rates[name]["gen_tokens_per_s"] / _rates[base]["gen_tokens_per_s"]
            print(f"{name} generated tokens/s x {base}: {x:.2f}")
