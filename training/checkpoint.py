"""Atomic training checkpoints: everything needed to continue exactly, written to a temporary directory
that is renamed into place only when complete.

    ckpt = save_checkpoint(out_dir, step, model=m, optimizer=o, scheduler=s, state={"epoch": 1, ...})
    path = latest_checkpoint(out_dir)          # newest COMPLETE checkpoint, or None
    state = load_checkpoint(path, model=m, optimizer=o, scheduler=s)   # also restores RNG states

Layout: out_dir/checkpoint-0000012/{model_state.pt, optimizer.pt, scheduler.pt, rng.pt, state.json,
COMPLETE}. A run killed mid-save leaves only `.tmp-checkpoint-*` (ignored and cleaned up), so a resume
starts from the last complete checkpoint. `model_state.pt` is the full state dict (works for plain, LoRA
and frozen models alike); the loadable `from_pretrained` export is written separately by the trainer.
Tests simulate a crash between two writes with `crash_points` ("optimizer.pt@4": fail before that write).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

PREFIX = "checkpoint-"
crash_points: set[str] = set()   # test hook: "file" or "file@step": raise before writing that file


def _maybe_crash(name: str, step: int):
    if name in crash_points or f"{name}@{step}" in crash_points:
        raise RuntimeError(f"simulated crash before writing {name} of step {step}")


def rng_state() -> dict:
    import numpy as np

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict):
    import numpy as np

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def save_checkpoint(out_dir, step: int, *, model=None, optimizer=None, scheduler=None, state: dict | None = None,
                    engine=None, keep_last: int = 0) -> Path:
    """Write checkpoint `step` atomically; returns its path. `engine`: a DeepSpeed engine (saves its own
    sharded model/optimizer/scheduler states inside the same directory)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from .distributed import barrier, is_distributed

    final = out / f"{PREFIX}{step:07d}"
    # DeepSpeed: every rank writes its shard into one shared temporary directory; rank 0 owns it
    shared = engine is not None and is_distributed()
    rank0 = not shared or int(os.environ.get("RANK", "0")) == 0
    tmp = out / (f".tmp-{PREFIX}{step:07d}" if shared else f".tmp-{PREFIX}{step:07d}-{os.getpid()}")
    if rank0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    if engine is not None:
        barrier()
        _maybe_crash("engine", step)
        engine.save_checkpoint(str(tmp), tag="ds")
        barrier()
        if not rank0:
            barrier()
            return final
    else:
        _maybe_crash("model_state.pt", step)
        torch.save(model.state_dict(), tmp / "model_state.pt")
        _maybe_crash("optimizer.pt", step)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        _maybe_crash("scheduler.pt", step)
        torch.save(scheduler.state_dict() if scheduler is not None else {}, tmp / "scheduler.pt")
    _maybe_crash("rng.pt", step)
    torch.save(rng_state(), tmp / "rng.pt")
    _maybe_crash("state.json", step)
    (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}, indent=1))
    (tmp / "COMPLETE").write_text("ok\n")
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace the old copy
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(out)
    if keep_last > 0:
        for old in complete_checkpoints(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    if shared:
        barrier()
    return final


def complete_checkpoints(out_dir) -> list[Path]:
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.glob(f"{PREFIX}*") if p.is_dir() and (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(out_dir, *, clean_tmp: bool = True) -> Path | None:
    out = Path(out_dir)
    if clean_tmp and out.is_dir():
        for t in out.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(t, ignore_errors=True)
    found = complete_checkpoints(out)
    return found[-1] if found else None


def load_checkpoint(path, *, model=None, optimizer=None, scheduler=None, engine=None, restore_rng: bool = True,
                    rewind_metrics: bool = True) -> dict:
    """Restore what `save_checkpoint` wrote; returns the saved trainer state dict.

    `rewind_metrics`: the run resumes here, so the metrics.jsonl beside the checkpoint loses the rows of
    the steps after it (the killed run's, about to be redone; rank 0 only), else they appear twice."""
    p = Path(path)
    if not (p / "COMPLETE").is_file():
        raise ValueError(f"checkpoint {str(p)!r} is incomplete (no COMPLETE marker)")
    if engine is not None:
        engine.load_checkpoint(str(p), tag="ds")
    else:
        model.load_state_dict(torch.load(p / "model_state.pt", map_location="cpu", weights_only=True))
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(p / "optimizer.pt", map_location="cpu", weights_only=False))
        if scheduler is not None:
            scheduler.load_state_dict(torch.load(p / "scheduler.pt", weights_only=False))
    if restore_rng:
        set_rng_state(torch.load(p / "rng.pt", weights_only=False))
    state = json.loads((p / "state.json").read_text())
    if rewind_metrics and int(os.environ.get("RANK", "0")) == 0:
        from .metrics import rewind_metrics as rewind
        rewind(p.parent, int(state["step"]))
    return state
