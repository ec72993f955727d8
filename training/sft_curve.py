"""Record an SFT run's learning curve for the README: a PNG plot and a markdown table.

    python -m videocom_fast.training.sft_curve RUN_DIR --out docs/sft_curve.png
Reads RUN_DIR/metrics.jsonl (written by training.sft); prints a markdown table: the loss every ~10% of the
run plus every step that has an eval loss. (Greedy-episode figures come from training/sft_eval.py.)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .metrics import read_metrics


def plot(run_dir, out_png) -> list[dict]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(Path(run_dir) / "metrics.jsonl")
    train = [r for r in recs if "loss" in r]
    ev = [r for r in recs if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (per step)")
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("token cross-entropy (nats)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("SFT of the tiny Qwen2.5-VL on synthesized manipulation chains", fontsize=10)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return recs


def table(recs) -> str:
    train = [r for r in recs if "loss" in r]
    n = len(train)
    picks = sorted({0, n - 1, *[int(n * k / 10) for k in range(1, 10)],
                    *[i for i, r in enumerate(train) if "eval_loss" in r]})
    lines = ["| step | train loss | eval loss | lr | tokens/s | visual tokens/s |", "|---|---|---|---|---|---|"]
    for i in picks:
        r = train[i]
        ev = f"{r['eval_loss']:.3f}" if "eval_loss" in r else ""
        lines.append(f"| {r['step']} | {r['loss']:.3f} | {ev} | {r['lr']:.2e} | {r['tokens_per_s']:.0f} | "
                     f"{r['visual_tokens_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--out", default="docs/sft_curve.png")
    args = ap.parse_args(argv)
    print(table(plot(args.run_dir, args.out)))


if __name__ == "__main__":
    main()
