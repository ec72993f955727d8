"""Where the CLI's output goes: results on stdout, everything else on stderr, and no mixed run directories.

    with results_only_on_stdout():      # anything printed meanwhile (DeepSpeed, C++ libraries) -> stderr
        result = run_sft(cfg)
    print(json.dumps(result))           # the one thing on stdout
    prepare_output_dir("runs/sft", overwrite=args.overwrite, resume=args.resume)

Streams: libraries print to stdout by themselves (DeepSpeed's logger holds the real sys.stdout, native
code writes to file descriptor 1), so the redirect is done on the descriptor, not only on sys.stdout.

Output directories: a run writing into an earlier run's directory mixes the two (a killed run's checkpoints and
metrics.jsonl next to the new ones, stale videos next to new JSON). `resume` keeps the directory as it
is; `overwrite` empties it first. Only the CLI applies this; library calls (run_sft, synthesize) write
where they are told.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path


@contextlib.contextmanager
def results_only_on_stdout():
    """Send file descriptor 1 (and sys.stdout) to stderr for the duration; restore after."""
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):   # captured (pytest capsys): Python-level redirect only
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    saved = os.dup(fd)
    try:
        sys.stderr.flush()
        os.dup2(sys.stderr.fileno(), fd)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)


def prepare_output_dir(path, *, overwrite: bool = False, resume: bool = False, what: str = "output_dir") -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what}: {str(p)!r} exists and is not a directory")
    if not p.is_dir() or resume or not any(p.iterdir()):
        p.mkdir(parents=True, exist_ok=True)
        return p
    if not overwrite:
        raise ValueError(f"{what}: {str(p)!r} is not empty (an earlier run's files would mix with this one's); "
                         f"pass --overwrite to empty it first, --resume to continue a training run there, "
                         f"or choose another directory")
    here = Path.cwd().resolve()
    target = p.resolve()
    if target in (Path(target.anchor), Path.home().resolve()) or target == here or target in here.parents:
        raise ValueError(f"{what}: refusing to empty {str(p)!r} (the root, home or working directory)")
    shutil.rmtree(target)
    target.mkdir(parents=True)
    return p
