"""Checkpoints: atomic writes, a run killed mid-save resumes from the last complete checkpoint, and a
resumed run's next losses equal those of an uninterrupted run (fp32, CPU)."""
import pytest
import torch

from fixtures_sft import CONFIG, synth_small  # noqa: F401
from videocom_fast.training import checkpoint as ck
from videocom_fast.training.config import load_config
from videocom_fast.training.sft import SFTConfig, run_sft


def test_atomic_save_and_crash_leaves_previous(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    p1 = ck.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, state={"pos": 7})
    w1 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    for point in ("model_state.pt", "optimizer.pt@2", "rng.pt", "state.json"):
        ck.crash_points.add(point)
        try:
            with pytest.raises(RuntimeError, match="simulated crash"):
                ck.save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
        finally:
            ck.crash_points.discard(point)
        assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())   # the partial write exists...
        assert ck.latest_checkpoint(tmp_path) == p1                           # ...but is never picked
        assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())  # and is cleaned up
    torch.manual_seed(123)
    want_next = torch.rand(3)
    st = ck.load_checkpoint(p1, model=model, optimizer=opt, scheduler=sched)
    assert st == {"step": 1, "pos": 7}
    assert torch.equal(model.weight, w1)
    torch.manual_seed(0)
    st = ck.load_checkpoint(p1, model=model, optimizer=opt)  # RNG restored to the state at save time
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), want_next)
    (p1 / "COMPLETE").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        ck.load_checkpoint(p1, model=model)


def test_keep_last(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 6):
        ck.save_checkpoint(tmp_path, step, model=model, optimizer=opt, keep_last=2)
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["checkpoint-0000004", "checkpoint-0000005"]


def _cfg(data, out, **kw):
    base = dict(data=str(data / "sft.json"), output_dir=str(out), progress=False, tensorboard=False,
                micro_batch_tokens=1, max_steps=7, lr=2e-3, warmup_ratio=0.3, save_final=False,
                max_samples=3, grad_accum=1, eval_fraction=0.0)
    return load_config(SFTConfig, CONFIG, **{**base, **kw})


@pytest.mark.slow
def test_resume_after_crash_gives_identical_losses(synth_small, tmp_path):  # noqa: F811
    data, _ = synth_small
    # 3 examples, one per micro-batch -> 3 steps per epoch: the run crosses epochs (data position matters)
    want = run_sft(_cfg(data, tmp_path / "full"))["losses"]
    ck.crash_points.add("optimizer.pt@4")   # killed while writing the step-4 checkpoint
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_sft(_cfg(data, tmp_path / "crash", save_every=2))
    finally:
        ck.crash_points.discard("optimizer.pt@4")
    assert ck.latest_checkpoint(tmp_path / "crash", clean_tmp=False).name == "checkpoint-0000002"
    torch.manual_seed(999)  # a different ambient RNG must not matter: the checkpoint restores it
    got = run_sft(_cfg(data, tmp_path / "crash", save_every=2, resume=True))["losses"]
    assert len(got) == len(want) == 7
    assert got == want   # bitwise: same data order, weights, optimizer moments, schedule and RNG
