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
    # the episodes in the report are the rollouts the demo ran: same count, same round texts
    records = [json.loads(x) for x in (run / "trajectories_rollout.jsonl").read_text().splitlines()]
    assert len(records) == 8 * 4  # G = 8 rollouts of 4 prompts
    html = (run / "report.html").read_text()
    assert len(re.findall(r'class="traj"', html)) >= 16
    texts = [r["rounds"][0]["text"] for r in records if r["rounds"]]
    assert texts and any(t and t[:20] in html for t in texts)
    assert len(re.findall(r'class="curve"', html)) == 3  # SFT loss, GRPO reward and GRPO KL curves
