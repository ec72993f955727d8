"""Training configs: a dataclass per trainer, filled from a YAML file plus `key=value` command-line overrides.

    cfg = load_config(SFTConfig, "configs/sft_tiny.yaml", ["lr=3e-4", "media.main_nframes=8"])

`--config` takes a file or a packaged config by name (`sft_tiny`: videocom_fast/configs/sft_tiny.yaml, from
any directory). Overrides use dotted keys for nested dicts; values are parsed as YAML scalars. Every value,
from the file or the command line, is checked and converted by its field's type before anything runs
(YAML 1.1 reads `1e-5` as a string: a float field converts it; `freeze_vision=ture` is an error), and an
error names the key and the file. An unknown key is a ValueError naming it (a typo must not silently train
the default). Relative paths in the YAML stay relative to the working directory, as users type them.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any


def parse_overrides(overrides) -> dict:
    """["a.b=1", "c=x"] -> {"a": {"b": 1}, "c": "x"} (values as YAML scalars; types are checked later)."""
    import yaml

    out: dict = {}
    for i, item in enumerate(overrides or []):
        if "=" not in item:
            raise ValueError(f"overrides[{i}]: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ValueError(f"command line: {key}: cannot read {raw!r} as a YAML value ({e})") from None
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string; users mean a number
            try:
                value = float(value) if any(c in value.lower() for c in ".e") else int(value)
            except ValueError:
                pass
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"command line: {key}: {p} is not a mapping")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def packaged_configs() -> Path:
    """The configs that ship with the package (videocom_fast/configs)."""
    import videocom_fast

    return Path(videocom_fast.__file__).resolve().parent / "configs"


def find_config(name) -> Path:
    """A config file: an existing path as given, else a packaged config by name (`sft_tiny` or
    `sft_tiny.yaml`), so `--config sft_tiny` works from any directory."""
    p = Path(name)
    if p.is_file():
        return p
    pkg = packaged_configs()
    for cand in (pkg / p.name, pkg / f"{p.name}.yaml"):
        if p.parent in (Path("."), Path("configs")) and cand.is_file():
            return cand
    shipped = sorted(c.stem for c in pkg.glob("*.yaml"))
    raise ValueError(f"config: file {str(name)!r} not found (relative to {Path.cwd()}); packaged configs, "
                     f"usable by name from any directory: {shipped}")


def read_yaml(path) -> dict:
    """The mapping in a YAML file; a syntax error names the file, line and column."""
    import yaml

    p = Path(path)
    try:
        with open(p) as f:   # a stream: the error's position names the file
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"config {str(p)!r}: not valid YAML: {' '.join(str(e).split())}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"config {str(p)!r}: must hold a mapping at the top level")
    return data


def load_config(cls, path=None, overrides=(), **kwargs):
    """An instance of dataclass `cls` from YAML `path` (optional; a packaged config name works too), then
    `overrides`, then `kwargs`. Every value is checked and converted by its field's type; an error names
    the key and where the value came from."""
    data: dict = {}
    if path:
        p = find_config(path)
        data = check_types(cls, read_yaml(p), f"config {str(p)!r}")
    data = _merge(data, check_types(cls, parse_overrides(overrides), "command line"))
    data = _merge(data, check_types(cls, kwargs, "arguments"))
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


# --- types -----------------------------------------------------------------------------------------

def check_types(cls, data: dict, where: str) -> dict:
    """`data` with each value converted to its field's type (`where` names the source in errors).

    YAML 1.1 reads `1e-5` as a string and `ture` is a string too: a float field takes a numeric string, a
    bool field takes only true/false, an int field only integral numbers. Unknown keys are left for
    from_dict, which lists the known ones."""
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in data.items():
        out[k] = _convert(hints[k], v, f"{where}: {k}") if k in hints else v
    if "media" in out and "media" in hints and isinstance(out["media"], dict):
        from videocom_fast.contract import check_media

        out["media"] = check_media(out["media"], where)
    return out


def _convert(tp, v, what: str):
    args = typing.get_args(tp)
    if type(None) in args:       # Optional[X]
        if v is None:
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise ValueError(f"{what}: expected true or false, got {v!r}")
    if tp is int:
        if isinstance(v, str):
            v = _number(v, what, "an integer")
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        raise ValueError(f"{what}: expected an integer, got {v!r}")
    if tp is float:
        if isinstance(v, str):
            v = _number(v, what, "a number")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        raise ValueError(f"{what}: expected a number, got {v!r}")
    if tp is str:
        if isinstance(v, str):
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
        raise ValueError(f"{what}: expected a string, got {v!r}")
    if tp is dict or typing.get_origin(tp) is dict:
        if isinstance(v, dict):
            return v
        raise ValueError(f"{what}: expected a mapping (key: value), got {v!r}")
    if tp is tuple or typing.get_origin(tp) is tuple:
        if isinstance(v, (list, tuple)):
            return tuple(_number(x, what, "a number") if isinstance(x, str) else x for x in v)
        raise ValueError(f"{what}: expected a list, got {v!r}")
    return v


def _number(s: str, what: str, expected: str):
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        raise ValueError(f"{what}: expected {expected}, got {s!r}") from None


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(cfg, extra: str = "") -> str:
    import hashlib
    import json

    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str) + extra
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_cli(prog: str, cls, argv=None):
    """`PROG --config FILE [key=value ...] [--resume | --overwrite]` -> a `cls` config (argv may already be
    one). A non-empty output_dir is refused unless --resume or --overwrite (which empties it)."""
    import argparse
    import os

    if isinstance(argv, cls):
        return argv
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--config", default=None,
                    help="YAML config: a file, or a packaged config by name (e.g. sft_tiny, grpo_tiny)")
    ap.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    ap.add_argument("--overwrite", action="store_true", help="empty a non-empty output_dir first")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None,
                    help="set by the deepspeed launcher")
    ap.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys for nested fields)")
    args = ap.parse_args(argv)
    cfg = load_config(cls, args.config, args.overrides, **({"resume": True} if args.resume else {}))
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite: choose one")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0 or not args.overwrite:   # NOTE: only rank 0 empties; the others must not see it half-emptied
        from videocom_fast.cli_io import prepare_output_dir

        prepare_output_dir(cfg.output_dir, overwrite=args.overwrite and rank0, resume=cfg.resume)
    return cfg
