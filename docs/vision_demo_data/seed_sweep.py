"""One row of docs/vision_demo.md's session-16 seed table: the demo's synth, warm-up, SFT (400 + 300
steps) and ablation, with the LLM's width and the warm-up's tag weight as arguments.

    python docs/vision_demo_data/seed_sweep.py --seed 2 --hidden 256 --tag-pos-weight 25 --out /tmp/sweep_s2
    python docs/vision_demo_data/seed_sweep.py ... --extra-steps 300   # then 300 more SFT steps at lr 2e-3
    python docs/vision_demo_data/seed_sweep.py ... --grpo-lr 3e-5      # then the demo's GRPO (20 steps)

Runs on 1 torch thread (two seeds at a time on 2 cores); prints and writes out/result.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--tag-pos-weight", type=float, default=1.0)
    ap.add_argument("--extra-steps", type=int, default=0)
    ap.add_argument("--steps", type=int, nargs=3, default=(300, 400, 300), metavar=("WARM", "SFT1", "SFT2"),
                    help="the demo's: 300 warm-up, 400 + 300 SFT")
    ap.add_argument("--held-out", type=int, default=48)
    ap.add_argument("--grpo-lr", type=float, default=None,
                    help="after SFT: grpo_tiny.yaml's RA-GRPO, 20 steps at this lr, from the last SFT stage")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch
    import yaml

    from videocom_fast.ablation import ablation_table
    from videocom_fast.data import load_samples, synthesize
    from videocom_fast.demo import CONFIGS
    from videocom_fast.evaluate import media_config_from
    from videocom_fast.models import build_tiny
    from videocom_fast.training.perception import warm_up
    from videocom_fast.training.scenes import sft_on_scenes

    torch.set_num_threads(1)
    out, seed = args.out, args.seed
    out.mkdir(parents=True, exist_ok=True)
    media = yaml.safe_load((CONFIGS / "sft_tiny.yaml").read_text())["media"]
    times, t = {}, time.perf_counter()
    warm_steps, s1, s2 = args.steps
    paths = synthesize(out / "data", num_samples=32 + args.held_out, num_eval=args.held_out, seed=seed,
                       media_config=media_config_from(media))
    held = load_samples(paths["eval"], kind="grpo")
    times["synth_s"] = time.perf_counter() - t
    sizes = {} if args.hidden == 128 else dict(hidden_size=args.hidden)
    base = build_tiny(out / "_base", seed=seed, **sizes)
    t = time.perf_counter()
    warm = warm_up(base, out / "perceive", media=media, steps=warm_steps, crops=64, char_weight=1.0,
                   seed=seed, tag_pos_weight=args.tag_pos_weight, log_every=100)
    times["warm_up_s"] = time.perf_counter() - t
    stages = [("sft1", s1, 3e-3, seed), ("sft", s2, 2e-3, seed + 1)]
    if args.extra_steps:
        stages.append(("sft_more", args.extra_steps, 2e-3, seed + 2))
    src, result = out / "perceive", dict(vars(args), out=str(out), perception_held_out=warm["held_out"])
    for name, steps, lr, s in stages:
        t = time.perf_counter()
        info = sft_on_scenes(src, out / name, media=media, steps=steps, lr=lr, seed=s, log_every=100)
        hist = info["history"]
        times[f"{name}_s"] = time.perf_counter() - t
        src = out / name
        if name == "sft1":
            continue
        table = ablation_table(src, held, media)
        full = table["full"]
        result[name] = dict(
            turn_accuracy_last={k: v for k, v in hist[-1].items() if k.startswith("turn_")},
            accuracy=full["accuracy_mean"], observations_black=table["blank_all"]["accuracy_mean"],
            zoom_black=table["blank_zoom"]["accuracy_mean"], reward=full["reward_mean"],
            precision={k: full.get(f"precision_{k}") for k in ("segment", "frame", "zoom")})
    if args.grpo_lr is not None:
        from videocom_fast.training.config import load_config
        from videocom_fast.training.grpo import GRPOConfig, run_grpo
        t = time.perf_counter()
        over = [f"model={src}", f"data={paths['grpo']}", f"output_dir={out / 'grpo'}", f"seed={seed}",
                "max_steps=20", "save_every=0", "progress=false", f"lr={args.grpo_lr}"]
        grpo = run_grpo(load_config(GRPOConfig, CONFIGS / "grpo_tiny.yaml", over))
        after = ablation_table(out / "grpo", held, media, rows=("full",))["full"]
        result["grpo"] = dict(accuracy=after["accuracy_mean"], reward=after["reward_mean"],
                              train_rewards=grpo.get("reward_means"))
        times["grpo_s"] = time.perf_counter() - t
    result["times"] = {k: round(v, 1) for k, v in times.items()}
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
