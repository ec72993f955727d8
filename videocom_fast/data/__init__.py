"""Video-CoM data: the SFT/GRPO JSON schema (`schema.py`) and the synthetic default dataset (`synth.py`)."""


def load_samples(path, kind: str = "sft", **kwargs):
    from .schema import load_samples as _load
    return _load(path, kind=kind, **kwargs)


def synthesize(out_dir, num_samples: int = 64, seed: int = 0, **kwargs):
    from .synth import synthesize as _synth
    return _synth(out_dir, num_samples=num_samples, seed=seed, **kwargs)
