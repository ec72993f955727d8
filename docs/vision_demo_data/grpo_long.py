"""A longer RA-GRPO from a seed_sweep run's SFT model, judged on a larger held-out set (issue 17, session 19).

The demo's GRPO (20 steps x 4 prompts x G 8 on 32 prompts) moves the held-out reward by about one standard
error of its 48-sample evaluation (docs/vision_demo_grpo_noise.md). This run gives GRPO more prompts and more
steps, and the evaluation 4x the held-out samples, all freshly synthesized (synth seed 1000 + seed: never
trained on).

    python docs/vision_demo_data/grpo_long.py RUN_DIR --seed 0 --steps 100 --prompts 8 --lr 3e-5

RUN_DIR is a seed_sweep output holding `sft/`. Writes RUN_DIR/long_data/ (once per run dir), the GRPO model in
RUN_DIR/grpo_long_<tag>/, and RUN_DIR/long_<tag>.json: the training rewards per step and the paired held-out
evaluation (greedy and sampled at G 8, sampled_eval.py). Runs on 1 torch thread.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (G 8 episodes each)")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--train", type=int, default=256, help="training prompts synthesized")
    ap.add_argument("--held-out", type=int, default=192)
    ap.add_argument("--eval-seed", type=int, default=1234)
    args = ap.parse_args()

    import torch

    from videocom_fast.data import load_samples, synthesize
    from videocom_fast.demo import CONFIGS
    from videocom_fast.evaluate import media_config_from
    from videocom_fast.training.config import load_config
    from videocom_fast.training.grpo import GRPOConfig, run_grpo

    sys.path.insert(0, str(Path(__file__).parent))
    from sampled_eval import model_settings, paired_eval

    torch.set_num_threads(1)
    data = args.run / "long_data"
    t = time.perf_counter()
    if not (data / "eval.json").exists():   # in the SFT model's media settings (its media.json)
        media = model_settings(args.run, "sft")[0]
        synthesize(data, num_samples=args.train + args.held_out, num_eval=args.held_out,
                   seed=1000 + args.seed, media_config=media_config_from(media))
    synth_s = time.perf_counter() - t
    held = load_samples(data / "eval.json", kind="grpo")
    tag = f"lr{args.lr:g}_n{args.steps}_p{args.prompts}"
    t = time.perf_counter()
    over = [f"model={args.run}/sft", f"data={data}/grpo.json", f"output_dir={args.run}/grpo_long_{tag}",
            f"seed={args.seed}", f"max_steps={args.steps}", f"prompts_per_step={args.prompts}",
            f"lr={args.lr}", "save_every=0", "progress=false", "tensorboard=false"]
    grpo = run_grpo(load_config(GRPOConfig, CONFIGS / "grpo_tiny.yaml", over))
    grpo_s = time.perf_counter() - t
    t = time.perf_counter()
    res = paired_eval(args.run, "sft", "grpo_long_" + tag, held, G=8, eval_seed=args.eval_seed)
    res.update(args=dict(vars(args), run=str(args.run)), train_rewards=grpo.get("reward_means"),
               times=dict(synth_s=round(synth_s, 1), grpo_s=round(grpo_s, 1),
                          eval_s=round(time.perf_counter() - t, 1)))
    (args.run / f"long_{tag}.json").write_text(json.dumps(res))
    print(res["line"], res["times"])


if __name__ == "__main__":
    main()
