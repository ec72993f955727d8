"""Plot GRPO reward curves (docs/grpo_curve.md): mean reward per step, its per-step spread, and components.

    .venv/bin/python docs/grpo_curve.py runs/grpo_s0/metrics.jsonl runs/grpo_s1/metrics.jsonl -o docs/grpo_curve.png
Prints a markdown table (per step: reward mean +- std over the step's episodes, accuracy, reasoning, KL).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("metrics", nargs="+")
    ap.add_argument("-o", "--out", default="docs/grpo_curve.png")
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for path in args.metrics:
        rows = read(path)
        name = Path(path).parent.name
        steps = [r["step"] for r in rows]
        mean = [r["reward/mean"] for r in rows]
        sd = [r["reward/std"] for r in rows]
        line, = axes[0].plot(steps, mean, marker="o", ms=3, label=name)
        axes[0].fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                             color=line.get_color(), alpha=0.12)
        axes[1].plot(steps, [r["reward/accuracy/mean"] for r in rows], color=line.get_color(), label=f"{name} accuracy")
        axes[1].plot(steps, [r["reward/reasoning/mean"] for r in rows], color=line.get_color(), ls="--",
                     label=f"{name} reasoning")
        print(f"\n{name}\n| step | reward mean | reward std | accuracy | reasoning | KL |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['step']} | {r['reward/mean']:.3f} | {r['reward/std']:.3f} | {r['reward/accuracy/mean']:.3f} | "
                  f"{r['reward/reasoning/mean']:.3f} | {r.get('kl', 0.0):.4f} |")
    axes[0].set(xlabel="GRPO step", ylabel="mean reward (band: +-1 std over episodes)", title="reward")
    axes[1].set(xlabel="GRPO step", ylabel="component mean", title="components")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
