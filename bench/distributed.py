"""Data-parallel training under torchrun (DistributedDataParallel), on one machine or many.

`init_from_env()` is the one place that reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); the
rest of the suite asks `rank()` / `world_size()`. Without torchrun everything is a single process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


_local_rank = 0


def init_from_env(device: str = "auto") -> int:
    """Join the process group torchrun set up (if any); return the local rank (0 without torchrun)."""
    global _local_rank
    _local_rank = local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return local_rank
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return local_rank


def local_rank() -> int:
    return _local_rank


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def average_(tensors: list[torch.Tensor]) -> None:
    """Replace every tensor by its mean over the ranks, in place (SUM then divide: gloo has no AVG)."""
    if not is_distributed():
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world_size())


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ShardSampler(Sampler):
    """Evaluation sharding without padding: rank r takes examples r, r + W, r + 2W, ... so the sums
    all-reduced over ranks count every example exactly once (DistributedSampler pads with duplicates)."""

    def __init__(self, n: int, rank_: int | None = None, world: int | None = None):
        self.n, self.rank, self.world = n, rank() if rank_ is None else rank_, world_size() if world is None else world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank (the object itself without torchrun)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
