"""`videocom-fast`: one entry point for data, training, rollouts, evaluation, reports and benchmarks.

    videocom-fast synth OUT_DIR [--num-samples 64] [--seed 0] [--codec h264|vp9]
    videocom-fast overlay IN.mp4 OUT.mp4
    videocom-fast sft   --config configs/sft_tiny.yaml  [key=value ...]
    videocom-fast grpo  --config configs/grpo_tiny.yaml [key=value ...]
    videocom-fast rollout --model DIR --data grpo.json --out RUN_DIR [--num-generations 8] [--greedy]
    videocom-fast eval    --model DIR --data eval.json --out RUN_DIR/eval.json [--greedy]
    videocom-fast report RUN_DIR
    videocom-fast bench [pytest args]      # the pytest-benchmark suites, then the ratio table
    videocom-fast demo  [--out runs/demo]  # synth -> tiny model -> SFT -> RA-GRPO -> rollouts -> report
    videocom-fast info                     # what this installation can use (build_info)
Training commands take a YAML config plus `key=value` overrides (dotted keys for nested fields).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_info(args) -> int:
    import videocom_fast

    print(json.dumps(videocom_fast.build_info(), indent=2))
    return 0


def _cmd_synth(args) -> int:
    from videocom_fast.data import synthesize

    out = synthesize(args.out_dir, num_samples=args.num_samples, seed=args.seed, codec=args.codec)
    print(json.dumps({k: [str(x) for x in v] if isinstance(v, (list, tuple)) else str(v)
                      for k, v in (out or {}).items()}, indent=2))
    return 0


def _cmd_overlay(args) -> int:
    from videocom_fast.media.overlay import overlay_video

    overlay_video(args.input, args.output, codec=args.codec)
    print(f"wrote {args.output}")
    return 0


def _cmd_train(which: str):
    def run(args) -> int:
        import importlib

        mod = importlib.import_module(f"videocom_fast.training.{which}")
        argv = (["--config", args.config] if args.config else []) + list(args.overrides)
        if args.resume:
            argv.append("--resume")
        result = mod.main(argv)
        return result if isinstance(result, int) else 0
    return run


def _cmd_rollout(args) -> int:
    from videocom_fast.evaluate import rollout_to_dir

    summary = rollout_to_dir(args.model, args.data, args.out, num_generations=args.num_generations,
                             greedy=args.greedy, limit=args.limit, seed=args.seed)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_eval(args) -> int:
    from videocom_fast.evaluate import evaluate

    summary = evaluate(args.model, args.data, args.out, greedy=not args.sample, limit=args.limit, seed=args.seed)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (list, dict))}, indent=2))
    return 0


def _cmd_report(args) -> int:
    from videocom_fast.report import write_report

    print(f"report: {write_report(args.run_dir, args.out)}")
    return 0


def _cmd_bench(args) -> int:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", str(root / "bench"), "-o", "python_files=bench_*.py", "--benchmark-only",
           f"--benchmark-json={out}", *args.pytest_args]
    rc = subprocess.call(cmd, cwd=root)
    if out.exists():
        from videocom_fast.benchtable import print_table
        print_table(out)
    return rc


def _cmd_demo(args) -> int:
    from videocom_fast.demo import run_demo

    run_demo(args.out, fast=args.fast)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="videocom-fast", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("info", help="what this installation can use")
    s.set_defaults(fn=_cmd_info)

    s = sub.add_parser("synth", help="write the synthetic Video-CoM dataset")
    s.add_argument("out_dir")
    s.add_argument("--num-samples", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--codec", choices=["h264", "vp9"], default="h264")
    s.set_defaults(fn=_cmd_synth)

    s = sub.add_parser("overlay", help="burn Segment-s / Frame-n labels into a video")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--codec", default="h264")
    s.set_defaults(fn=_cmd_overlay)

    for which, helptext in (("sft", "supervised fine-tuning on manipulation chains"),
                            ("grpo", "RA-GRPO on the rollout engine's trajectories")):
        s = sub.add_parser(which, help=helptext)
        s.add_argument("--config", help="YAML config file")
        s.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
        s.add_argument("overrides", nargs="*", help="key=value overrides")
        s.set_defaults(fn=_cmd_train(which))

    for name, fn in (("rollout", _cmd_rollout), ("eval", _cmd_eval)):
        s = sub.add_parser(name, help="run episodes with the rollout engine" if name == "rollout"
                           else "accuracy and manipulation precision of a checkpoint")
        s.add_argument("--model", required=True, help="checkpoint directory (from_pretrained)")
        s.add_argument("--data", required=True, help="GRPO/eval JSON file")
        s.add_argument("--out", required=True)
        s.add_argument("--limit", type=int, default=None, help="first N samples only")
        s.add_argument("--seed", type=int, default=0)
        if name == "rollout":
            s.add_argument("--num-generations", type=int, default=8)
            s.add_argument("--greedy", action="store_true")
        else:
            s.add_argument("--sample", action="store_true", help="sample (temperature 0.9) instead of greedy")
        s.set_defaults(fn=fn)

    s = sub.add_parser("report", help="write a self-contained HTML report of a run directory")
    s.add_argument("run_dir")
    s.add_argument("--out", default=None)
    s.set_defaults(fn=_cmd_report)

    s = sub.add_parser("bench", help="run the benchmark suites and print the ratio table")
    s.add_argument("--json", default="runs/bench/bench.json")
    s.add_argument("pytest_args", nargs="*")
    s.set_defaults(fn=_cmd_bench)

    s = sub.add_parser("demo", help="the whole pipeline on the embedded default, on CPU, in minutes")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--fast", action="store_true", help="smallest settings (used by the tests)")
    s.set_defaults(fn=_cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"videocom-fast {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
