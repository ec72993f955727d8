"""Episodes on a GRPO/eval file with the rollout engine, scored by the method's rewards.

`evaluate(...)` -> accuracy, format rate, reasoning score, precision per manipulation type, rounds and
tokens used; written as JSON (and the episodes as trajectory records for `videocom-fast report`).
`rollout_to_dir(...)` runs G sampled rollouts per sample and writes their records and throughput.
Both run under the model's media contract (videocom_fast.contract: the media settings and generation limits
its SFT/GRPO run recorded in media.json; explicit arguments override) and record it in their summary, so
`videocom-fast eval` on a checkpoint runs the episodes it was trained on.
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
    from .contract import require_model_dir
    from .models import load
    from .rollout import RolloutEngine

    model, processor = load(require_model_dir(model_dir), dtype=dtype)
    return RolloutEngine(model, processor, max_rounds=max_rounds, max_new_tokens=max_new_tokens,
                         media_config=media_config_from(media), **kw)


def _write_records(out_dir: Path, name: str, trajs_per_sample, samples, per) -> Path:
    from .report import trajectory_record, write_records

    flat = [(t, samples[i]) for i, ts in enumerate(trajs_per_sample) for t in ts]
    return write_records(out_dir / name, (trajectory_record(t, s, per[k]) for k, (t, s) in enumerate(flat)))


def run_episodes(engine, samples, *, num_generations=1, greedy=True, seed=0, temperature=0.9, top_k=50,
                 top_p=1.0):
    t0 = time.perf_counter()
    trajs = engine.generate(samples, num_generations=num_generations, greedy=greedy, seed=seed,
                            temperature=temperature, top_k=top_k, top_p=top_p)
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


def _prepare(model_dir, data, limit, media, generation: dict, engine):
    """Samples, engine and the contract the episodes run under: `media` and `generation` values given
    explicitly, else the model directory's media.json, else the data's, else the method's defaults."""
    from dataclasses import asdict

    from .contract import note, require_model_dir, resolve
    from .data import load_samples

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: expected an int >= 1, got {limit!r}")
    samples = load_samples(data, kind="grpo")[:limit]
    if engine is None:
        require_model_dir(model_dir)
    explicit = dict(asdict(media_config_from(media))) if media is not None else None
    mc, gen, sources = resolve(model_dir, data, media=explicit, generation=generation)
    if engine is None:
        note(f"media from {sources['media']}; generation limits from {sources['generation']}: "
             f"max_new_tokens={gen['max_new_tokens']}, max_rounds={gen['max_rounds']}")
        engine = _engine(model_dir, mc, max_rounds=int(gen["max_rounds"]), max_new_tokens=int(gen["max_new_tokens"]))
    else:   # a caller's engine runs with its own settings: record those
        mc = engine.media_config or mc
        gen = {**gen, "max_new_tokens": engine.max_new_tokens, "max_rounds": engine.max_rounds}
        sources = {"media": "engine", "generation": "engine"}
    contract = {"media": asdict(mc), "generation": gen, "sources": sources}
    return samples, engine, contract


def _sampling(contract: dict, greedy: bool) -> dict:
    g = contract["generation"]
    return {"greedy": greedy, "temperature": g["temperature"], "top_k": g["top_k"], "top_p": g["top_p"]}


def evaluate(model_dir, data, out, *, greedy=True, num_generations=1, limit=None, seed=0, media=None,
             max_rounds=None, max_new_tokens=None, temperature=None, top_k=None, top_p=None, engine=None,
             tag="eval") -> dict:
    """Greedy (or sampled, `num_generations` per sample) episodes over `data`; writes OUT (JSON) and the
    trajectories beside it. Unset media/generation settings come from the model's media.json
    (videocom_fast.contract); the summary records what was used under "contract"."""
    samples, engine, contract = _prepare(model_dir, data, limit, media, dict(
        max_rounds=max_rounds, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p),
        engine)
    trajs, per, summary = run_episodes(engine, samples, num_generations=1 if greedy else num_generations,
                                       seed=seed, **_sampling(contract, greedy))
    summary = {"model": str(model_dir), "data": str(data), "greedy": greedy,
               "num_generations": 1 if greedy else num_generations, "seed": seed, **summary,
               "contract": contract}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    _write_records(out.parent, f"trajectories_{tag}.jsonl", trajs, samples, per)
    return summary


def rollout_to_dir(model_dir, data, out_dir, *, num_generations=8, greedy=False, limit=None, seed=0,
                   media=None, max_rounds=None, max_new_tokens=None, temperature=None, top_k=None, top_p=None,
                   engine=None) -> dict:
    """G rollouts per sample (sampled unless `greedy`) under the model's contract; writes OUT_DIR/rollout.json
    and the trajectories."""
    samples, engine, contract = _prepare(model_dir, data, limit, media, dict(
        max_rounds=max_rounds, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p),
        engine)
    trajs, per, summary = run_episodes(engine, samples, num_generations=num_generations, seed=seed,
                                       **_sampling(contract, greedy))
    summary = {"model": str(model_dir), "data": str(data), "greedy": greedy, "num_generations": num_generations,
               "seed": seed, **summary, "contract": contract}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_records(out_dir, "trajectories_rollout.jsonl", trajs, samples, per)
    (out_dir / "rollout.json").write_text(json.dumps(summary, indent=2))
    return summary
