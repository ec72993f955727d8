"""Process-group setup shared by the trainers (torchrun / deepspeed launchers set the env variables).

    info = init_distributed()          # DistInfo(rank, world_size, local_rank), a no-op for one process
    total = all_reduce_sum(torch.tensor(n))
gloo on CPU, nccl on GPU. With one process nothing is initialised and the helpers are identities.

Device rules (each one is a crash at the first multi-GPU run otherwise):
- NCCL needs every rank on its own GPU before the group exists: `torch.cuda.set_device(local_rank)` first,
  or every rank's collectives and `torch.device("cuda")` land on GPU 0.
- NCCL reduces only CUDA tensors. The trainers' counters (token totals, reward sums) are host tensors, so
  `all_reduce_sum` moves its input to `collective_device()` (the rank's GPU under NCCL, the host under gloo),
  reduces there, and hands the result back on the input's device: one host round trip per call, the
  documented sync of a reduction whose value the host needs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)   # NOTE: before the group: NCCL binds each rank to this GPU
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """Where the process group reduces: this rank's GPU under NCCL (set by init_distributed), else the host."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks, on `x`'s device (reduced on `collective_device()`, which NCCL requires)."""
    return _all_reduce(x, "SUM")


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Elementwise max of `x` over ranks, on `x`'s device."""
    return _all_reduce(x, "MAX")


def _all_reduce(x: torch.Tensor, op: str) -> torch.Tensor:
    if is_distributed():
        import torch.distributed as dist

        y = x.to(collective_device(), copy=True)
        dist.all_reduce(y, op=getattr(dist.ReduceOp, op))
        x = y.to(x.device)
    return x


def barrier():
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()
