"""Multi-GPU setup without GPUs (issue 14, finding 7): the NCCL group is created after
`torch.cuda.set_device(local_rank)`, and every tensor handed to `all_reduce` is on the rank's device (NCCL
rejects host tensors), checked with a fake process group on the stand-in device (the trainers' host counters
go there and come back; GRPO's update reduces its token total and micro-batch count that way)."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as tdist

from videocom_fast.testing.standin import StandIn
from videocom_fast.training import distributed

from test_standin_training import _trajs, tiny  # noqa: F401  (the tiny model fixture)


def test_nccl_group_is_created_after_set_device(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(tdist, "get_rank", lambda: 3)
    monkeypatch.setattr(tdist, "get_world_size", lambda: 4)
    info = distributed.init_distributed()
    assert calls == [("set_device", 1), ("init", "nccl")]
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1)
    calls.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    distributed.init_distributed()
    assert calls == [("init", "gloo")]                      # no GPU: gloo, and no set_device


def test_collective_device_is_the_ranks_gpu_under_nccl(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(tdist, "get_backend", lambda: "nccl")
    assert distributed.collective_device() == torch.device("cuda", 1)
    monkeypatch.setattr(tdist, "get_backend", lambda: "gloo")
    assert distributed.collective_device() == torch.device("cpu")


@pytest.fixture
def two_ranks(monkeypatch):
    """A fake 2-rank group on the stand-in device (entered by the test): all_reduce accepts only device
    tensors (as NCCL does) and reduces as if the other rank held the same values."""
    dev = StandIn()
    seen = []

    def all_reduce(x, op=tdist.ReduceOp.SUM):
        seen.append(x.device)
        if x.device.type != "meta":
            raise RuntimeError(f"NCCL: tensors must be on the GPU, got {x.device}")
        if op == tdist.ReduceOp.SUM:
            x.mul_(2)

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "collective_device", lambda: dev.device, raising=False)
    monkeypatch.setattr(tdist, "all_reduce", all_reduce)
    return dev, seen


def test_all_reduce_runs_on_the_device_and_returns_where_it_came_from(two_ranks):
    dev, seen = two_ranks
    dev.__enter__()
    host = torch.tensor([3.0, 4.5], dtype=torch.float64)
    out = distributed.all_reduce_sum(host)
    assert out.device.type == "cpu" and out.tolist() == [6.0, 9.0] and host.tolist() == [3.0, 4.5]
    assert dev.num_syncs("d2h") == 1, dev.report()          # the documented round trip of a host counter
    on_dev = distributed.all_reduce_max(dev.put(torch.tensor([7])))
    assert on_dev.device == dev.device and dev.value(on_dev).tolist() == [7]
    dev.__exit__(None, None, None)
    assert seen == [dev.device, dev.device]


def test_grpo_update_reduces_on_the_models_device(tiny, two_ranks, monkeypatch):  # noqa: F811
    from videocom_fast.training.grpo import GRPOConfig, policy_update
    from videocom_fast.training.logprobs import media_embeds
    dev, seen = two_ranks
    model, proc = tiny
    trajs = _trajs(proc, 3)
    adv = torch.randn(3)
    cfg = GRPOConfig(loss_type="dapo", micro_batch=2, micro_batch_tokens=0, beta=0.0)
    monkeypatch.setattr(distributed, "is_distributed", lambda: False)     # one process, for the reference
    cpu = copy.deepcopy(model)
    with torch.no_grad():
        cpu_embeds = [media_embeds(cpu, t) for t in trajs]
    ref = policy_update(cpu, trajs, adv, cpu_embeds, None, None, cfg, world=1)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    with dev:
        policy = dev.put(copy.deepcopy(model))
        with torch.no_grad():
            embeds = [media_embeds(policy, t) for t in trajs]
        stats = policy_update(policy, trajs, adv, embeds, None, None, cfg, world=2)
    assert len(seen) == 2 and all(d == dev.device for d in seen), seen    # token total, micro-batch count
    # dapo: every micro-batch divides by the global token count / world; two identical ranks double the
    # count and world=2 halves it back, so each rank's loss equals the one-process loss
    assert stats["loss"] == pytest.approx(ref["loss"], rel=1e-5)
