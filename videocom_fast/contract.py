"""The media contract: the settings that give every zoom box its coordinate system and every episode its
budget, recorded where data and models are written and read back wherever they are used.

    write_contract(data_dir, "synth", media, frame_hw=(192, 320))          # next to sft/grpo/eval.json
    write_contract(model_dir, "sft", media, generation={"max_new_tokens": 64, "max_rounds": 5})
    media, generation, source = resolve(model_dir, data_json, media={"main_nframes": 4})
    check_zoom_coordinates(data_json, media)     # ValueError naming both settings and the fix

File: DIR/media.json = {"format": 1, "written_by": "synth" | "sft" | "grpo", "media": {MediaConfig fields},
"generation": {max_new_tokens, max_rounds, temperature, top_k, top_p} (model directories), "frame_hw"
and "zoom_hw" (data: the frames' size and the resized size the SFT chains' SPATIAL_ZOOM boxes are in)}.

Who reads what (explicit settings always win, key by key, and each run records what it used):
  media       the explicit config/flags, else the model directory's contract, else the data's, else the
              method's defaults (`env.MediaConfig`)
  generation  the explicit config/flags, else the model directory's contract, else the method's defaults
Why the data's image limits matter only for SFT: its gpt turns carry SPATIAL_ZOOM boxes in resized
coordinates, so SFT at other limits would teach boxes outside the image the model sees
(`check_zoom_coordinates` stops it). GRPO/eval gold boxes are in original pixels and are rescaled to the
run's limits by the rewards, so any limits are correct there.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

CONTRACT_FILE = "media.json"
FORMAT = 1
GENERATION_DEFAULTS = {"max_new_tokens": 512, "max_rounds": 5, "temperature": 0.9, "top_k": 50, "top_p": 1.0}


def media_fields() -> dict:
    """MediaConfig field -> default value (the method's budgets)."""
    from .env import MediaConfig

    return {f.name: f.default for f in dataclasses.fields(MediaConfig)}


def check_media(media: dict, where: str) -> dict:
    """`media` with known keys and positive int values; ValueError naming `where` and the key otherwise."""
    known = media_fields()
    if not isinstance(media, dict):
        raise ValueError(f"{where}: media: expected a mapping of {sorted(known)}, got {media!r}")
    out = {}
    for k, v in media.items():
        if k not in known:
            raise ValueError(f"{where}: media.{k}: unknown key; known: {sorted(known)}")
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: media.{k}: expected a positive int, got {v!r}")
        out[k] = v
    return out


# --- files -------------------------------------------------------------------------------------------

def write_contract(directory, written_by: str, media, *, generation: dict | None = None,
                   frame_hw=None) -> Path:
    """Write DIR/media.json; `media`: a MediaConfig or dict (missing keys take the defaults)."""
    m = dataclasses.asdict(media) if dataclasses.is_dataclass(media) else {**media_fields(), **dict(media)}
    doc: dict = {"format": FORMAT, "written_by": written_by, "media": m}
    if generation is not None:
        doc["generation"] = {k: generation[k] for k in GENERATION_DEFAULTS if k in generation}
    if frame_hw is not None:
        from .protocol import smart_resize

        doc["frame_hw"] = list(frame_hw)
        doc["zoom_hw"] = list(smart_resize(*frame_hw, min_pixels=m["image_min_pixels"],
                                           max_pixels=m["image_max_pixels"]))
    path = Path(directory) / CONTRACT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path


def read_contract(directory) -> dict | None:
    """The contract of a model or data directory (or of the directory holding a data JSON), or None."""
    d = Path(directory)
    path = (d if d.is_dir() else d.parent) / CONTRACT_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("media"), dict):
        raise ValueError(f"{path}: expected a media contract with a 'media' mapping")
    doc["media"] = check_media(doc["media"], str(path))
    doc["path"] = str(path)
    return doc


# --- resolution --------------------------------------------------------------------------------------

def resolve(model_dir=None, data=None, *, media: dict | None = None, generation: dict | None = None):
    """(MediaConfig, generation dict, sources): explicit values, else the model's contract, else the data's
    (media only), else the defaults. `sources` says where each part came from, for logs and summaries."""
    from .env import MediaConfig

    model_c = read_contract(model_dir) if model_dir is not None and Path(model_dir).is_dir() else None
    data_c = read_contract(data) if data is not None else None
    explicit_m = check_media(dict(media or {}), "media")
    base_c = model_c or data_c
    m = {**media_fields(), **(base_c["media"] if base_c else {}), **explicit_m}
    g = {**GENERATION_DEFAULTS, **((model_c or {}).get("generation") or {}),
         **{k: v for k, v in (generation or {}).items() if v is not None}}
    sources = {"media": base_c["path"] if base_c else "defaults",
               "generation": model_c["path"] if model_c and model_c.get("generation") else "defaults"}
    if explicit_m:
        sources["media"] += f" + explicit {sorted(explicit_m)}"
    explicit_g = sorted(k for k, v in (generation or {}).items() if v is not None)
    if explicit_g:
        sources["generation"] += f" + explicit {explicit_g}"
    return MediaConfig(**m), g, sources


def check_zoom_coordinates(data, media) -> None:
    """Stop when `data`'s SFT zoom boxes were written for another resized frame size than `media` gives.

    Compares the resized frame sizes, not the limits: limits that resize the data's frames identically
    leave every box valid. Data without a contract (e.g. converted real data) is not checked."""
    from .protocol import smart_resize

    c = read_contract(data)
    if c is None or "frame_hw" not in c:
        return
    H, W = c["frame_hw"]
    lo, hi = media.image_min_pixels, media.image_max_pixels
    mine = list(smart_resize(H, W, min_pixels=lo, max_pixels=hi))
    if mine == list(c["zoom_hw"]):
        return
    dm = c["media"]
    raise ValueError(
        f"{data}: its SPATIAL_ZOOM boxes are in the coordinates of {H}x{W} frames resized to "
        f"{c['zoom_hw'][0]}x{c['zoom_hw'][1]} (image_min_pixels={dm['image_min_pixels']}, "
        f"image_max_pixels={dm['image_max_pixels']}, recorded in {c['path']}), but this run resizes them to "
        f"{mine[0]}x{mine[1]} (image_min_pixels={lo}, image_max_pixels={hi}). Fix: train with "
        f"media.image_min_pixels={dm['image_min_pixels']} media.image_max_pixels={dm['image_max_pixels']}, "
        f"or re-synthesize the data with this run's limits (videocom-fast synth {Path(c['path']).parent} "
        f"--overwrite --media image_min_pixels={lo} --media image_max_pixels={hi}, or --config with this "
        f"run's config)")


def note(msg: str) -> None:
    """A line for the user on stderr (stdout carries results only)."""
    print(f"videocom-fast: {msg}", file=sys.stderr, flush=True)


def require_model_dir(path, what: str = "model") -> Path:
    """An existing local model directory, at once (a missing path would otherwise be tried as a Hub id,
    with network retries, and fail minutes later)."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{what}: directory {str(path)!r} does not exist (relative to {Path.cwd()}); pass an "
                         f"SFT/GRPO output_dir or a downloaded Qwen2.5-VL directory")
    if not (p / "config.json").is_file():
        raise ValueError(f"{what}: {str(path)!r} has no config.json: not a model directory (a run that was "
                         f"stopped before its export?)")
    return p
