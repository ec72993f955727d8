"""Rollouts: the engine (engine.py), its scheduler (scheduler.py), paged KV (kv_cache.py, attention.py),
sampling (sampling.py), stopping rules (stopping.py) and the Trajectory it returns (trajectory.py)."""
from .engine import RolloutEngine
from .trajectory import Trajectory

__all__ = ["RolloutEngine", "Trajectory"]
