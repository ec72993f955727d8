"""The table of docs/vision_demo_grpo_long.md from grpo_long.py's outputs: per seed, the paired held-out changes
(GRPO minus SFT, per held-out sample, then mean +- standard error over samples), and across seeds.

    python docs/vision_demo_data/grpo_long_table.py RUN_DIR/long_lr3e-05_n100_p8.json ... [--out summary.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from sampled_eval import paired_change  # noqa: E402


def paired(res: dict, mode: str, metric: str) -> tuple[float, float, float, float]:
    """(before, after, mean change, its SE) of `metric` per held-out sample (its episodes averaged)."""
    after = next(k for k in res if k.startswith("grpo_long_"))
    b, a = (res[name][mode][f"{metric}_per_episode"] for name in ("sft", after))
    return (float(np.mean(b)), float(np.mean(a)),
            *paired_change(b, a, n=len(res["sft"]["greedy"]["reward_per_episode"])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows, summary = [], {}
    for path in args.results:
        res = json.loads(path.read_text())
        seed = res["args"]["seed"]
        row = dict(seed=seed)
        for mode in ("greedy", "sampled"):
            for metric in ("accuracy", "reward"):
                row[f"{mode}_{metric}"] = paired(res, mode, metric)
        tr = res["train_rewards"]
        row["train_first10"], row["train_last10"] = float(np.mean(tr[:10])), float(np.mean(tr[-10:]))
        row.update(train_rewards=[round(x, 4) for x in tr], args=res["args"], times=res["times"])
        rows.append(row)
        summary[f"seed{seed}"] = row
    head = ("| seed | greedy acc SFT -> GRPO (change +- SE) | greedy reward change | sampled acc SFT -> GRPO "
            "(change +- SE) | sampled reward change | train reward steps 1-10 -> last 10 |")
    print(head + "\n|" + "---|" * 6)
    for r in rows:
        cells = [str(r["seed"])]
        for mode in ("greedy", "sampled"):
            b, a, d, se = r[f"{mode}_accuracy"]
            cells.append(f"{b:.3f} -> {a:.3f} ({d:+.3f} +- {se:.3f})")
            b, a, d, se = r[f"{mode}_reward"]
            cells.append(f"{b:.3f} -> {a:.3f} ({d:+.3f} +- {se:.3f})")
        cells.append(f"{r['train_first10']:.3f} -> {r['train_last10']:.3f}")
        print("| " + " | ".join(cells) + " |")
    for mode in ("greedy", "sampled"):
        for metric in ("accuracy", "reward"):
            d = np.array([r[f"{mode}_{metric}"][2] for r in rows])
            se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
            ups = int((d > 0).sum())
            summary[f"{mode}_{metric}_change"] = dict(mean=float(d.mean()), se_across_seeds=float(se), up=ups,
                                                     seeds=len(d))
            print(f"{mode} {metric}: mean change {d.mean():+.4f} +- {se:.4f} (across seeds), up in {ups} of "
                  f"{len(d)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
