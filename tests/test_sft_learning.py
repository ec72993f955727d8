"""It must learn: the tiny model fitted by SFT (configs/sft_tiny.yaml on the synthesized data) halves its
loss, and at least 70% of its greedy episodes on held-out samples are well-formed (format reward 1) and
use manipulations, run by the naive loop of training/sft_eval.py (fresh `generate` per round)."""
import pytest

from videocom_fast.training.sft_eval import run_episodes


@pytest.mark.slow
def test_sft_loss_halves(sft_tiny_model):
    losses = sft_tiny_model.result["losses"]
    assert losses[-1] <= 0.5 * losses[0], (losses[0], losses[-1])
    assert sft_tiny_model.result["eval_loss"] <= 0.5 * losses[0]


@pytest.mark.slow
def test_greedy_episodes_are_well_formed_and_use_manipulations(sft_tiny_model):
    model, processor = sft_tiny_model.load()
    samples = sft_tiny_model.samples("eval")
    # one episode must not move the rate by more than ~6 points, or the 70% bound measures luck
    assert len(samples) >= 16, len(samples)
    summary = run_episodes(model, processor, samples, sft_tiny_model.media_config, max_new_tokens=48)
    detail = [(e["rounds"], e["reasons"]) for e in summary["episodes"] if not (e["well_formed"] and
                                                                              e["uses_manipulations"])]
    # Issue 5's bound. Measured on the fixture's data (per-sample text, 24 s videos; docs/sft_curve.md,
    # session 10): 0.79-0.96 over training seeds 0-3 and under AVX2 rounding. On the demo's synth defaults
    # (one prompt text for all samples) the 24 episodes were copies of one chain: 0.29-1.00, CI saw 0.625.
    assert summary["good"] >= 0.7, detail
    assert summary["uses_manipulations"] >= 0.9, detail


def test_model_kwargs_size_the_tiny_model_and_leave_the_default(tmp_path):
    # The SFT config's capacity knob (model_kwargs -> build_tiny sizes); build_tiny() without sizes, which
    # ~all other tests use, must stay the 2-layer hidden-128 model.
    import torch

    from videocom_fast.models import TINY_TEXT, build_tiny, load
    from videocom_fast.training.sft import SFTConfig, build_model

    model, _ = build_model(SFTConfig(model_kwargs={"hidden_size": 256, "num_hidden_layers": 3},
                                     output_dir=str(tmp_path / "big"), dtype="float32"), torch.device("cpu"))
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size) == (256, 3, 8, 4, 512)
    assert model.config.vision_config.out_hidden_size == 256 and len(model.model.language_model.layers) == 3
    ids = torch.randint(0, 600, (1, 7))
    assert model(input_ids=ids).logits.shape == (1, 7, text.vocab_size)

    small, _ = load(build_tiny(tmp_path / "default", seed=0))
    t = small.config.text_config
    assert {k: getattr(t, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                       "num_key_value_heads", "intermediate_size")} == {
        k: TINY_TEXT[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "intermediate_size")}
    with pytest.raises(ValueError, match="model_kwargs"):
        build_model(SFTConfig(model=str(tmp_path / "default"), model_kwargs={"hidden_size": 256},
                              output_dir=str(tmp_path / "x")), torch.device("cpu"))
    for bad, name in (({"hidden_size": 200}, "hidden_size"), ({"num_layers": 3}, "num_layers"),
                      ({"num_hidden_layers": 0}, "num_hidden_layers"),
                      ({"num_attention_heads": 3}, "num_attention_heads")):
        with pytest.raises(ValueError, match=name):
            build_tiny(tmp_path / "bad", **bad)
