"""`make gpu-check`: one command for a fresh GPU machine (budget: 8 minutes on one H100).

    make gpu-carry        # on the development machine: wheels + pre-made media into .gpu-carry/ (ignored)
    make gpu-check        # on the GPU machine; or: python bench/gpu_check.py [--dry-run] [--out PATH]

What travels (the lent GPU machines: torch 2.11, transformers 5.17, no PyAV/DALI, nothing fetchable; the
working tree plus carried ignored paths, 64 MiB in all): `--prepare-carry` (make gpu-carry) downloads the
wheels with pip (PyAV's abi3 wheel for CPython 3.12, 36 MB; transformers 5.23, 13 MB: the version this
package is developed against; Pillow, 7 MB), writes an H.264 file with B-frames (tests/test_gpu_media.py) and the
synthesized rollout dataset (tests/test_gpu_rollout.py and the benchmark), and checks the total against
the budget. DALI's 199 MB wheel cannot travel: its test skips there with that reason.

Steps, each a subprocess with its own time limit, in this order:
1. carried wheels: `pip install --no-index --no-deps --no-cache-dir --target .gpu-site` of every wheel in
   .gpu-carry/wheels (PyAV, transformers 5.23); nothing is fetched and no pip cache is written. A carried
   transformers that does not import next to the machine's own huggingface_hub (5.23 checks its version at
   import) is removed again and the machine's transformers is used: the run says which.
2. build: `VIDEOCOM_CUDA=ON python setup.py build_ext --inplace` against the machine's torch (the extension
   is torch-free; setup.py builds for the visible GPU's architecture only).
3. `pytest -m gpu`: kernels vs the C++ kernel, DALI vs PyAV, engine greedy GPU vs CPU, sampling vs training
   log-probs (tests/test_gpu_*.py).
4. rollout benchmark (`--bench-only`, a child process): a Qwen2.5-VL-7B-SHAPED model (the released config's
   sizes, random bf16 weights allocated on the GPU; no checkpoint), the tiny tokenizer (ids beyond its 640
   decode to nothing), 2 prompts x G=4, 3 rounds of <= 32 new tokens at the method's media budgets, rounds
   1-2 scripted as FIND_SEGMENT / FIND_FRAME (bench_rollout's workload: tests/helpers_rollout). Systems:
   the engine, the engine with CUDA graphs for its decode-only steps (`engine_graphs`: the validation that
   EngineStep.CUDA_GRAPHS waits for; tests/test_gpu_rollout.py checks its tokens), the naive loop and
   lock-step `generate` (bench/naive_rollout.py). Each runs once untimed under
   `torch.cuda.set_sync_debug_mode("warn")` (one prompt; its warnings are the device syncs counted), then
   once timed. Per system: generated tokens/s, steps, host ms per step (wall / steps), GPU ms per step (CUDA
   events from the input-embedding lookup to the lm_head output of each model step: the forward's span on the
   stream), device syncs per step, peak GPU memory.
Output: ONE JSON (default runs/gpu_check/gpu_check.json: machine, versions, each step's status and seconds,
the benchmark rows) and a printed table. Without a CUDA device (or with --dry-run) it prints the plan and
exits 0, touching nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".gpu-carry"
SITE = ROOT / ".gpu-site"
BUDGET_S = {"wheels": 120, "build": 240, "tests": 300, "bench": 300}
CARRY_WHEELS = ["av==18.1.0", "transformers==5.23.0", "pillow==13.0.0"]   # pillow: the PIL image processor
CARRY_LIMIT_MB = 64 * 1024 * 1024 / 1e6   # what travels: working tree + carried paths
PROMPTS, G, ROUNDS, NEW, SCRIPTED = 2, 4, 3, 32, 2


# --- the plan and its steps (no torch import before the child processes need it) --------------------------
def plan() -> list[str]:
    wheels = sorted(p.name for p in (CARRY / "wheels").glob("*.whl"))
    return [
        f"install carried wheels into {SITE.name}/ (pip --no-index --no-deps): {', '.join(wheels) or 'none found'}",
        "build the CUDA extension: VIDEOCOM_CUDA=ON python setup.py build_ext --inplace",
        "run the GPU tests: python -m pytest -m gpu tests",
        f"rollout benchmark, Qwen2.5-VL-7B-shaped random bf16 model: engine (eager, CUDA graphs) vs naive "
        f"loop vs lock-step, "
        f"{PROMPTS} prompts x G={G}, {ROUNDS} rounds, <= {NEW} new tokens per round",
    ]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SITE), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("PIP_NO_CACHE_DIR", "1")
    return env


def _run(step: str, cmd: list[str], env=None, **kw) -> dict:
    print(f"\n=== {step}: {' '.join(cmd)}", flush=True)
    t = time.perf_counter()
    try:
        run = subprocess.run(cmd, cwd=ROOT, env=env or _env(), timeout=BUDGET_S[step], text=True,
                             capture_output=True, **kw)
        rc, out = run.returncode, run.stdout + run.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", f"{e.stdout or ''}{e.stderr or ''}\n{step}: stopped after {BUDGET_S[step]} s"
    print(out[-4000:], flush=True)
    return {"status": "ok" if rc == 0 else "failed", "returncode": rc, "seconds": round(time.perf_counter() - t, 1),
            "tail": out[-2000:], "log": out}


def install_wheels() -> dict:
    wheels = sorted((CARRY / "wheels").glob("*.whl"))
    if not wheels:
        return {"status": "skipped", "reason": f"no wheels in {CARRY / 'wheels'} (run make gpu-carry)"}
    res = _run("wheels", [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-cache-dir",
                          "--upgrade", "--target", str(SITE), *map(str, wheels)])
    probe = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                           cwd=ROOT, env=_env(), capture_output=True, text=True)
    if probe.returncode != 0 and (SITE / "transformers").exists():
        # NOTE: transformers checks huggingface_hub's version at import; the machine's hub is older than 5.23
        # wants, and carrying a hub chain (httpx2, hf-xet) does not fit the budget: use the machine's own.
        for p in SITE.glob("transformers*"):
            shutil.rmtree(p)
        res["transformers_note"] = "carried transformers removed (does not import here): " + probe.stderr[-300:]
        probe = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                               cwd=ROOT, env=_env(), capture_output=True, text=True)
    res["transformers"] = probe.stdout.strip() or probe.stderr[-300:]
    return res


def build() -> dict:
    env = dict(_env(), VIDEOCOM_CUDA="ON", MAX_JOBS=str(os.cpu_count() or 4))
    res = _run("build", [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], env=env)
    probe = subprocess.run([sys.executable, "-c", "from videocom_fast import _C; print(_C.with_cuda)"],
                           cwd=ROOT, env=_env(), capture_output=True, text=True)
    res["with_cuda"] = probe.stdout.strip() == "True"
    if not res["with_cuda"]:
        res["status"] = "failed"
    return res


def run_tests() -> dict:
    """pytest -m gpu over tests/. Test modules that cannot even be imported on a bare GPU machine (they need
    DeepSpeed, DALI, ...) are listed as collection errors; they fail the step only for tests/test_gpu_*."""
    res = _run("tests", [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-q", "-rs", "-p", "no:cacheprovider",
                         "--continue-on-collection-errors"])
    lines = res["log"].splitlines()
    last = [line for line in lines if " in " in line and any(w in line for w in ("passed", "failed", "skipped"))]
    res["summary"] = last[-1].strip("= ") if last else ""
    res["skips"] = [line for line in lines if line.startswith("SKIPPED")]
    res["collection_errors"] = [line for line in lines if line.startswith("ERROR tests/")]
    failed = " failed" in res["summary"] or not last or any("test_gpu_" in e for e in res["collection_errors"])
    res["status"] = "failed" if failed or res["returncode"] == "timeout" else "ok"
    return res


def run_bench() -> dict:
    out = ROOT / "runs" / "gpu_check" / "bench_rows.json"
    res = _run("bench", [sys.executable, str(Path(__file__)), "--bench-only", "--out", str(out)])
    if out.exists():
        res["rows"] = json.loads(out.read_text())
        if any("error" in r for r in res["rows"].get("systems", {}).values()):
            res["status"] = "failed"
    return res


def versions() -> dict:
    code = ("import json, torch, triton, transformers; print(json.dumps({'torch': torch.__version__, 'cuda': "
            "torch.version.cuda, 'triton': triton.__version__, 'transformers': transformers.__version__, "
            "'gpu': torch.cuda.get_device_name(0)}))")
    probe = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True)
    return json.loads(probe.stdout) if probe.returncode == 0 else {"error": probe.stderr[-300:]}


def _no_gpu_reason() -> str | None:
    """Why this machine cannot run the check (None: it can)."""
    try:
        import torch
    except ImportError:
        return f"torch is not importable by {sys.executable} (on the lent machines: make gpu-check GPU_PY=...)"
    return None if torch.cuda.is_available() else "no CUDA device on this machine"


# --- preparing what travels (development machine) ----------------------------------------------------------
def prepare_carry() -> int:
    """Fill .gpu-carry/ (wheels, a B-frame H.264 file, the rollout dataset); fails if over the budget."""
    wheels = CARRY / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                    "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64", "--platform",
                    "manylinux_2_17_x86_64", "-d", str(wheels), *CARRY_WHEELS], check=True)
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
    from helpers_rollout import make_data
    from test_gpu_media import h264_with_bframes, picture_types

    (CARRY / "videos").mkdir(exist_ok=True)
    video = h264_with_bframes(CARRY / "videos")
    assert "B" in picture_types(video), f"{video}: the encoder wrote no B-frames"
    make_data(CARRY / "rollout_data")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True).stdout
    tree = sum((ROOT / f).stat().st_size for f in tracked.split("\0") if f and (ROOT / f).is_file())
    carry = sum(p.stat().st_size for p in CARRY.rglob("*") if p.is_file())
    print(f"{CARRY.name}/: {carry / 1e6:.1f} MB; working tree {tree / 1e6:.1f} MB; "
          f"limit {CARRY_LIMIT_MB:.1f} MB (carry it as the run's carried path '{CARRY.name}')")
    if tree + carry > CARRY_LIMIT_MB * 1e6:
        print(f"over the budget by {(tree + carry) / 1e6 - CARRY_LIMIT_MB:.1f} MB", file=sys.stderr)
        return 1
    return 0


# --- the table --------------------------------------------------------------------------------------------
def _num(v, width: int) -> str:
    return f"{v:{width}.2f}" if v is not None else f"{'-':>{width}}"


def print_table(report: dict) -> None:
    print("\n=== gpu-check", report["machine"].get("gpu", "?"), "| commit", report["commit"])
    for name in ("wheels", "build", "tests", "bench"):
        step = report["steps"].get(name, {})
        extra = step.get("summary") or step.get("reason") or step.get("transformers", "")
        print(f"{name:8} {step.get('status', '-'):8} {step.get('seconds', 0):7.1f} s  {extra}")
    rows = report["steps"].get("bench", {}).get("rows", {}).get("systems", {})
    if rows:
        print(f"\n{'system':13} {'gen tok/s':>10} {'steps':>6} {'host ms/step':>13} {'GPU ms/step':>12} "
              f"{'syncs/step':>11} {'peak GiB':>9}")
        for name, r in rows.items():
            if "error" in r:
                print(f"{name:13} {r['error']}")
                continue
            print(f"{name:13} {r['gen_tokens_per_s']:10.1f} {r['steps']:6d} "
                  f"{_num(r['host_ms_per_step'], 13)} "
                  f"{_num(r['gpu_ms_per_step'], 12)} {_num(r['syncs_per_step'], 11)} {_num(r['peak_gib'], 9)}")
        eager, graphed = rows.get("engine", {}), rows.get("engine_graphs", {})
        if eager and graphed and "error" not in eager and "error" not in graphed:
            # EngineStep.CUDA_GRAPHS waits for this line and for tests/test_gpu_rollout.py's token comparison
            pair = lambda k: f"{_num(eager[k], 0).strip()} -> {_num(graphed[k], 0).strip()}"  # noqa: E731
            print(f"\nCUDA graphs: host ms/step {pair('host_ms_per_step')}, GPU ms/step "
                  f"{pair('gpu_ms_per_step')}, generated tok/s {pair('gen_tokens_per_s')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    ap.add_argument("--bench-only", action="store_true", help="(child process) run the rollout benchmark only")
    ap.add_argument("--prepare-carry", action="store_true", help="(development machine) fill .gpu-carry/")
    ap.add_argument("--out", default=str(ROOT / "runs" / "gpu_check" / "gpu_check.json"))
    args = ap.parse_args(argv)
    if args.prepare_carry:
        return prepare_carry()
    if args.bench_only:
        from gpu_check_bench import bench_7b   # the benchmark half, imported only in the child process
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).unlink(missing_ok=True)
        rows = bench_7b(out_path=Path(args.out))
        Path(args.out).write_text(json.dumps(rows, indent=1))
        return 1 if "error" in rows else 0
    why = "--dry-run" if args.dry_run else _no_gpu_reason()
    if why:
        print(f"gpu-check dry run ({why}); on a GPU machine it would:")
        for i, step in enumerate(plan(), 1):
            print(f"  {i}. {step}")
        print(f"and write one JSON to {args.out} plus a table. Nothing was run.")
        return 0
    t0 = time.perf_counter()
    steps = {"wheels": install_wheels(), "build": build()}
    steps["tests"] = run_tests()
    steps["bench"] = run_bench()
    for step in steps.values():
        step.pop("log", None)   # the JSON keeps each step's tail only
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    report = {"commit": commit.stdout.strip() or "unknown", "machine": {**versions(), "host": platform.node(),
              "cpus": os.cpu_count()}, "total_seconds": round(time.perf_counter() - t0, 1), "steps": steps}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"\nwrote {args.out} ({report['total_seconds']:.0f} s in all)")
    return 0 if all(s.get("status") in ("ok", "skipped") for s in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
