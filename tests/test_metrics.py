"""metrics.jsonl across a kill and `--resume`: every step appears once (the killed run's rows after its last
checkpoint are dropped when the checkpoint is loaded, then logged again by the resumed run)."""
import json

import pytest
import torch

from fixtures_sft import synth_small  # noqa: F401
from videocom_fast.training import checkpoint as ck
from videocom_fast.training.metrics import MetricsLogger, read_metrics, rewind_metrics


def _steps(out):
    return [r["step"] for r in read_metrics(out / "metrics.jsonl")]


def test_loading_a_checkpoint_rewinds_the_metrics(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 7):              # the killed run: checkpoint at 3, logged up to 6
        log.log(step, {"loss": 1.0 / step})
        if step == 3:
            ck.save_checkpoint(tmp_path, step, model=model, optimizer=opt)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')           # killed mid-write
    state = ck.load_checkpoint(ck.latest_checkpoint(tmp_path), model=model, optimizer=opt)
    assert _steps(tmp_path) == [1, 2, 3]
    log = MetricsLogger(tmp_path, tensorboard=False, append=True)
    for step in range(state["step"] + 1, 8):
        log.log(step, {"loss": 1.0 / step})
    log.close()
    assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6, 7]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_rewind_keeps_what_it_cannot_place(tmp_path):
    assert rewind_metrics(tmp_path, 3) == 0           # no file: nothing to do
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 1}, {"step": 2, "eval_loss": 0.5}, {"step": 5}, {"note": "no step"}]) + "\n")
    assert rewind_metrics(tmp_path, 2) == 1
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1}, {"step": 2, "eval_loss": 0.5},
                                                         {"note": "no step"}]


@pytest.mark.slow
def test_sft_resume_after_kill_logs_each_step_once(synth_small, tmp_path):  # noqa: F811
    from test_checkpoint import _cfg
    from videocom_fast.training.sft import run_sft

    data, _ = synth_small
    ck.crash_points.add("optimizer.pt@4")    # killed while writing the step-4 checkpoint (steps 1-4 logged)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_sft(_cfg(data, tmp_path, save_every=2))
    finally:
        ck.crash_points.discard("optimizer.pt@4")
    assert _steps(tmp_path)[-1] == 4
    run_sft(_cfg(data, tmp_path, save_every=2, resume=True))
    steps = _steps(tmp_path)
    train = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert train == list(range(1, 8)), steps
