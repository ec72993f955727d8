"""Paired held-out evaluation of two model directories of one seed_sweep / demo run (session 18): greedy (one
episode per held-out sample) and sampled (G episodes per sample at the method's T 0.9, top-k 50). Both models
draw from the same counter-based uniforms (same --eval-seed: token i of rollout r of sample s takes the same
uniform), so the sampled comparison is paired down to the first token where the two policies part.

    python docs/vision_demo_data/sampled_eval.py RUN_DIR --before sft --after grpo --eval-seed 1234

RUN_DIR holds data/eval.json (`--data long_data`: long_data/eval.json, grpo_long.py's) and the two model
directories. Prints one line and writes RUN_DIR/sampled_BEFORE_AFTER[_DATA]_evSEED.json (per-episode accuracy
and reward of each model and mode).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def paired_change(before, after, n: int) -> tuple[float, float]:
    """Mean over n held-out samples of (after - before), each sample's episodes averaged, and its SE."""
    import numpy as np

    d = np.reshape(after, (n, -1)).mean(1) - np.reshape(before, (n, -1)).mean(1)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(n))


def model_settings(run: Path, *names: str) -> tuple[dict, dict]:
    """(media, generation limits) the models' trainers wrote (media.json); refuses models that disagree."""
    from videocom_fast.contract import read_contract

    docs = {n: read_contract(run / n) for n in names}
    for n, doc in docs.items():
        if doc is None or not doc.get("generation"):
            raise ValueError(f"{run / n}: no media.json with media and generation limits")
    settings = {n: (d["media"], {k: d["generation"].get(k) for k in ("max_new_tokens", "max_rounds")})
                for n, d in docs.items()}
    (n0, s0), *rest = settings.items()
    for n, s in rest:
        if s != s0:
            raise ValueError(f"media / generation limits differ: {run / n0} has {s0}, {run / n} has {s}")
    return s0


def paired_eval(run: Path, before: str, after: str, held: list, G: int = 8, eval_seed: int = 1234) -> dict:
    """Greedy and sampled episodes of run/before and run/after on `held`; the per-sample paired changes."""
    import torch

    from videocom_fast.evaluate import _engine, run_episodes

    torch.set_num_threads(1)
    media, gen = model_settings(run, before, after)
    res = {}
    for name in (before, after):
        t = time.perf_counter()
        engine = _engine(run / name, media, **gen)
        res[name] = {}
        for mode, g, greedy in (("greedy", 1, True), ("sampled", G, False)):
            _, per, s = run_episodes(engine, held, num_generations=g, greedy=greedy, seed=eval_seed)
            res[name][mode] = dict(accuracy=s["accuracy_mean"], reward=s["reward_mean"],
                                   accuracy_per_episode=[p["accuracy"] if p else 0.0 for p in per],
                                   reward_per_episode=[p["total"] if p else 0.0 for p in per])
        res[name]["s"] = round(time.perf_counter() - t, 1)
    line = [str(run)]
    for mode in ("greedy", "sampled"):
        b, a = res[before][mode], res[after][mode]
        mean, se = paired_change(b["reward_per_episode"], a["reward_per_episode"], len(held))
        res[mode + "_reward_change"] = dict(mean=mean, se=se)
        line.append(f"{mode}: accuracy {b['accuracy']:.3f} -> {a['accuracy']:.3f}, reward {b['reward']:.3f} -> "
                    f"{a['reward']:.3f} ({mean:+.4f} +- {se:.4f})")
    res["line"] = " | ".join(line)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--before", default="sft")
    ap.add_argument("--after", default="grpo")
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--eval-seed", type=int, default=1234)
    ap.add_argument("--data", default="data", help="the folder under RUN_DIR whose eval.json is evaluated")
    args = ap.parse_args()

    from videocom_fast.data import load_samples

    held = load_samples(args.run / args.data / "eval.json", kind="grpo")
    res = paired_eval(args.run, args.before, args.after, held, args.G, args.eval_seed)
    print(res["line"])
    tag = "" if args.data == "data" else f"_{args.data}"
    out = args.run / f"sampled_{args.before}_{args.after}{tag}_ev{args.eval_seed}.json"
    out.write_text(json.dumps(res))


if __name__ == "__main__":
    main()
