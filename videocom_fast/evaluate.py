"""Episodes on a GRPO/eval file with the rollout engine, scored by the method's rewards.

`evaluate(...)` -> accuracy, format rate, reasoning score, precision per manipulation type, rounds and
tokens used; written as JSON (and the episodes as trajectory records for `videocom-fast report`).
`rollout_to_dir(...)` runs G sampled rollouts per sample and writes their records and throughput.
"""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from .protocol import parse_actions
from .rewards import combined_reward, manipulation_counts


def media_config_from(cfg):
    from .env import MediaConfig

    if cfg is None or isinstance(cfg, MediaConfig):
        return cfg or MediaConfig()
    return MediaConfig(**dict(cfg))


def score_episodes(trajs_per_sample, samples, image_pixels=None) -> tuple[list[dict], dict]:
    """Per-episode rewards and the summary (`image_pixels`: the (min, max) limits the FIND_FRAME images were
    shown with, for the gold boxes). Episodes the engine ended with "error: ..." (their sample's video
    unreadable, say) are not the model's: they are left out of every mean, counted in "failed_episodes"
    and said on stderr; their per-episode record is None."""
    from .rollout.engine import failed

    every = [(t, samples[i]) for i, ts in enumerate(trajs_per_sample) for t in ts]
    flat = [(t, s) for t, s in every if not failed(t)]
    fails = Counter(t.finish_reason for t, _ in every if failed(t))
    if fails:
        why = "; ".join(f"{n} x {r}" for r, n in fails.most_common(3))
        print(f"evaluate: {sum(fails.values())} of {len(every)} episodes failed and are left out ({why})",
              file=sys.stderr)
    texts = [t.completion_text for t, _ in flat]
    total, parts = combined_reward(texts, [s for _, s in flat], image_pixels=image_pixels)
    per, counts, actions, finishes = [], Counter(), Counter(), Counter()
    for k, (t, s) in enumerate(flat):
        per.append({"total": total[k], **{name: v[k] for name, v in parts.items()}})
        for kind, (c, n, _) in manipulation_counts(texts[k], s, image_pixels).items():
            counts[kind + "_correct"] += c
            counts[kind + "_predicted"] += n
        actions.update(a.kind for a in parse_actions(texts[k]))
        finishes[t.finish_reason] += 1
    n = max(1, len(flat))
    summary = {
        "episodes": len(flat),
        "reward_mean": sum(total) / n,
        **{f"{name}_mean": sum(v) / n for name, v in parts.items()},
        **{f"precision_{kind}": (counts[kind + "_correct"] / counts[kind + "_predicted"])
           if counts[kind + "_predicted"] else None for kind in ("segment", "frame", "zoom")},
        "rounds_mean": sum(len(t.round_texts) for t, _ in flat) / n,
        "generated_tokens_mean": sum(t.num_generated for t, _ in flat) / n,
        "tokens_mean": sum(len(t.token_ids) for t, _ in flat) / n,
        "actions": dict(actions), "finish_reasons": dict(finishes),
        "failed_episodes": sum(fails.values()), "failed_reasons": dict(fails),
    }
    it = iter(per)   # one record per episode, in order; None for the failed ones
    return [None if failed(t) else next(it) for t, _ in every], summary


def _engine(model_dir, media, *, max_rounds=5, max_new_tokens=512, dtype=None, **kw):
    from .models import load
    from .rollout import RolloutEngine

    model, processor = load(model_dir, dtype=dtype)
    return RolloutEngine(model, processor, max_rounds=max_rounds, max_new_tokens=max_new_tokens,
                         media_config=media_config_from(media), **kw)


def _write_records(out_dir: Path, name: str, trajs_per_sample, samples, per) -> Path:
    from .report import trajectory_record, write_records

    flat = [(t, samples[i]) for i, ts in enumerate(trajs_per_sample) for t in ts]
    return write_records(out_dir / name, (trajectory_record(t, s, per[k]) for k, (t, s) in enumerate(flat)))


def run_episodes(engine, samples, *, num_generations=1, greedy=True, seed=0, temperature=0.9):
    t0 = time.perf_counter()
    trajs = engine.generate(samples, num_generations=num_generations, greedy=greedy, seed=seed,
                            temperature=temperature)
    wall = time.perf_counter() - t0
    mc = engine.media_config
    limits = None if mc is None else (mc.image_min_pixels, mc.image_max_pixels)
    per, summary = score_episodes(trajs, samples, limits)
    st = engine.stats
    summary.update(wall_s=wall, rollout_tokens_per_s=st.get("generated_tokens", 0) / max(wall, 1e-9),
                   visual_tokens_per_s=st.get("visual_tokens", 0) / max(wall, 1e-9),
                   prefill_tokens_saved=st.get("prefill_tokens_saved"),
                   fraction_outside_model=1.0 - st.get("model_s", 0.0) / max(st.get("wall_s", wall), 1e-9))
    return trajs, per, summary


def evaluate(model_dir, data, out, *, greedy=True, num_generations=1, limit=None, seed=0, media=None,
             max_rounds=5, max_new_tokens=512, engine=None, tag="eval") -> dict:
    """Greedy (or sampled, `num_generations` per sample) episodes over `data`; writes OUT (JSON) and the
    trajectories beside it."""
    from .data import load_samples

    samples = load_samples(data, kind="grpo")[:limit]
    engine = engine or _engine(model_dir, media, max_rounds=max_rounds, max_new_tokens=max_new_tokens)
    trajs, per, summary = run_episodes(engine, samples, num_generations=1 if greedy else num_generations,
                                       greedy=greedy, seed=seed)
    summary = {"model": str(model_dir), "data": str(data), "greedy": greedy, **summary}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    _write_records(out.parent, f"trajectories_{tag}.jsonl", trajs, samples, per)
    return summary


def rollout_to_dir(model_dir, data, out_dir, *, num_generations=8, greedy=False, limit=None, seed=0,
                   media=None, max_rounds=5, max_new_tokens=512, engine=None) -> dict:
    from .data import load_samples

    samples = load_samples(data, kind="grpo")[:limit]
    engine = engine or _engine(model_dir, media, max_rounds=max_rounds, max_new_tokens=max_new_tokens)
    trajs, per, summary = run_episodes(engine, samples, num_generations=num_generations, greedy=greedy, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_records(out_dir, "trajectories_rollout.jsonl", trajs, samples, per)
    (out_dir / "rollout.json").write_text(json.dumps(summary, indent=2))
    return summary
