"""Multi-process training through torchrun and DistributedDataParallel.

``semodel train`` joins a process group when torchrun (or ``--nproc``) started it, i.e. when
``WORLD_SIZE`` is in the environment: backend nccl on CUDA, gloo on CPU. Rank 0 writes the run
folder; every rank trains on its own shard of each epoch and evaluates its shard of the
validation set, and the predictions are gathered so that metrics cover the whole set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from semodel.errors import SemodelError


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device_name: str) -> World:
    """Join the process group that torchrun set up (no-op for a single process)."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) < 2:
        return World()
    if dist.is_initialized():
        return World(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    if use_cuda:
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise SemodelError(
                f"process {local_rank} on this machine has no GPU of its own "
                f"({gpus} visible): start at most one process per GPU"
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    return World(dist.get_rank(), local_rank, dist.get_world_size())


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, world: World) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank if ``flag`` is true on any (e.g. one rank got Ctrl-C)."""
    if not world.distributed:
        return flag
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_buffers(module: torch.nn.Module, world: World) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP copies rank 0's buffers to the others at the start of each forward pass, so after an
    epoch's last step every rank holds statistics updated by its own last batch. Called before
    validation, so that every rank evaluates (and ends with) the weights that rank 0 saves.
    """
    if world.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
