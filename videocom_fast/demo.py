"""`make demo` / `videocom-fast demo`: the whole method on the embedded default, on a CPU, in minutes.

  1. synthesize the default dataset (overlayed videos whose questions need segment -> frame -> zoom)
  2. build the tiny Qwen2.5-VL (real architecture, random init) and warm its vision tower + merger up on
     rendered scenes (training/perception.py: segment tint, tag slot, character and colour)
  3. SFT it on the gold manipulation chains (vision frozen); greedy held-out accuracy before and after,
     and the blanked-media ablation (the observations' pixels black: videocom_fast/ablation.py)
  4. RA-GRPO from the SFT model with the method's reward (accuracy + reasoning)
  5. evaluate again, run G=8 sampled rollouts per prompt, and write the HTML report
It ends by printing held-out accuracy before SFT / after SFT / after GRPO, the ablation, rollout tokens/s,
and where the report is.
Configs: configs/sft_tiny.yaml and configs/grpo_tiny.yaml (media budgets shared by all stages).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"   # the packaged configs (work from any directory)


def _stage(name: str):
    print(f"\n=== {name} ===", file=sys.stderr, flush=True)   # progress: stderr; the results: stdout
    return time.perf_counter()


def run_demo(out="runs/demo", *, fast: bool = False, num_samples: int | None = None, seed: int = 0) -> dict:
    import yaml

    from videocom_fast.ablation import ablation_table
    from videocom_fast.data import load_samples, synthesize
    from videocom_fast.evaluate import _engine, evaluate, rollout_to_dir, run_episodes
    from videocom_fast.training.perception import warm_up
    from videocom_fast.report import write_report
    from videocom_fast.training.grpo import GRPOConfig, run_grpo
    from videocom_fast.training.scenes import sft_on_scenes
    from videocom_fast.training.config import load_config as _load

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sft_yaml, grpo_yaml = CONFIGS / "sft_tiny.yaml", CONFIGS / "grpo_tiny.yaml"
    media = yaml.safe_load(sft_yaml.read_text())["media"]
    n = num_samples or (24 if fast else 80)
    times = {}

    # The held-out samples and the GRPO prompts are real H.264 videos; SFT streams rendered episodes
    # (training/scenes.py: encoding the thousands it needs would cost ~1 s each)
    n_eval = min(48, n // 2)
    t = _stage(f"1/5 synthesize {n} samples ({n_eval} held out)")
    paths = synthesize(out / "data", num_samples=n, seed=seed, media_config=_media(media), num_eval=n_eval)
    times["synth_s"] = time.perf_counter() - t

    t = _stage("2/5 build the tiny Qwen2.5-VL and warm its vision tower + merger up on rendered scenes")
    warm = warm_up("tiny", out / "perceive", media=media, steps=40 if fast else 300, seed=seed)
    times["perception_s"] = time.perf_counter() - t
    held = load_samples(paths["eval"], kind="grpo")
    pre = run_episodes(_engine(out / "perceive", media, max_rounds=5, max_new_tokens=64), held)[2]

    t = _stage("3/5 SFT on rendered episodes; held-out accuracy and the blanked-media ablation")
    sft = sft_on_scenes(out / "perceive", out / "sft", media=media, steps=40 if fast else 600, seed=seed)
    times["sft_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ablation = ablation_table(out / "sft", held, media)
    (out / "ablation_sft.json").write_text(json.dumps(ablation, indent=1))
    ev = dict(media=media, greedy=True, max_new_tokens=64)
    before = evaluate(out / "sft", paths["eval"], out / "eval_sft.json", tag="sft", **ev)
    times["eval_sft_s"] = time.perf_counter() - t

    t = _stage("4/5 RA-GRPO (the method's reward: accuracy + reasoning)")
    grpo_over = [f"model={out / 'sft'}", f"data={paths['grpo']}", f"output_dir={out / 'grpo'}", f"seed={seed}",
                 "save_every=0"]
    if fast:
        grpo_over += ["max_steps=3", "prompts_per_step=2", "num_generations=4"]
    grpo = run_grpo(_load(GRPOConfig, grpo_yaml, grpo_over))
    times["grpo_s"] = time.perf_counter() - t

    t = _stage("5/5 evaluate after GRPO, sampled rollouts, report")
    after = evaluate(out / "grpo", paths["eval"], out / "eval_grpo.json", tag="grpo", **ev)
    roll = rollout_to_dir(out / "grpo", paths["grpo"], out, num_generations=8, limit=4 if fast else 8,
                          media=media, max_new_tokens=64)
    times["eval_rollout_s"] = time.perf_counter() - t

    summary = {
        "samples": n, "held_out": len(held), "perception_held_out": warm["held_out"],
        "eval_accuracy_before_sft": pre["accuracy_mean"],
        **{f"ablation_{k}_accuracy": v["accuracy_mean"] for k, v in ablation.items()},
        "sft_first_loss": sft["history"][0]["loss"], "sft_final_loss": sft["history"][-1]["loss"],
        "grpo_train_reward_first": _first(grpo, "reward_means"), "grpo_train_reward_last": _last(grpo, "reward_means"),
        "eval_reward_before_grpo": before["reward_mean"], "eval_reward_after_grpo": after["reward_mean"],
        "eval_accuracy_before_grpo": before["accuracy_mean"], "eval_accuracy_after_grpo": after["accuracy_mean"],
        "eval_format_before_grpo": before["format_mean"], "eval_format_after_grpo": after["format_mean"],
        "rollout_tokens_per_s": roll["rollout_tokens_per_s"], "visual_tokens_per_s": roll["visual_tokens_per_s"],
        "rollout_fraction_outside_model": roll["fraction_outside_model"],
        **{k: round(v, 1) for k, v in times.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    report = write_report(out)
    print("\n=== videocom_fast demo done ===")
    print(f"rollout tokens/s (G=8, sampled): {summary['rollout_tokens_per_s']:.1f} "
          f"(visual tokens/s {summary['visual_tokens_per_s']:.1f})")
    print(f"held-out greedy accuracy ({len(held)} samples, chance 0.25): before SFT {pre['accuracy_mean']:.3f}   "
          f"after SFT {before['accuracy_mean']:.3f}   after GRPO {after['accuracy_mean']:.3f}")
    print(f"blanked-media ablation of the SFT model: accuracy {ablation['full']['accuracy_mean']:.3f} -> "
          f"{ablation['blank_all']['accuracy_mean']:.3f} (all observations black), "
          f"{ablation['blank_zoom']['accuracy_mean']:.3f} (zoom crops black)")
    print(f"held-out reward (accuracy + reasoning) before GRPO: {before['reward_mean']:.3f}   after GRPO: "
          f"{after['reward_mean']:.3f}   segment / frame / zoom precision after SFT: "
          + " / ".join(f"{before[f'precision_{k}'] or 0:.2f}" for k in ("segment", "frame", "zoom")))
    print(f"GRPO training reward first step {summary['grpo_train_reward_first']:.3f}, "
          f"last step {summary['grpo_train_reward_last']:.3f}")
    print(f"report: {report}")
    return summary


def _media(d: dict):
    from videocom_fast.env import MediaConfig
    return MediaConfig(**d)


def _first(d: dict, key: str):
    v = d.get(key) or []
    return v[0] if v else None


def _last(d: dict, key: str):
    v = d.get(key) or []
    return v[-1] if v else None
