"""Fixtures of the SFT helper: a small synthesized dataset, a tiny random model, and `sft_tiny_model`.

`sft_tiny_model` (session scope) is the tiny Qwen2.5-VL fitted by the real SFT trainer on the synthesized
data with configs/sft_tiny.yaml; other tests (rollout engine, GRPO) start from it. It is cached on disk
under .cache/sft_tiny/<key>, where the key hashes the config file and the source of every module that
shapes the result (data synthesis, tokenization, media, model, trainer) plus the sample counts, so reruns
reuse it and a code change retrains it (about 2 minutes on 2 cores: 1 to synthesize 136 samples, 1 to
train). A file lock keeps parallel test sessions from training it twice. Import into conftest.py with
`from fixtures_sft import *`.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "sft_tiny.yaml"
_SOURCES = ["videocom_fast/data/synth.py", "videocom_fast/env.py", "videocom_fast/models.py",
            "videocom_fast/chat.py", "videocom_fast/mrope.py", "videocom_fast/modeling.py",
            "training/sft.py", "training/sft_data.py", "training/packing.py", "training/config.py"]
# 112 training samples (SFT holds out the last 11 for its eval loss) and 24 held-out samples (eval.json) for
# greedy episodes: 8 episodes were too few to measure a rate (one episode = 12.5 points); docs/sft_curve.md
NUM_SAMPLES, NUM_EVAL = 136, 24
# Text that varies per sample (shuffled options, character and colour questions) and 24 s videos (two-digit
# frame numbers). With the demo's defaults (the same prompt text for every sample, 40 s videos whose frame
# numbers are 21 / 61 / 101 / 141) the 24 held-out episodes were near copies of ONE greedy chain: the
# well-formed rate was 0.29-1.00 depending on the training seed and the CPU's float rounding (docs/sft_curve.md,
# session 10), so CI failed on a machine where this one passed.
SYNTH_KWARGS = dict(shuffle_options=True, colour_questions=True, seconds=(24, 24))


@dataclass
class FittedModel:
    path: Path                 # from_pretrained-loadable model + processor
    data_dir: Path             # synthesized data (sft.json, grpo.json, eval.json, videos/)
    media_config: object       # videocom_fast.env.MediaConfig the data and the model use
    result: dict               # run_sft's result (losses, eval_loss, ...)

    def load(self, dtype=None):
        from videocom_fast.models import load
        return load(self.path, dtype=dtype)

    def samples(self, split: str = "eval") -> list[dict]:
        """GRPO-format samples of `split` ("grpo" = train, "eval") with absolute video paths."""
        samples = json.loads((self.data_dir / f"{split}.json").read_text())
        for s in samples:
            s["video"] = str(self.data_dir / s["video"])
        return samples


def cache_key() -> str:
    h = hashlib.sha256(CONFIG.read_bytes() + f"{NUM_SAMPLES},{NUM_EVAL},{sorted(SYNTH_KWARGS.items())}".encode())
    for rel in _SOURCES:
        p = ROOT / rel
        h.update(rel.encode() + (p.read_bytes() if p.exists() else b"missing"))
    return h.hexdigest()[:16]


def media_config_of(cfg):
    from videocom_fast.env import MediaConfig
    return MediaConfig(**cfg.media)


def build_fitted_tiny(root: Path | None = None) -> FittedModel:
    from videocom_fast.training.config import load_config
    from videocom_fast.training.sft import SFTConfig, run_sft
    from videocom_fast.data import synthesize

    base = (root or ROOT / ".cache" / "sft_tiny") / cache_key()
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cfg = load_config(SFTConfig, CONFIG, progress=False, tensorboard=False)
        mc = media_config_of(cfg)
        data, model_dir = base / "data", base / "model"
        if not (data / "sft.json").exists():
            shutil.rmtree(data, ignore_errors=True)
            synthesize(data, num_samples=NUM_SAMPLES, seed=0, media_config=mc, num_eval=NUM_EVAL,
                       **SYNTH_KWARGS)
        done = model_dir / "sft_result.json"
        if not done.exists():
            shutil.rmtree(model_dir, ignore_errors=True)
            cfg = load_config(SFTConfig, CONFIG, progress=False, tensorboard=False, data=str(data / "sft.json"),
                              output_dir=str(model_dir), save_every=0)
            run_sft(cfg)
        return FittedModel(model_dir, data, mc, json.loads(done.read_text()))


@pytest.fixture(scope="session")
def sft_tiny_model() -> FittedModel:
    return build_fitted_tiny()


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory):
    """A few synthesized samples with the tiny config's media limits: (data_dir, media_config)."""
    from videocom_fast.training.config import load_config
    from videocom_fast.training.sft import SFTConfig
    from videocom_fast.data import synthesize

    cfg = load_config(SFTConfig, CONFIG)
    d = tmp_path_factory.mktemp("synth_small")
    mc = media_config_of(cfg)
    synthesize(d, num_samples=5, seed=1, media_config=mc, seconds=(25, 32), workers=1)
    return d, mc


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from videocom_fast.models import build_tiny
    return build_tiny(tmp_path_factory.mktemp("tiny_sft"), seed=0)
