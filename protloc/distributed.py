"""Many GPUs or nodes through PyTorch's own engine: torchrun + DDP.

`torchrun --nproc-per-node N -m protloc -- pretrain ...` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK and a rendezvous in the environment; each process joins the group here (NCCL on
GPUs, gloo on CPU). A plain `protloc pretrain` is a world of one and touches none of this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from protloc.device import resolve_device
from protloc.errors import ProtlocError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device_spec: str = "auto") -> World:
    """Join the torchrun process group when launched by torchrun; otherwise a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1, resolve_device(device_spec))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ProtlocError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank, size, device)


def close(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_float(world: World, value: float) -> list[float]:
    """Every rank's value of a scalar, in rank order."""
    if world.size == 1:
        return [value]
    t = torch.tensor([value], dtype=torch.float64, device=world.device)
    out = [torch.zeros_like(t) for _ in range(world.size)]
    dist.all_gather(out, t)
    return [float(x) for x in out]

