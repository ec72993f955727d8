"""Blanked-media ablation: the same episodes with the observations' pixels replaced by black.

    engine = blanked_engine(model_dir, media, blank=("segment", "frame", "zoom"))
    trajs, per, summary = evaluate.run_episodes(engine, samples)

The environment's replies keep their text, media count, sizes and frame indices (so the token layout and
M-RoPE positions are those of the real episode); only the pixels of the rewatch video, the frame image
and/or the zoom crops become zeros. The main video is left alone. If a model's accuracy does not fall
under this ablation, it does not answer from what its manipulations brought back (issue 17).
"""
from __future__ import annotations

from dataclasses import replace

import torch

KINDS = ("segment", "frame", "zoom")


def _blanked_env(base_cls, blank: frozenset):
    class BlankedEnv(base_cls):
        def step(self, round_text):
            obs = super().step(round_text)
            if obs.media and obs.action is not None and obs.action.kind in blank:
                # NOTE: a distinct key, or the engine's vision cache would hand back the real features
                obs.media = [replace(m, frames=torch.zeros_like(m.frames), key=("blank",) + tuple(m.key))
                             for m in obs.media]
            return obs

    return BlankedEnv


def blanked_engine(model_dir, media, *, blank=KINDS, max_rounds: int = 5, max_new_tokens: int = 64, **kw):
    """A RolloutEngine whose environments black out the media of the observation kinds in `blank`."""
    from .evaluate import _engine

    _check(blank)
    engine = _engine(model_dir, media, max_rounds=max_rounds, max_new_tokens=max_new_tokens, **kw)
    engine.env_factory = _blanked_factory(engine, media, blank)
    return engine


def _check(blank) -> None:
    bad = set(blank) - set(KINDS)
    if bad or not blank:
        raise ValueError(f"blank: expected a non-empty subset of {KINDS}, got {tuple(blank)!r}")


def _blanked_factory(engine, media, blank):
    from .env import ManipulationEnv
    from .evaluate import media_config_from

    cls, mc = _blanked_env(ManipulationEnv, frozenset(blank)), media_config_from(media)
    return lambda sample: cls(sample, cache=engine.frame_cache, config=mc)


ROWS = {"full": None, "blank_all": KINDS, "blank_zoom": ("zoom",)}


def ablation_table(model_dir, samples, media, *, max_new_tokens: int = 64, rows=tuple(ROWS)) -> dict:
    """Greedy held-out summaries: {"full", "blank_all", "blank_zoom"} (or the given `rows`) ->
    evaluate.run_episodes summary, plus the per-episode accuracies (paired: same samples, same order). One
    engine (one model load, one frame cache); only its environments change between the rows."""
    from .evaluate import _engine, run_episodes

    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise ValueError(f"rows: expected some of {list(ROWS)}, got {list(rows)}")
    engine = _engine(model_dir, media, max_rounds=5, max_new_tokens=max_new_tokens)
    real = engine.env_factory
    out = {}
    for name in rows:
        blank = ROWS[name]
        engine.env_factory = real if blank is None else _blanked_factory(engine, media, blank)
        _, per, summary = run_episodes(engine, samples, num_generations=1, greedy=True)
        out[name] = {**summary, "accuracy_per_episode": [p["accuracy"] for p in per]}
    return out


__all__ = ["blanked_engine", "ablation_table", "KINDS", "ROWS"]
