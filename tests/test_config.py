"""Training configs fail fast and say where: values are converted by field type (YAML 1.1's `1e-5` string,
`ture`), a YAML syntax error names the file, packaged configs load by name from any directory, and a
model directory that does not exist is reported at once."""
import time
from pathlib import Path

import pytest

from videocom_fast.training.config import load_config, packaged_configs
from videocom_fast.training.grpo import GRPOConfig
from videocom_fast.training.sft import SFTConfig


def test_yaml_exponent_is_a_float(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 1e-5\nweight_decay: 0\nmax_grad_norm: 2\nadam_betas: [0.9, 1e-3]\n")
    cfg = load_config(SFTConfig, cfg_file)
    # YAML 1.1 reads 1e-5 (no dot) as a string; Adam failed on it after the model had loaded
    assert type(cfg.lr) is float and cfg.lr == 1e-5
    assert type(cfg.weight_decay) is float and type(cfg.max_grad_norm) is float
    assert cfg.adam_betas == (0.9, 1e-3) and all(type(b) is float for b in cfg.adam_betas)


@pytest.mark.parametrize("override, key", [("freeze_vision=ture", "freeze_vision"), ("max_steps=1.5", "max_steps"),
                                           ("lr=fast", "lr"), ("media=3", "media"), ("progress=1", "progress"),
                                           ("media.main_nframes=0", "media.main_nframes"),
                                           ("media.nframes=8", "media.nframes"), ("model=[1]", "model")])
def test_bad_value_names_the_key_and_the_command_line(override, key):
    with pytest.raises(ValueError) as e:
        load_config(SFTConfig, "sft_tiny", [override])
    assert key in str(e.value) and "command line" in str(e.value)


def test_bad_value_in_a_file_names_the_file(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("freeze_vision: ture\n")
    with pytest.raises(ValueError, match=r"mine\.yaml.*freeze_vision: expected true or false, got 'ture'"):
        load_config(SFTConfig, f)


def test_yaml_syntax_error_names_the_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("lr: 0.1\nmedia: {main_nframes: 8\nseed: 1\n")
    with pytest.raises(ValueError, match=r"broken\.yaml.*not valid YAML.*line"):
        load_config(SFTConfig, f)


def test_integral_and_optional_values_convert():
    cfg = load_config(GRPOConfig, "grpo_tiny", ["max_steps=2.0", "delta=null", "max_new_tokens=7"])
    assert cfg.max_steps == 2 and type(cfg.max_steps) is int and cfg.delta is None and cfg.max_new_tokens == 7
    assert load_config(GRPOConfig, None, ["delta=1.5"]).delta == 1.5


def test_packaged_configs_load_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pkg = packaged_configs()
    assert pkg.parent.name == "videocom_fast" and (pkg / "sft_tiny.yaml").is_file()
    for name in ("sft_tiny", "sft_tiny.yaml", "configs/sft_tiny.yaml"):
        assert load_config(SFTConfig, name).media["image_max_pixels"] == 16 * 28 * 28
    assert load_config(GRPOConfig, "grpo_tiny").model == "runs/sft"   # where sft_tiny writes
    assert load_config(SFTConfig, "sft_tiny").output_dir == "runs/sft"
    with pytest.raises(ValueError, match=r"'nope' not found.*\['grpo_7b', 'grpo_tiny', 'sft_tiny'\]"):
        load_config(SFTConfig, "nope")


def test_missing_model_directory_fails_at_once(tmp_path):
    from videocom_fast.evaluate import _engine
    from videocom_fast.training.sft import build_model

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="does not exist"):
        build_model(SFTConfig(model=str(tmp_path / "runs" / "sft")), device=None)
    with pytest.raises(ValueError, match="does not exist"):
        _engine(tmp_path / "nope", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        _engine(tmp_path / "empty", None)
    # the Hub fallback retried for minutes; a local check answers in well under a second (loose bound)
    assert time.perf_counter() - t0 < 30


def test_num_generations_zero_is_refused_before_a_model_loads(tmp_path):
    from videocom_fast.training.grpo import run_grpo

    cfg = load_config(GRPOConfig, "grpo_tiny", ["num_generations=0", f"model={tmp_path / 'none'}",
                                                 f"data={tmp_path / 'none.json'}"])
    with pytest.raises(ValueError, match="num_generations"):
        run_grpo(cfg)


def test_config_files_are_the_packaged_ones():
    """configs/ at the top of the repository and videocom_fast/configs are the same files (one copy)."""
    top = Path(__file__).resolve().parents[1] / "configs"
    assert sorted(p.name for p in top.glob("*.yaml")) == sorted(p.name for p in packaged_configs().glob("*.yaml"))
    assert (top / "sft_tiny.yaml").resolve() == (packaged_configs() / "sft_tiny.yaml").resolve()
