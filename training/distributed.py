"""Process-group setup shared by the trainers (torchrun / deepspeed launchers set the env variables).

    info = init_distributed()          # DistInfo(rank, world_size, local_rank), a no-op for one process
    total = all_reduce_sum(torch.tensor(n))
gloo on CPU, nccl on GPU. With one process nothing is initialised and the helpers are identities.
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

    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
    return x


def barrier():
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()
