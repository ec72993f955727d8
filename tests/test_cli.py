"""The `videocom-fast` command: every subcommand and flag has help, errors say what to fix, the same thing
has the same flag everywhere, results go to stdout and nothing else does, output directories are not
mixed, and the small commands work end to end on real files."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from videocom_fast.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]

SUBCOMMANDS = ["info", "synth", "overlay", "sft", "grpo", "rollout", "eval", "report", "bench", "demo"]


def test_every_subcommand_has_help(capsys):
    for cmd in SUBCOMMANDS:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: videocom-fast " + cmd in capsys.readouterr().out


def test_parser_lists_all_subcommands():
    text = build_parser().format_help()
    for cmd in SUBCOMMANDS:
        assert cmd in text


def test_info_prints_build_info(capsys):
    import platform

    import torch
    import transformers

    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpp_core"] is True and "decoders" in info
    assert (info["python"], info["torch"], info["transformers"]) == (platform.python_version(), torch.__version__,
                                                                     transformers.__version__)


def test_version(capsys):
    from videocom_fast import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"videocom-fast {__version__}"


def _subparsers(parser):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            yield from a.choices.items()


def test_every_flag_has_help():
    from videocom_fast.training.config import parse_cli  # noqa: F401 - the trainers' own parser too

    parser = build_parser()
    missing = [f"{name} {a.dest}" for name, sp in [("", parser), *_subparsers(parser)] for a in sp._actions
               if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert missing == []


def test_documented_command_lines_parse():
    """Every command line in the module's usage text (shown by --help) parses: it advertised
    `eval --greedy`, which errored."""
    import videocom_fast.cli as cli

    lines = [ln.split("#")[0].split() for ln in cli.__doc__.splitlines() if ln.strip().startswith("videocom-fast ")]
    assert len(lines) >= 10
    for words in lines:
        argv, skip = [], False
        for w in " ".join(words[1:]).replace("[", " ").replace("]", " ").split():
            if w == "|":            # "[--greedy | --sample]": the first alternative (the other: tests below)
                skip = True
                continue
            if not skip:
                w = w.split("|")[0]
                argv.append("x" if w.isupper() or w.endswith((".json", ".mp4")) or "/" in w else w)
            skip = False
        build_parser().parse_args(argv)   # raises SystemExit on an unknown flag


def test_eval_and_rollout_share_their_decoding_flags():
    p = build_parser()
    base = ["--model", "m", "--data", "d", "--out", "o"]
    for cmd, default_greedy in (("eval", True), ("rollout", False)):
        assert p.parse_args([cmd, *base]).greedy is default_greedy
        assert p.parse_args([cmd, *base, "--greedy"]).greedy is True
        assert p.parse_args([cmd, *base, "--sample"]).greedy is False
        args = p.parse_args([cmd, *base, "--num-generations", "3", "--max-new-tokens", "7", "--max-rounds", "2",
                             "--media", "main_nframes=4"])
        assert (args.num_generations, args.max_new_tokens, args.max_rounds, args.media) == (3, 7, 2, ["main_nframes=4"])


@pytest.mark.parametrize("argv", [["rollout", "--num-generations", "0"], ["eval", "--limit", "0"],
                                  ["eval", "--max-new-tokens", "-1"], ["synth", "x", "--num-samples", "0"]])
def test_non_positive_counts_are_refused_by_the_parser(argv, capsys):
    base = ["--model", "m", "--data", "d", "--out", "o"] if argv[0] in ("eval", "rollout") else []
    with pytest.raises(SystemExit) as e:
        main([*argv, *base])
    assert e.value.code == 2 and "positive integer" in capsys.readouterr().err


def test_bad_media_flag_names_the_key(tmp_path, capsys):
    rc = main(["eval", "--model", str(tmp_path), "--data", "d", "--out", str(tmp_path / "e.json"),
               "--media", "nframes=4"])
    assert rc == 2 and "media.nframes" in capsys.readouterr().err


def test_missing_model_dir_is_reported_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")     # before the fix: a Hub lookup (with retries when online)
    (tmp_path / "v.mp4").write_bytes(b"")
    sample = {"id": "s0", "video": "v.mp4", "answer": "A", "conversations": [
        {"from": "human", "value": "<video>\nQuestion: which?\nOptions: A. x, B. y"}, {"from": "gpt", "value": "A. x"}]}
    data = tmp_path / "eval.json"
    data.write_text(json.dumps([sample]))
    rc = main(["eval", "--model", str(tmp_path / "runs" / "grpo"), "--data", str(data), "--out", str(tmp_path / "e.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "runs/grpo" in err and "does not exist" in err


def test_non_empty_output_dir_is_refused_unless_overwrite_or_resume(tmp_path, capsys):
    from videocom_fast.cli_io import prepare_output_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    rc = main(["sft", "--config", "sft_tiny", f"output_dir={out}", f"data={tmp_path / 'none.json'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "not empty" in err and "--overwrite" in err and "--resume" in err
    assert prepare_output_dir(out, resume=True) == out and (out / "metrics.jsonl").exists()
    prepare_output_dir(out, overwrite=True)
    assert out.is_dir() and not any(out.iterdir())
    rc = main(["rollout", "--model", "m", "--data", "d", "--out", str(tmp_path)])   # holds run/
    assert rc == 2 and "not empty" in capsys.readouterr().err


def test_overwrite_refuses_the_working_directory(tmp_path, monkeypatch):
    from videocom_fast.cli_io import prepare_output_dir

    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="refusing"):
        prepare_output_dir(".", overwrite=True)
    assert (tmp_path / "keep.txt").exists()


def test_results_only_on_stdout_moves_library_prints_to_stderr(tmp_path):
    """DeepSpeed's logger holds the real sys.stdout and native code writes to descriptor 1: both must land
    on stderr while a command runs, and only the result on stdout."""
    code = ("import os, sys\n"
            "from videocom_fast.cli_io import results_only_on_stdout\n"
            "held = sys.stdout\n"
            "with results_only_on_stdout():\n"
            "    print('log line')\n"
            "    held.write('held stream\\n'); held.flush()\n"
            "    os.write(1, b'native write\\n')\n"
            "print('{\"result\": 1}')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"result": 1}
    assert all(s in res.stderr for s in ("log line", "held stream", "native write"))


def test_missing_config_is_a_clear_error(tmp_path, capsys):
    rc = main(["sft", "--config", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.yaml" in err


def test_bad_override_is_a_clear_error(capsys):
    rc = main(["grpo", "no_such_key=3"])
    err = capsys.readouterr().err
    assert rc == 2 and "no_such_key" in err


def test_report_of_missing_run_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_synth_then_overlay_via_console_script(tmp_path):
    exe = [sys.executable, "-m", "videocom_fast.cli"]
    out = subprocess.run([*exe, "synth", str(tmp_path / "d"), "--num-samples", "2", "--seed", "3"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    paths = json.loads(out.stdout)       # stdout: the result only
    samples = json.loads(open(paths["grpo"]).read())
    assert len(samples) >= 1 and all("valid_segments" in s for s in samples)
    # it says what it does, and ends with the split sizes
    assert "writing 2 samples" in out.stderr and "1 training samples" in out.stderr.splitlines()[-1]
    assert (paths["train_samples"], paths["eval_samples"], paths["videos"]) == (1, 1, 2)
    again = subprocess.run([*exe, "synth", str(tmp_path / "d"), "--num-samples", "2"], capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    video = str(tmp_path / "d" / "videos" / "sample_0000.mp4")
    res = subprocess.run([*exe, "overlay", video, str(tmp_path / "o.mp4")], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    from videocom_fast.media import open_video
    a, b = open_video(video), open_video(tmp_path / "o.mp4")
    assert (a.num_frames, a.fps, a.height, a.width) == (b.num_frames, b.fps, b.height, b.width)


def test_progress_bars_only_on_a_terminal(monkeypatch):
    from types import SimpleNamespace

    from videocom_fast.training.sft import _progress

    cfg, dist = SimpleNamespace(progress=True), SimpleNamespace(is_main=True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert _progress(cfg, dist, 10, 0) is None        # a redirected log: no carriage-return redraws
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = _progress(cfg, dist, 10, 0)
    assert bar is not None
    bar.close()
