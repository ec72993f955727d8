"""The rollout benchmark of `make gpu-check` (bench/gpu_check.py runs `bench_7b()` in a child process).

Workload (bench_rollout.py's, smaller so a 7B-shaped model fits the 8-minute check): the synthesized dataset
of tests/helpers_rollout (`make gpu-carry` pre-makes it: the GPU machines cannot encode video), the method's
media budgets (env.MediaConfig defaults: 32-frame video at up to 360*420 pixels, ~2.3k-token prompts),
PROMPTS x G rollouts, ROUNDS rounds of <= NEW tokens, rounds 1..SCRIPTED scripted (forced_scripts), the rest
sampled (temperature 0.9, top-k 50). Systems: RolloutEngine, RolloutEngine with its decode-only steps through
CUDA graphs (`engine_graphs`: CUDA_GRAPHS, Triton attention; decode_graphs.py), the naive loop and lock-step
`generate` (bench/naive_rollout.py), all on the same model and workload.

Measures per system, from one timed run after one untimed run (one prompt) that counts device syncs:
- generated tokens / wall second;
- steps (model forwards), host ms per step = wall / steps;
- GPU ms per step: CUDA events recorded when a step's forward starts and when its lm_head output is written
  (the naive loop and `generate`: module hooks on the input embedding and lm_head; the engines: around their
  step's `_forward` / `_graph_forward`, since a hook inside the language model turns the packed forward off
  and no hook runs on a graph's replay); the span between them on the stream is the step's forward on the GPU.
  Host minus GPU is what the GPU waits for (Python, scheduling, sampling, environment). Steps that run no
  lm_head (prefill-only chunks) are not timed.
- device syncs per step: torch.cuda.set_sync_debug_mode("warn") makes every synchronizing call (.item(),
  .cpu(), .tolist(), nonzero, blocking copies) raise a warning; they are counted (explicit
  torch.cuda.synchronize() calls are not reported by that mode, and none of the systems makes one per step);
- peak GPU memory (torch.cuda.max_memory_allocated) of the timed run, weights included.
`shape="tiny"` runs the same code on the tiny model (CPU allowed: GPU columns are then None): CI's check.
"""
from __future__ import annotations

import inspect
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from gpu_check import G, NEW, PROMPTS, ROUNDS, SCRIPTED  # noqa: E402

CARRIED_DATA = ROOT / ".gpu-carry" / "rollout_data"

# Qwen2.5-VL-7B-Instruct's config.json sizes (text: 28 layers of 3584, GQA 28/4 heads of 128; vision: 32
# blocks of 1280, full attention in 7/15/23/31, merger to 3584).
TEXT_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
               hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                   "mrope_section": [16, 24, 24]})
VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3, patch_size=14,
                 spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
                 out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")


# --- model ----------------------------------------------------------------------------------------------
def config_7b(tokenizer):
    """Qwen2.5-VL-7B's shapes with the tiny tokenizer's special-token ids (random weights: any ids work)."""
    from transformers import Qwen2_5_VLConfig

    from videocom_fast.models import SPECIAL_TOKENS
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    special = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    return Qwen2_5_VLConfig(text_config=dict(TEXT_7B, **special), vision_config=VISION_7B,
                            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                            tie_word_embeddings=False, **special)


def build_model(shape: str, device: torch.device):
    """(model, processor): random weights allocated on `device` directly (7B: ~16.6 GB in bf16)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from videocom_fast.models import build_processor, build_tokenizer, tiny_config
    tokenizer = build_tokenizer()
    if shape == "tiny":
        cfg, dtype = tiny_config(tokenizer), torch.float32
    elif shape == "7b":
        cfg, dtype = config_7b(tokenizer), torch.bfloat16
    else:
        raise ValueError(f"shape: expected 'tiny' or '7b', got {shape!r}")
    torch.manual_seed(0)
    with device:   # NOTE: no checkpoint: weights are initialised where they live, nothing read from disk
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return model.eval(), build_processor(tokenizer)


# --- measuring ------------------------------------------------------------------------------------------
METER = None    # the StepMeter in use (the engines report their steps to it: `engine_step`)


class StepMeter:
    """Steps, per-step forward spans from CUDA events, and device syncs (sync debug mode warnings).
    `hooks`: count steps by module hooks on the input embedding and lm_head (naive loop, lock-step); the
    engines report their own (`engine_step`): a hook inside the language model would turn the engine's packed
    forward off (packed_forward.supports), and no hook runs on a CUDA graph's replay."""

    def __init__(self, model, count_syncs: bool, hooks: bool = True):
        from videocom_fast import modeling
        self.embed, self.head = modeling.inner(model).get_input_embeddings(), modeling.lm_head(model)
        self.cuda = next(model.parameters()).is_cuda
        self.count_syncs, self.hooks = count_syncs and self.cuda, hooks
        self.steps, self.spans, self._open, self.syncs = 0, [], None, 0

    def engine_step(self, fn, *args):
        """One engine forward (`_forward` or `_graph_forward`): counted, its span recorded around the call."""
        self._start()
        try:
            return fn(*args)
        finally:
            self._end()

    def _start(self, *_):
        self.steps += 1
        if self.cuda:
            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record()

    def _end(self, *_):
        if self._open is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.spans.append((self._open, end))
            self._open = None

    def __enter__(self):
        global METER
        METER = self
        self._hooks = []
        if self.hooks:
            self._hooks = [self.embed.register_forward_pre_hook(self._start),
                           self.head.register_forward_hook(self._end)]
        if self.count_syncs:
            self._warn = warnings.catch_warnings(record=True)
            self._records = self._warn.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        global METER
        METER = None
        for h in self._hooks:
            h.remove()
        if self.count_syncs:
            torch.cuda.set_sync_debug_mode("default")
            self.syncs = sum("synchroniz" in str(w.message) for w in self._records)
            self._warn.__exit__(*exc)

    def gpu_ms(self) -> float | None:
        if not self.spans:
            return None
        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.spans) / len(self.spans)


# --- the three systems ----------------------------------------------------------------------------------
def _workload(proc, n_prompts: int, media: str = "spec"):
    from helpers_rollout import forced_scripts, make_data, media_config

    from videocom_fast.env import ManipulationEnv, MediaConfig
    from videocom_fast.media import FrameCache
    data = CARRIED_DATA if (CARRIED_DATA / "grpo.json").exists() else ROOT / ".cache" / "gpu_check" / "data"
    samples = make_data(data)[:n_prompts]
    script = forced_scripts(samples, proc.tokenizer)
    forced = lambda si, ri, r: script(si, ri, r) if r < SCRIPTED else None   # noqa: E731
    cache, cfg = FrameCache(), MediaConfig() if media == "spec" else media_config()
    return samples, forced, (lambda sample: ManipulationEnv(sample, cache=cache, config=cfg))


def _metered(cls):
    """`cls` with each model forward reported to the StepMeter in use."""
    class Metered(cls):
        def _forward(self, *args):
            fn = super()._forward
            return METER.engine_step(fn, *args) if METER else fn(*args)

        def _graph_forward(self, *args):
            fn = super()._graph_forward
            return METER.engine_step(fn, *args) if METER else fn(*args)
    return Metered


def run_engine(model, proc, samples, forced, make_env, graphs: bool = False) -> int:
    from videocom_fast.rollout import RolloutEngine, decode_graphs, fused_step
    kw = dict(env_factory=make_env, max_rounds=ROUNDS, max_new_tokens=NEW, forced_rounds=forced)
    if "kv_budget_tokens" in inspect.signature(RolloutEngine).parameters:
        kw["kv_budget_tokens"] = len(samples) * G * 4096     # ~2.3k-token prompts + 3 rounds, whole episodes
    cls, cuda = RolloutEngine, next(model.parameters()).is_cuda
    if graphs:
        kw["attention"] = "triton"     # what graphs capture (flash-attn's varlen call takes host lengths)

        class Graphed(RolloutEngine):
            CUDA_GRAPHS = True
            GRAPH_CAPTURE = None if cuda else staticmethod(decode_graphs.record_capture)
        cls = Graphed
    eng = _metered(cls)(model, proc, **kw)
    # on the CPU (CI's tiny run) graphs are record_capture's, over the fused ops' dispatched reference
    with fused_step.force_impl("torch" if graphs and not cuda else None):
        eng.generate(samples, num_generations=G, temperature=0.9, top_k=50, seed=0)
    if graphs and eng.stats.get("cuda_graphs") != "on":
        raise RuntimeError(f"CUDA graphs did not run: {eng.stats.get('cuda_graphs')}")
    return eng.stats["generated_tokens"]


def run_engine_graphs(model, proc, samples, forced, make_env) -> int:
    """The engine with decode-only steps through CUDA graphs (decode_graphs.py; Triton attention)."""
    return run_engine(model, proc, samples, forced, make_env, graphs=True)


def run_naive(model, proc, samples, forced, make_env) -> int:
    from bench.naive_rollout import naive_rollout
    n = 0
    for si, sample in enumerate(samples):
        env = make_env(sample)
        for ri in range(G):
            r = naive_rollout(model, proc, env.fork(), max_rounds=ROUNDS, max_new_tokens=NEW, greedy=False,
                              temperature=0.9, forced=lambda k, si=si, ri=ri: forced(si, ri, k))
            n += sum(r.generated_mask)
    return n


def run_lockstep(model, proc, samples, forced, make_env) -> int:
    from bench.naive_rollout import lockstep_rollouts
    groups = lockstep_rollouts(model, proc, [make_env(s) for s in samples], num_generations=G, max_rounds=ROUNDS,
                               max_new_tokens=NEW, temperature=0.9, top_k=50, forced=forced)
    return sum(sum(r.generated_mask) for g in groups for r in g)


SYSTEMS = {"engine": run_engine, "engine_graphs": run_engine_graphs, "naive": run_naive,
           "lockstep": run_lockstep}


def measure(name: str, model, proc, media: str = "spec") -> dict:
    fn, cuda, hooks = SYSTEMS[name], next(model.parameters()).is_cuda, not name.startswith("engine")
    with StepMeter(model, count_syncs=True, hooks=hooks) as sync_run:       # untimed: warm-up + sync count
        fn(model, proc, *_workload(proc, 1, media))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    work = _workload(proc, PROMPTS, media)
    with StepMeter(model, count_syncs=False, hooks=hooks) as timed:
        t = time.perf_counter()
        gen = fn(model, proc, *work)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    steps = max(timed.steps, 1)
    return dict(generated_tokens=gen, wall_s=round(wall, 3), gen_tokens_per_s=gen / wall, steps=timed.steps,
                host_ms_per_step=1000 * wall / steps, gpu_ms_per_step=timed.gpu_ms(),
                syncs_per_step=sync_run.syncs / max(sync_run.steps, 1) if cuda else None,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


def bench_7b(shape: str = "7b", device: str | None = None, systems=tuple(SYSTEMS), media: str = "spec",
             out_path: Path | None = None) -> dict:
    """media: "spec" (the method's budgets) or "small" (helpers_rollout.SMALL_MEDIA: CI's quick run).
    out_path: rewritten after each system, so a run stopped by gpu-check's time limit keeps what it measured."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t = time.perf_counter()
    try:
        model, proc = build_model(shape, device)
    except ImportError as e:   # e.g. transformers' video processor needs torchvision: say so in the JSON
        return {"shape": shape, "error": f"cannot build the model/processor: {e}"}
    out = {"shape": shape, "device": str(device), "dtype": str(next(model.parameters()).dtype),
           "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
           "build_s": round(time.perf_counter() - t, 1),
           "workload": dict(prompts=PROMPTS, G=G, rounds=ROUNDS, max_new_tokens=NEW, scripted_rounds=SCRIPTED,
                            media=media),
           "systems": {}}
    for name in systems:
        try:
            out["systems"][name] = measure(name, model, proc, media)
        except Exception as e:  # noqa: BLE001 - one system failing must not hide the others' numbers
            out["systems"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(name, out["systems"][name], flush=True)
        if out_path is not None:
            Path(out_path).write_text(json.dumps(out, indent=1))
    return out
