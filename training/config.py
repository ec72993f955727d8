"""Training configs: a dataclass per trainer, filled from a YAML file plus `key=value` command-line overrides.

    cfg = load_config(SFTConfig, "configs/sft_tiny.yaml", ["lr=3e-4", "media.main_nframes=8"])

Overrides use dotted keys for nested dicts; values are parsed as YAML scalars (so `3e-4`, `true`, `[1, 2]`
work). An unknown top-level key is a ValueError naming it (a typo must not silently train the default).
Relative paths in the YAML stay relative to the working directory, as users type them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


def parse_overrides(overrides) -> dict:
    """["a.b=1", "c=x"] -> {"a": {"b": 1}, "c": "x"}."""
    import yaml

    out: dict = {}
    for i, item in enumerate(overrides or []):
        if "=" not in item:
            raise ValueError(f"overrides[{i}]: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string; users mean a number
            try:
                value = float(value) if any(c in value.lower() for c in ".e") else int(value)
            except ValueError:
                pass
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls, path=None, overrides=(), **kwargs):
    """An instance of dataclass `cls` from YAML `path` (optional), then `overrides`, then `kwargs`."""
    import yaml

    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config: file {str(p)!r} not found")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config: {str(p)!r} must hold a mapping at the top level")
    data = _merge(_merge(data, parse_overrides(overrides)), kwargs)
    return from_dict(cls, data)


def from_dict(cls, data: dict):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"config: unknown keys {unknown} for {cls.__name__}; known: {sorted(names)}")
    defaults = cls()
    merged = {}
    for k, v in data.items():
        cur = getattr(defaults, k)
        merged[k] = _merge(cur, v) if isinstance(cur, dict) and isinstance(v, dict) else v
    return dataclasses.replace(defaults, **merged)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(cfg, extra: str = "") -> str:
    import hashlib
    import json

    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str) + extra
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_cli(prog: str, cls, argv=None):
    """`PROG --config FILE [key=value ...] [--resume]` -> a `cls` config (argv may already be one)."""
    import argparse

    if isinstance(argv, cls):
        return argv
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--config", default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None)  # set by the deepspeed launcher
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    return load_config(cls, args.config, args.overrides, **({"resume": True} if args.resume else {}))
