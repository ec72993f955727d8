"""`videocom-fast demo --fast`: the whole pipeline runs end to end and its report shows the real episodes."""
import json
import re

import pytest


@pytest.mark.slow
def test_demo_fast_end_to_end(tmp_path):
    from videocom_fast.demo import run_demo

    summary = run_demo(tmp_path / "demo", fast=True)
    run = tmp_path / "demo"
    assert summary["sft_final_loss"] < summary["sft_first_loss"]
    assert summary["rollout_tokens_per_s"] > 0 and 0 <= summary["rollout_fraction_outside_model"] < 1
    assert json.loads((run / "summary.json").read_text()) == summary
    # every accuracy the demo prints is a measured mean over the held-out episodes (the fast sizes are far
    # too small to learn: the values are not asserted, their provenance is)
    ablation = json.loads((run / "ablation.json").read_text())
    n = summary["held_out_samples"]
    for row, key in (("full", "accuracy_after_sft"), ("blank_all", "accuracy_after_sft_observations_black"),
                     ("blank_zoom", "accuracy_after_sft_zoom_black")):
        per = ablation[row]["accuracy_per_episode"]
        assert len(per) == n and summary[key] == ablation[row]["accuracy_mean"] == pytest.approx(sum(per) / n)
    for key in ("accuracy_before_sft", "accuracy_after_grpo"):
        assert 0 <= summary[key] <= 1
    for d in ("perceive", "sft", "grpo"):                   # each stage saved a loadable model
        assert (run / d / "config.json").exists(), d
    # the report's SFT curve covers both SFT stages, in order
    from videocom_fast.demo import SIZES

    steps = [json.loads(x)["step"] for x in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 1 and steps[-1] == sum(SIZES["fast"]["sft_steps"]) and steps == sorted(set(steps))
    # the episodes in the report are the rollouts the demo ran: same count, same round texts
    records = [json.loads(x) for x in (run / "trajectories_rollout.jsonl").read_text().splitlines()]
    assert len(records) == 8 * 4  # G = 8 rollouts of 4 prompts
    html = (run / "report.html").read_text()
    assert len(re.findall(r'class="traj"', html)) >= 16
    texts = [r["rounds"][0]["text"] for r in records if r["rounds"]]
    assert texts and any(t and t[:20] in html for t in texts)
    assert len(re.findall(r'class="curve"', html)) == 3  # SFT loss, GRPO reward and GRPO KL curves
