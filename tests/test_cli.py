"""The `videocom-fast` command: every subcommand has --help, errors say what to fix, and the small
commands work end to end on real files."""
import json
import subprocess
import sys

import pytest

from videocom_fast.cli import build_parser, main

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
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpp_core"] is True and "decoders" in info


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
    paths = json.loads(out.stdout)
    samples = json.loads(open(paths["grpo"]).read())
    assert len(samples) >= 1 and all("valid_segments" in s for s in samples)
    video = paths["videos"][0]
    res = subprocess.run([*exe, "overlay", video, str(tmp_path / "o.mp4")], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    from videocom_fast.media import open_video
    a, b = open_video(video), open_video(tmp_path / "o.mp4")
    assert (a.num_frames, a.fps, a.height, a.width) == (b.num_frames, b.fps, b.height, b.width)
