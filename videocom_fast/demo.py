"""`make demo` / `videocom-fast demo`: the whole method on the embedded default, on a CPU, in minutes.

The embedded default is a tiny Qwen2.5-VL that SEES (issue 17, docs/vision_demo.md):
  1. synthesize held-out videos (H.264) and GRPO prompts; training episodes are rendered in memory later
  2. perception warm-up: the vision tower + merger learn rendered scenes (segment tint, tag, slot, character)
  3. greedy held-out accuracy BEFORE SFT (the warm-up model: it has never seen the protocol)
  4. SFT on a stream of rendered gold chains (tower frozen, merger trains), then held-out accuracy with the
     real observations, with every observation's pixels black, and with the zoom crops black (the ablation)
  5. RA-GRPO with the method's reward (accuracy + reasoning), held-out accuracy after it, and G=8 sampled
     rollouts (rollout tokens/s), then the HTML report
Progress and the closing lines go to stderr; `videocom-fast demo` prints the summary (runs/demo/summary.json)
as JSON on stdout.
Configs: configs/sft_tiny.yaml (media budgets, shared by all stages) and configs/grpo_tiny.yaml.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"   # the packaged configs (work from any directory)

# Stage sizes. "full" is what `make demo` runs (~9 min on 2 cores, measured in the README); "fast" only
# checks that the stages connect (tests/test_demo.py).
SIZES = {
    "full": dict(held_out=48, prompts=32, warm_steps=300, sft_steps=(400, 300), grpo_steps=20,
                 rollout_prompts=8),
    "fast": dict(held_out=8, prompts=8, warm_steps=10, sft_steps=(20, 10), grpo_steps=2, rollout_prompts=4),
}


def _stage(name: str):
    print(f"\n=== {name} ===", file=sys.stderr, flush=True)   # progress: stderr; the results: stdout
    return time.perf_counter()


@contextmanager
def _one_core_for_rendering():
    """The rendered streams draw scenes in a background thread: leave it a core (on 2 cores, measured: 0.34 s
    per SFT step with 1 torch thread vs 0.39 s with 2, which then fight the renderer)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, (os.cpu_count() or 2) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(out="runs/demo", *, fast: bool = False, seed: int = 0) -> dict:
    import yaml

    from videocom_fast.ablation import ablation_table
    from videocom_fast.data import load_samples, synthesize
    from videocom_fast.evaluate import media_config_from, rollout_to_dir
    from videocom_fast.report import write_report
    from videocom_fast.training.config import load_config
    from videocom_fast.training.grpo import GRPOConfig, run_grpo
    from videocom_fast.training.perception import warm_up
    from videocom_fast.training.scenes import sft_on_scenes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = SIZES["fast" if fast else "full"]
    media = yaml.safe_load((CONFIGS / "sft_tiny.yaml").read_text())["media"]
    times, t_all = {}, time.perf_counter()

    n_eval = size["held_out"]
    t = _stage(f"1/5 synthesize {n_eval} held-out videos and {size['prompts']} GRPO prompts")
    paths = synthesize(out / "data", num_samples=size["prompts"] + n_eval, num_eval=n_eval, seed=seed,
                       media_config=media_config_from(media))
    held = load_samples(paths["eval"], kind="grpo")
    times["synth_s"] = time.perf_counter() - t

    t = _stage(f"2/5 perception warm-up of the vision tower + merger ({size['warm_steps']} steps)")
    with _one_core_for_rendering():
        warm = warm_up("tiny", out / "perceive", media=media, steps=size["warm_steps"], crops=64,
                       char_weight=1.0, seed=seed, log_every=50, log=_log)
    times["warm_up_s"] = time.perf_counter() - t

    t = _stage("3/5 held-out accuracy before SFT")
    before_sft = ablation_table(out / "perceive", held, media, rows=("full",))["full"]
    times["eval_before_sft_s"] = time.perf_counter() - t

    (s1, s2) = size["sft_steps"]
    t = _stage(f"4/5 SFT on rendered episodes ({s1} + {s2} steps x 8), held-out accuracy and ablation")
    with _one_core_for_rendering():
        first = sft_on_scenes(out / "perceive", out / "sft1", media=media, steps=s1, lr=3e-3, seed=seed,
                              log_every=max(1, min(50, s1 // 2)), log=_log)
        second = sft_on_scenes(out / "sft1", out / "sft", media=media, steps=s2, lr=2e-3, seed=seed + 1,
                               log_every=max(1, min(50, s2 // 2)), log=_log)
    times["sft_s"] = time.perf_counter() - t
    _join_metrics(out / "sft1" / "metrics.jsonl", out / "sft" / "metrics.jsonl", offset=s1)   # one SFT curve
    t = time.perf_counter()
    table = ablation_table(out / "sft", held, media)
    times["eval_sft_s"] = time.perf_counter() - t

    t = _stage(f"5/5 RA-GRPO ({size['grpo_steps']} steps), held-out accuracy after it, rollouts, report")
    grpo_over = [f"model={out / 'sft'}", f"data={paths['grpo']}", f"output_dir={out / 'grpo'}",
                 f"seed={seed}", f"max_steps={size['grpo_steps']}", "save_every=0", "progress=false"]
    grpo = run_grpo(load_config(GRPOConfig, CONFIGS / "grpo_tiny.yaml", grpo_over))
    times["grpo_s"] = time.perf_counter() - t
    t = time.perf_counter()
    after = ablation_table(out / "grpo", held, media, rows=("full",))["full"]
    roll = rollout_to_dir(out / "grpo", paths["grpo"], out, num_generations=8, limit=size["rollout_prompts"],
                          media=media)
    times["eval_after_grpo_s"] = time.perf_counter() - t

    full, blank, zoom = table["full"], table["blank_all"], table["blank_zoom"]
    summary = {
        "held_out_samples": n_eval, "grpo_prompts": size["prompts"],
        "perception_held_out": warm["held_out"],
        "sft_first_loss": first["history"][0]["loss"], "sft_final_loss": second["history"][-1]["loss"],
        "sft_turn_accuracy_last": {k: v for k, v in second["history"][-1].items() if k.startswith("turn_")},
        "accuracy_before_sft": before_sft["accuracy_mean"],
        "accuracy_after_sft": full["accuracy_mean"],
        "accuracy_after_sft_observations_black": blank["accuracy_mean"],
        "accuracy_after_sft_zoom_black": zoom["accuracy_mean"],
        "precision_after_sft": {k: full.get(f"precision_{k}") for k in ("segment", "frame", "zoom")},
        "accuracy_after_grpo": after["accuracy_mean"],
        "reward_after_sft": full["reward_mean"], "reward_after_grpo": after["reward_mean"],
        "grpo_train_reward_first": _first(grpo, "reward_means"),
        "grpo_train_reward_last": _last(grpo, "reward_means"),
        "rollout_tokens_per_s": roll["rollout_tokens_per_s"],
        "visual_tokens_per_s": roll["visual_tokens_per_s"],
        "rollout_fraction_outside_model": roll["fraction_outside_model"],
        **{k: round(v, 1) for k, v in times.items()},
        "total_s": round(time.perf_counter() - t_all, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "ablation.json").write_text(json.dumps(table, indent=1))
    report = write_report(out)
    print("\n=== videocom_fast demo done ===")
    print(f"held-out greedy accuracy ({n_eval} H.264 samples, chance 0.25): before SFT "
          f"{summary['accuracy_before_sft']:.3f}, after SFT {summary['accuracy_after_sft']:.3f}, after GRPO "
          f"{summary['accuracy_after_grpo']:.3f}")
    print(f"ablation after SFT: observations' pixels black "
          f"{summary['accuracy_after_sft_observations_black']:.3f}, "
          f"zoom crops black {summary['accuracy_after_sft_zoom_black']:.3f}")
    print(f"held-out reward (accuracy + reasoning): after SFT {summary['reward_after_sft']:.3f}, after GRPO "
          f"{summary['reward_after_grpo']:.3f}")
    print(f"rollout tokens/s (G=8, sampled): {summary['rollout_tokens_per_s']:.1f} "
          f"(visual tokens/s {summary['visual_tokens_per_s']:.1f})")
    print(f"total {summary['total_s']:.0f} s; report: {report}")
    return summary


def _join_metrics(first: Path, second: Path, offset: int) -> None:
    """Prepend the first SFT stage's logged rows to the second's (its steps shifted by `offset`): the report
    then draws one SFT curve over both stages."""
    rows = [json.loads(x) for x in first.read_text().splitlines() if x.strip()]
    later = [json.loads(x) for x in second.read_text().splitlines() if x.strip()]
    rows += [{**r, "step": r["step"] + offset} for r in later]
    tmp = second.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(second)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _first(d: dict, key: str):
    v = d.get(key) or []
    return v[0] if v else None


def _last(d: dict, key: str):
    v = d.get(key) or []
    return v[-1] if v else None
