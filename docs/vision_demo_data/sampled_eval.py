"""Paired held-out evaluation of two model directories of one seed_sweep / demo run (session 18): greedy (one
episode per held-out sample) and sampled (G episodes per sample at the method's T 0.9, top-k 50). Both models
draw from the same counter-based uniforms (same --eval-seed: token i of rollout r of sample s takes the same
uniform), so the sampled comparison is paired down to the first token where the two policies part.

    python docs/vision_demo_data/sampled_eval.py RUN_DIR --before sft --after grpo --eval-seed 1234

RUN_DIR holds data/eval.json and the two model directories. Prints one line and writes
RUN_DIR/sampled_BEFORE_AFTER_evSEED.json (per-episode accuracy and reward of each model and mode).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--before", default="sft")
    ap.add_argument("--after", default="grpo")
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--eval-seed", type=int, default=1234)
    args = ap.parse_args()

    import numpy as np
    import torch
    import yaml

    from videocom_fast.data import load_samples
    from videocom_fast.demo import CONFIGS
    from videocom_fast.evaluate import _engine, run_episodes

    torch.set_num_threads(1)
    media = yaml.safe_load((CONFIGS / "sft_tiny.yaml").read_text())["media"]
    held = load_samples(args.run / "data" / "eval.json", kind="grpo")
    res = {}
    for name in (args.before, args.after):
        t = time.perf_counter()
        engine = _engine(args.run / name, media, max_rounds=5, max_new_tokens=64)
        res[name] = {}
        for mode, g, greedy in (("greedy", 1, True), ("sampled", args.G, False)):
            _, per, s = run_episodes(engine, held, num_generations=g, greedy=greedy, seed=args.eval_seed)
            res[name][mode] = dict(accuracy=s["accuracy_mean"], reward=s["reward_mean"],
                                   accuracy_per_episode=[p["accuracy"] if p else 0.0 for p in per],
                                   reward_per_episode=[p["total"] if p else 0.0 for p in per])
        res[name]["s"] = round(time.perf_counter() - t, 1)
    line = [str(args.run)]
    for mode in ("greedy", "sampled"):
        b, a = res[args.before][mode], res[args.after][mode]
        d = (np.reshape(a["reward_per_episode"], (len(held), -1)).mean(1)
             - np.reshape(b["reward_per_episode"], (len(held), -1)).mean(1))   # per held-out sample, paired
        se = d.std(ddof=1) / np.sqrt(len(d))
        res[mode + "_reward_change"] = dict(mean=float(d.mean()), se=float(se))
        line.append(f"{mode}: accuracy {b['accuracy']:.3f} -> {a['accuracy']:.3f}, reward {b['reward']:.3f} -> "
                    f"{a['reward']:.3f} ({d.mean():+.4f} +- {se:.4f})")
    print(" | ".join(line))
    out = args.run / f"sampled_{args.before}_{args.after}_ev{args.eval_seed}.json"
    out.write_text(json.dumps(res))


if __name__ == "__main__":
    main()
