"""The SFT trainer: it learns, trains exactly what it should, exports a loadable model, logs metrics;
config parsing; schedule; gradient accumulation equals one big batch; LoRA."""
import json

import pytest
import torch

from fixtures_sft import CONFIG, synth_small  # noqa: F401
from videocom_fast.training.config import load_config, parse_overrides
from videocom_fast.training.metrics import read_metrics
from videocom_fast.training.sft import SFTConfig, cosine_with_warmup, main, run_sft


def small_cfg(data, out, **kw):
    base = dict(data=str(data / "sft.json"), output_dir=str(out), progress=False, tensorboard=False,
                micro_batch_tokens=1600, max_steps=4, lr=2e-3, warmup_ratio=0.0, save_final=False)
    return load_config(SFTConfig, CONFIG, **{**base, **kw})


def _params(model_dir):
    from videocom_fast.models import load
    m, _ = load(model_dir)
    return dict(m.named_parameters())


def test_config_overrides_and_errors(tmp_path):
    assert parse_overrides(["a.b=1", "lr=3e-4", "x=[1, 2]", "f=true"]) == \
        {"a": {"b": 1}, "lr": 3e-4, "x": [1, 2], "f": True}
    cfg = load_config(SFTConfig, CONFIG, ["lr=0.5", "media.main_nframes=4"])
    assert cfg.lr == 0.5 and cfg.media["main_nframes"] == 4 and cfg.media["rewatch_nframes"] == 4
    with pytest.raises(ValueError, match="unknown keys \\['lrr'\\]"):
        load_config(SFTConfig, CONFIG, ["lrr=1"])
    with pytest.raises(ValueError, match="overrides\\[0\\]"):
        parse_overrides(["novalue"])
    with pytest.raises(ValueError, match="not found"):
        load_config(SFTConfig, tmp_path / "missing.yaml")


def test_cosine_schedule_with_warmup_formula():
    import math
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = cosine_with_warmup(opt, total_steps=37, warmup_ratio=0.1)
    warm = math.ceil(0.1 * 37)
    for step in range(37):
        want = 0.1 * (step / warm if step < warm else
                      0.5 * (1 + math.cos(math.pi * (step - warm) / (37 - warm))))
        assert opt.param_groups[0]["lr"] == pytest.approx(want, abs=1e-12)
        opt.step()
        sched.step()


@pytest.mark.slow
def test_sft_learns_trains_the_right_parameters_and_exports(synth_small, tmp_path):  # noqa: F811
    data, _ = synth_small
    out = tmp_path / "run"
    res = run_sft(small_cfg(data, out, max_steps=12, save_final=True, tensorboard=True, eval_fraction=0.2))
    assert res["losses"][-1] < 0.6 * res["losses"][0]
    before, after = _params(out / "_base"), _params(out)   # from_pretrained(out) loads the result
    for name, p in after.items():
        changed = not torch.equal(p, before[name])
        frozen = ".visual." in f".{name}" or name.startswith("model.visual")
        assert changed != frozen, name   # every LLM parameter moved, the vision tower and merger did not
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "visual_tokens_per_s"):
        assert all(r[key] == r[key] and r[key] >= 0 for r in recs if "loss" in r), key
    assert any((out / "tb").iterdir())
    assert "eval_loss" in res and res["num_eval"] == 1
    from transformers import AutoProcessor
    AutoProcessor.from_pretrained(out)


@pytest.mark.slow
def test_grad_accum_equals_one_packed_batch(synth_small, tmp_path):  # noqa: F811
    """4 micro-batches of one example accumulated == the same 4 examples packed into one micro-batch
    (token-sum loss normalised by the step's trained tokens; attention never crosses examples). Two
    steps, so the second loss also checks the first update (AdamW's m/sqrt(v) sees gradient magnitudes)."""
    data, _ = synth_small
    common = dict(max_steps=2, max_samples=4, shuffle=False, dtype="float64", max_grad_norm=1e9, eval_fraction=0.0,
                  save_final=True)
    res_a = run_sft(small_cfg(data, tmp_path / "a", micro_batch_tokens=100000, grad_accum=1, **common))
    res_b = run_sft(small_cfg(data, tmp_path / "b", micro_batch_tokens=1, grad_accum=4, **common))
    # fp32 tolerances although the model is float64: modeling.chunked_token_logprobs upcasts with .float()
    assert res_a["losses"] == pytest.approx(res_b["losses"], rel=1e-6)
    pa, pb = _params(tmp_path / "a"), _params(tmp_path / "b")
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_lora_trains_only_adapters_and_exports_merged(synth_small, tmp_path):  # noqa: F811
    data, _ = synth_small
    out = tmp_path / "lora"
    res = run_sft(small_cfg(data, out, max_steps=3, save_final=True, lora={"r": 4, "alpha": 8},
                            gradient_checkpointing=True))
    assert len(res["losses"]) == 3
    before, after = _params(out / "_base"), _params(out)
    assert set(before) == set(after)  # merged: plain Qwen2.5-VL parameter names
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed and all(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                       "gate_proj.weight", "up_proj.weight", "down_proj.weight"))
                           and "language_model" in n for n in changed)


def test_cli_main_runs(synth_small, tmp_path):  # noqa: F811
    data, _ = synth_small
    rc = main(["--config", str(CONFIG), f"data={data / 'sft.json'}", f"output_dir={tmp_path / 'cli'}",
               "max_steps=1", "progress=false", "tensorboard=false", "micro_batch_tokens=1600"])
    assert rc == 0
    res = json.loads((tmp_path / "cli" / "sft_result.json").read_text())
    assert res["steps"] == 1 and len(res["losses"]) == 1
    assert (tmp_path / "cli" / "config.json").exists()
