"""`videocom-fast`: one entry point for data, training, rollouts, evaluation, reports and benchmarks.

    videocom-fast synth OUT_DIR [--num-samples 64] [--seed 0] [--codec h264|vp9] [--config sft_tiny]
    videocom-fast overlay IN.mp4 OUT.mp4
    videocom-fast sft   --config sft_tiny  [key=value ...] [--resume | --overwrite]
    videocom-fast grpo  --config grpo_tiny [key=value ...] [--resume | --overwrite]
    videocom-fast rollout --model DIR --data grpo.json --out RUN_DIR [--num-generations 8] [--greedy | --sample]
    videocom-fast eval    --model DIR --data eval.json --out RUN_DIR/eval.json [--greedy | --sample]
    videocom-fast report RUN_DIR
    videocom-fast bench [pytest args]      # the pytest-benchmark suites, then the ratio table
    videocom-fast demo  [--out runs/demo] [--seed 0]  # synth -> warm-up -> SFT -> ablation -> GRPO -> report
    videocom-fast info                     # versions and what this installation can use (build_info)
Training commands take a YAML config (a file, or a packaged one by name: sft_tiny, grpo_tiny) plus
`key=value` overrides (dotted keys for nested fields). Media settings and generation limits travel with
data and models (media.json, see videocom_fast/contract.py): grpo, rollout and eval read them from the
model directory unless given explicitly. Results go to stdout, logs and warnings to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _media_overrides(items) -> dict:
    """["image_max_pixels=12544", ...] -> {"image_max_pixels": 12544} (checked by contract.check_media)."""
    from videocom_fast.contract import check_media

    out = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"--media: expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = int(float(raw))
        except ValueError:
            raise ValueError(f"--media {key}: expected an integer, got {raw!r}") from None
    return check_media(out, "--media")


def _cmd_info(args) -> int:
    import platform

    import videocom_fast

    info = {"python": platform.python_version(), **videocom_fast.build_info()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    print(json.dumps(info, indent=2))
    return 0


def _cmd_synth(args) -> int:
    import dataclasses

    from videocom_fast.cli_io import prepare_output_dir
    from videocom_fast.contract import media_fields, note
    from videocom_fast.data import synthesize
    from videocom_fast.env import MediaConfig

    media = {}
    if args.config:
        from videocom_fast.training.config import find_config, read_yaml
        path = find_config(args.config)
        media = _checked(read_yaml(path).get("media") or {}, f"config {str(path)!r}")
    media = {**media_fields(), **media, **_media_overrides(args.media)}
    prepare_output_dir(args.out_dir, overwrite=args.overwrite, what="OUT_DIR")
    note(f"synth: writing {args.num_samples} samples ({args.codec}, seed {args.seed}) into {args.out_dir}; "
         f"zoom boxes for images resized within image_min_pixels={media['image_min_pixels']}, "
         f"image_max_pixels={media['image_max_pixels']}")
    out = synthesize(args.out_dir, num_samples=args.num_samples, seed=args.seed, codec=args.codec,
                     media_config=MediaConfig(**media))
    sizes = {name: len(json.loads(Path(out[name]).read_text())) for name in ("sft", "grpo", "eval")}
    print(json.dumps({"out_dir": out["out_dir"], "sft": out["sft"], "grpo": out["grpo"], "eval": out["eval"],
                      "contract": str(Path(out["out_dir"]) / "media.json"), "videos": len(out["videos"]),
                      "train_samples": sizes["sft"], "eval_samples": sizes["eval"],
                      "media": dataclasses.asdict(MediaConfig(**media))}, indent=2))
    note(f"synth: done: {sizes['sft']} training samples (sft.json, grpo.json), {sizes['eval']} held out (eval.json)")
    return 0


def _checked(media, where: str) -> dict:
    from videocom_fast.contract import check_media
    return check_media(media, where)


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
        argv += ["--resume"] if args.resume else []
        argv += ["--overwrite"] if args.overwrite else []
        result = mod.main(argv)
        return result if isinstance(result, int) else 0
    return run


def _generation_args(args) -> dict:
    return dict(media=_media_overrides(args.media) or None, max_new_tokens=args.max_new_tokens,
                max_rounds=args.max_rounds, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def _cmd_rollout(args) -> int:
    from videocom_fast.cli_io import prepare_output_dir, results_only_on_stdout
    from videocom_fast.evaluate import rollout_to_dir

    kw = _generation_args(args)
    prepare_output_dir(args.out, overwrite=args.overwrite, what="--out")
    with results_only_on_stdout():
        summary = rollout_to_dir(args.model, args.data, args.out, num_generations=args.num_generations,
                                 greedy=args.greedy, limit=args.limit, seed=args.seed, **kw)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (list, dict))}, indent=2))
    return 0


def _cmd_eval(args) -> int:
    from videocom_fast.cli_io import results_only_on_stdout
    from videocom_fast.evaluate import evaluate

    kw = _generation_args(args)
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"--out: {args.out!r} exists; pass --overwrite to replace it")
    with results_only_on_stdout():
        summary = evaluate(args.model, args.data, args.out, greedy=args.greedy, num_generations=args.num_generations,
                           limit=args.limit, seed=args.seed, **kw)
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
    from videocom_fast.cli_io import prepare_output_dir, results_only_on_stdout
    from videocom_fast.demo import run_demo

    prepare_output_dir(args.out, overwrite=args.overwrite, what="--out")
    with results_only_on_stdout():   # stages, library warnings and the closing lines: stderr
        summary = run_demo(args.out, fast=args.fast, seed=args.seed)
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from videocom_fast import __version__

    p = argparse.ArgumentParser(prog="videocom-fast", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--version", action="version", version=f"videocom-fast {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("info", help="versions (Python, torch, transformers) and what this installation can use")
    s.set_defaults(fn=_cmd_info)

    s = sub.add_parser("synth", help="write the synthetic Video-CoM dataset (and its media.json)")
    s.add_argument("out_dir", help="directory for videos/, frames/, sft.json, grpo.json, eval.json, media.json")
    s.add_argument("--num-samples", type=_positive_int, default=64, help="samples in all (default 64)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--codec", choices=["h264", "vp9"], default="h264", help="video codec (default h264)")
    s.add_argument("--config", default=None,
                   help="take the media settings from this training config (file or packaged name, e.g. "
                        "sft_tiny): the SFT zoom boxes are then in the coordinates that config trains with")
    s.add_argument("--media", action="append", metavar="KEY=VALUE",
                   help="one media setting, e.g. image_max_pixels=12544 (repeatable; overrides --config)")
    s.add_argument("--overwrite", action="store_true", help="empty a non-empty OUT_DIR first")
    s.set_defaults(fn=_cmd_synth)

    s = sub.add_parser("overlay", help="burn Segment-s / Frame-n labels into a video")
    s.add_argument("input", help="input video")
    s.add_argument("output", help="output video")
    s.add_argument("--codec", default="h264", help="output codec (default h264)")
    s.set_defaults(fn=_cmd_overlay)

    for which, helptext in (("sft", "supervised fine-tuning on manipulation chains"),
                            ("grpo", "RA-GRPO on the rollout engine's trajectories")):
        s = sub.add_parser(which, help=helptext)
        s.add_argument("--config", help="YAML config: a file, or a packaged config by name "
                                        f"({which}_tiny) usable from any directory")
        s.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
        s.add_argument("--overwrite", action="store_true", help="empty a non-empty output_dir first")
        s.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys for nested fields)")
        s.set_defaults(fn=_cmd_train(which))

    for name, fn in (("rollout", _cmd_rollout), ("eval", _cmd_eval)):
        s = sub.add_parser(name, help="G episodes per sample with the rollout engine (sampled by default)"
                           if name == "rollout" else "accuracy and manipulation precision of a checkpoint "
                           "(greedy by default)")
        s.add_argument("--model", required=True, help="model directory (an SFT/GRPO output_dir); its media.json "
                                                      "gives the media settings and generation limits")
        s.add_argument("--data", required=True, help="GRPO/eval JSON file")
        s.add_argument("--out", required=True, help="output directory" if name == "rollout"
                       else "summary JSON (trajectories are written beside it)")
        s.add_argument("--overwrite", action="store_true",
                       help="replace an existing --out" if name == "eval" else "empty a non-empty --out first")
        s.add_argument("--limit", type=_positive_int, default=None, help="first N samples only")
        s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
        mode = s.add_mutually_exclusive_group()
        mode.add_argument("--greedy", dest="greedy", action="store_true", default=name == "eval",
                          help="greedy decoding" + (" (the default)" if name == "eval" else ""))
        mode.add_argument("--sample", dest="greedy", action="store_false",
                          help="sample (the recorded temperature/top-k/top-p)" + (" (the default)" if name ==
                                                                                    "rollout" else ""))
        s.add_argument("--num-generations", type=_positive_int, default=8 if name == "rollout" else 1,
                       help="episodes per sample when sampling (default %(default)s)")
        s.add_argument("--media", action="append", metavar="KEY=VALUE",
                       help="override one media setting of the model's media.json (repeatable)")
        s.add_argument("--max-new-tokens", type=_positive_int, default=None,
                       help="tokens per round (default: the model's media.json, else 512)")
        s.add_argument("--max-rounds", type=_positive_int, default=None,
                       help="rounds per episode (default: the model's media.json, else 5)")
        s.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: recorded, "
                                                                       "else 0.9)")
        s.add_argument("--top-k", type=int, default=None, help="top-k when sampling (default: recorded, else 50)")
        s.add_argument("--top-p", type=float, default=None, help="top-p when sampling (default: recorded, else 1.0)")
        s.set_defaults(fn=fn)

    s = sub.add_parser("report", help="write a self-contained HTML report of a run directory")
    s.add_argument("run_dir", help="directory holding eval*.json / trajectories*.jsonl / metrics")
    s.add_argument("--out", default=None, help="HTML file (default RUN_DIR/report.html)")
    s.set_defaults(fn=_cmd_report)

    s = sub.add_parser("bench", help="run the benchmark suites and print the ratio table")
    s.add_argument("--json", default="runs/bench/bench.json", help="where pytest-benchmark writes its JSON")
    s.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    s.set_defaults(fn=_cmd_bench)

    s = sub.add_parser("demo", help="the whole pipeline on the embedded default, on CPU, in minutes")
    s.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    s.add_argument("--fast", action="store_true", help="smallest settings (used by the tests)")
    s.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")
    s.add_argument("--overwrite", action="store_true", help="empty a non-empty --out first")
    s.set_defaults(fn=_cmd_demo)
    return p


def main(argv=None) -> int:
    import os

    args = build_parser().parse_args(argv)
    if not sys.stderr.isatty():   # no carriage-return redraws in a log file (transformers/hub bars read this)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"videocom-fast {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
