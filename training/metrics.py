"""Training metrics: one JSON line per logged step (metrics.jsonl) plus TensorBoard scalars.

    log = MetricsLogger(out_dir)            # tensorboard=False to skip the event files
    log.log(step, {"loss": 1.2, "lr": 1e-5})
    log.close()
Only rank 0 writes (pass enabled=False elsewhere). The JSONL is the format the report and tests read.

Resume: a killed run logged steps after its last checkpoint, and the resumed run logs them again.
`load_checkpoint` therefore calls `rewind_metrics(out_dir, step)`, which drops the JSONL rows of steps
after the checkpoint (atomically), so each step appears once. TensorBoard event files keep the killed
run's extra points (TensorBoard shows the later write of a step).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, out_dir, *, tensorboard: bool = True, enabled: bool = True, filename="metrics.jsonl",
                 append: bool = False):
        self.enabled = enabled
        self.path = Path(out_dir) / filename
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a" if append else "w")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(out_dir) / "tb"))
            except ImportError:  # tensorboard is optional at run time
                self._tb = None

    def log(self, step: int, values: dict):
        if not self.enabled:
            return
        rec = {"step": int(step), "time": round(time.time(), 3), **{k: _plain(v) for k, v in values.items()}}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self):
        if not self.enabled:
            return
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    if hasattr(v, "item"):
        return v.item()
    return v


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def rewind_metrics(out_dir, step: int, filename: str = "metrics.jsonl") -> int:
    """Drop the rows of `out_dir/filename` logged for steps after `step`; returns how many were dropped.

    Atomic (written beside it, then renamed), so a crash here leaves the old file. A torn last line (the
    run killed mid-write) is dropped too."""
    path = Path(out_dir) / filename
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += bool(line.strip())
            continue
        if isinstance(rec, dict) and int(rec.get("step", 0)) > step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return dropped
