"""Plot GRPO reward curves (docs/grpo_curve.md): per-step reward with its noise, a smoothed trend, components, KL.

    .venv/bin/python docs/grpo_curve.py runs/grpo_s0/metrics.jsonl runs/grpo_s1/metrics.jsonl -o docs/grpo_curve.png
    .venv/bin/python docs/grpo_curve.py method=runs/a/metrics.jsonl control=runs/b/metrics.jsonl   # named runs
    .venv/bin/python docs/grpo_curve.py --pool s0=... s1=... s2=...    # + the seed-mean curve, pooled change

Per-step noise: a step's mean reward over its N episodes has standard error std / sqrt(N); the band around the
thin per-step line is +-1 of it, so a trend is only real where it clears the band. The thick line is a
centred moving average over `--window` steps. With `--pool` (runs of equal length, e.g. seeds of one config)
a black line shows the mean over runs, and the pooled change is printed with two errors: from the per-run
standard errors, and from the spread of the per-run changes across seeds (the honest one when seeds disagree
by more than their per-run noise). Prints, per run, a markdown table (per step: reward mean, std
over episodes, components, KL) and the first-k vs last-k step means with their standard errors.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def moving_average(xs: list[float], window: int) -> list[float]:
    """Centred moving average; the window shrinks at the ends (no padding values invented)."""
    h = window // 2
    return [sum(xs[max(0, i - h):i + h + 1]) / len(xs[max(0, i - h):i + h + 1]) for i in range(len(xs))]


def window_stats(rows: list[dict]) -> tuple[float, float]:
    """Mean reward over the rows' episodes and its standard error (episodes pooled, per-step stds combined)."""
    n = sum(r.get("episodes", 1) for r in rows)
    mean = sum(r["reward/mean"] * r.get("episodes", 1) for r in rows) / n
    # pooled second moment: within-step variance + between-step spread of the means
    ss = sum((r.get("episodes", 1) - 1) * r["reward/std"] ** 2 + r.get("episodes", 1) * (r["reward/mean"] - mean) ** 2
             for r in rows)
    return mean, math.sqrt(ss / max(n - 1, 1)) / math.sqrt(n)


def _named(arg: str) -> tuple[str, str]:
    if "=" in arg:
        name, path = arg.split("=", 1)
        return name, path
    return Path(arg).parent.name, arg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("metrics", nargs="+", help="metrics.jsonl files, optionally NAME=PATH")
    ap.add_argument("-o", "--out", default="docs/grpo_curve.png")
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--k", type=int, default=5, help="steps compared at the start and end")
    ap.add_argument("--pool", action="store_true", help="also plot the mean over runs and print the pooled change")
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    changes, all_means = [], []
    for arg in args.metrics:
        name, path = _named(arg)
        rows = read(path)
        steps = [r["step"] for r in rows]
        mean = [r["reward/mean"] for r in rows]
        sem = [r["reward/std"] / math.sqrt(max(r.get("episodes", 1), 1)) for r in rows]
        line, = axes[0].plot(steps, mean, lw=0.8, alpha=0.6, label=f"{name} per step")
        c = line.get_color()
        axes[0].fill_between(steps, [m - s for m, s in zip(mean, sem)], [m + s for m, s in zip(mean, sem)],
                             color=c, alpha=0.12)
        axes[0].plot(steps, moving_average(mean, args.window), color=c, lw=2.2, label=f"{name} {args.window}-step avg")
        for comp, ls in (("accuracy", "-"), ("reasoning", "--"), ("format", ":")):
            key = f"reward/{comp}/mean"
            if key in rows[0]:
                axes[1].plot(steps, moving_average([r[key] for r in rows], args.window), color=c, ls=ls,
                             label=f"{name} {comp}")
        axes[2].plot(steps, [r.get("kl", 0.0) for r in rows], color=c, label=name)
        print(f"\n{name} ({path})\n| step | reward mean | reward std | accuracy | reasoning | format | KL |\n"
              "|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['step']} | {r['reward/mean']:.3f} | {r['reward/std']:.3f} | {r['reward/accuracy/mean']:.3f} | "
                  f"{r['reward/reasoning/mean']:.3f} | {r.get('reward/format/mean', float('nan')):.3f} | "
                  f"{r.get('kl', 0.0):.4f} |")
        k = min(args.k, len(rows) // 2) or 1
        (m0, s0), (m1, s1) = window_stats(rows[:k]), window_stats(rows[-k:])
        changes.append((m1 - m0, math.hypot(s0, s1)))
        all_means.append(mean)
        print(f"steps 1-{k}: {m0:.3f} +- {s0:.3f}   steps {len(rows) - k + 1}-{len(rows)}: {m1:.3f} +- {s1:.3f}   "
              f"change {m1 - m0:+.3f} +- {math.hypot(s0, s1):.3f} (1 s.e.)")
    if args.pool and len(all_means) > 1:
        n_steps = min(len(m) for m in all_means)
        pooled = [sum(m[i] for m in all_means) / len(all_means) for i in range(n_steps)]
        axes[0].plot(range(1, n_steps + 1), moving_average(pooled, args.window), color="k", lw=3,
                     label=f"mean of {len(all_means)} runs, {args.window}-step avg")
        d = [c for c, _ in changes]
        n = len(d)
        mu = sum(d) / n
        se_runs = math.sqrt(sum(e * e for _, e in changes)) / n
        se_seeds = math.sqrt(sum((x - mu) ** 2 for x in d) / (n - 1) / n)
        print(f"\npooled over {n} runs: change {mu:+.3f} +- {se_runs:.3f} (per-run s.e.) +- {se_seeds:.3f} "
              f"(spread across runs)")
    axes[0].set(xlabel="GRPO step", ylabel="mean reward (band: +-1 s.e. of the step mean)", title="training reward")
    axes[1].set(xlabel="GRPO step", ylabel=f"component mean ({args.window}-step avg)", title="reward components")
    axes[2].set(xlabel="GRPO step", ylabel="k3 KL to the SFT model", title="KL")
    for ax, fs in zip(axes, (6, 5, 6)):
        ax.legend(fontsize=fs)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
