"""`make gpu-check` without a GPU: the dry run prints its plan, exits 0 and touches nothing; the benchmark half
runs end to end on the tiny model on the CPU (the same code the GPU runs, minus the CUDA columns).

The GPU itself is not exercised here: the steps' commands are the ones the README documents, and the
benchmark's CUDA-only parts (events, sync debug mode, peak memory) only run on a GPU.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _gpu_check(*args, tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")   # the dry run on any machine, GPU or not
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "report.json"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [(), ("--dry-run",)])
def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path, args):
    site_before = (ROOT / ".gpu-site").exists()
    run = _gpu_check(*args, tmp_path=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "dry run" in out and "Nothing was run" in out
    for step in ("install carried wheels", "VIDEOCOM_CUDA=ON", "pytest -m gpu", "7B-shaped"):
        assert step in out, f"plan misses {step!r}:\n{out}"
    assert str(tmp_path / "report.json") in out
    assert not (tmp_path / "report.json").exists()
    assert (ROOT / ".gpu-site").exists() == site_before


def test_make_gpu_check_target_runs_the_driver():
    run = subprocess.run(["make", "-n", "gpu-check", "GPU_PY=python-x"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert "python-x bench/gpu_check.py" in run.stdout


def test_7b_config_has_the_released_shapes():
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check_bench import config_7b

    from videocom_fast.models import build_tokenizer
    tok = build_tokenizer()
    cfg = config_7b(tok)
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (3584, 28, 28, 4, 18944, 152064)
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size) == (32, 1280, text.hidden_size)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    # ~8.3 B parameters, counted from the shapes without allocating them
    emb = 2 * text.vocab_size * text.hidden_size
    layer = (text.hidden_size * (text.hidden_size + 2 * head_dim * text.num_key_value_heads) * 2
             + 3 * text.hidden_size * text.intermediate_size)
    assert 7.0e9 < emb + text.num_hidden_layers * layer < 8.5e9


@pytest.mark.slow
def test_benchmark_half_runs_on_the_tiny_model_on_cpu(capsys):
    if importlib.util.find_spec("av") is None:
        pytest.skip("PyAV not installed: the workload's videos cannot be decoded")
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check
    from gpu_check_bench import bench_7b

    rows = bench_7b("tiny", "cpu", media="small")
    assert rows["shape"] == "tiny" and rows["device"] == "cpu"
    for name in ("engine", "engine_graphs", "naive", "lockstep"):
        r = rows["systems"][name]
        assert "error" not in r, r
        assert r["generated_tokens"] > 0 and r["gen_tokens_per_s"] > 0
        assert r["steps"] > 0 and r["host_ms_per_step"] > 0
        assert r["gpu_ms_per_step"] is None and r["syncs_per_step"] is None and r["peak_gib"] is None
    # the engine shares prompts and never re-prefills: fewer model steps than the naive loop's
    assert rows["systems"]["engine"]["steps"] < rows["systems"]["naive"]["steps"]
    # graphed steps are counted though no hook runs in a replay (the count itself follows the workers' timing)
    assert rows["systems"]["engine_graphs"]["steps"] > rows["systems"]["engine"]["steps"] / 2
    gpu_check.print_table({"machine": {}, "commit": "test", "steps": {"bench": {"status": "ok", "rows": rows}}})
    table = capsys.readouterr().out
    names = ("engine", "engine_graphs", "naive", "lockstep", "gen tok/s", "syncs/step",
             "CUDA graphs: host ms/step")
    assert all(name in table for name in names)
