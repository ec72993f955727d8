"""Rollouts: the engine (engine.py), its scheduler (scheduler.py), paged KV (kv_cache.py, attention.py),
sampling (sampling.py), stopping rules (stopping.py) and the Trajectory it returns (trajectory.py).

`RolloutEngine` and `Trajectory` load on first use, so the torch-free scheduler imports without torch."""
import importlib

__all__ = ["RolloutEngine", "Trajectory"]
_LAZY = {"RolloutEngine": ".engine", "Trajectory": ".trajectory"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
