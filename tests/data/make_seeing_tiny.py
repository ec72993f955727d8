"""Rebuild tests/data/seeing_tiny: the tiny model that sees (issue 17), pinned by tests/test_sees.py.

    python tests/data/make_seeing_tiny.py            # ~9 min on 2 CPU cores

The recipe in seeing_tiny/recipe.json, seed 0: build the tiny Qwen2.5-VL, warm its vision tower + merger up
on rendered scenes (300 steps), SFT on 400 x 8 rendered episodes, then 500 x 8 more at a lower rate. Rerun
it when the synthetic task, the media settings or the model layout change (the test then fails loudly).
Thread counts change float summation order, so a rerun gives a similar model, not the same bytes.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parent / "seeing_tiny"


def main() -> int:
    from videocom_fast.demo import CONFIGS
    from videocom_fast.training.perception import warm_up
    from videocom_fast.training.scenes import sft_on_scenes

    media = yaml.safe_load((CONFIGS / "sft_tiny.yaml").read_text())["media"]
    with tempfile.TemporaryDirectory() as tmp:
        warm = warm_up("tiny", Path(tmp) / "perceive", media=media, steps=300, crops=64, char_weight=1.0, seed=0)
        sft_on_scenes(Path(tmp) / "perceive", Path(tmp) / "sft1", media=media, steps=400, lr=3e-3, seed=0)
        sft = sft_on_scenes(Path(tmp) / "sft1", Path(tmp) / "sft", media=media, steps=500, lr=2e-3, seed=0)
        if OUT.exists():
            shutil.rmtree(OUT)
        shutil.copytree(Path(tmp) / "sft", OUT)
    (OUT / "rebuilt.json").write_text(json.dumps({"perception_held_out": warm["held_out"],
                                                  "sft_last": sft["history"][-1]}, indent=1))
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
