"""Data-parallel training under torchrun (DistributedDataParallel), on one machine or many.

`init_from_env()` is the one place that reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); the
rest of the suite asks `rank()` / `world_size()`. Without torchrun everything is a single process.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from bench.errors import UserError

_local_rank = 0
_cuda_index: int | None = None  # the CUDA device init_from_env chose (None: it chose none)

# The process group's timeout, for its rendezvous and every collective after it. NCCL's default (10 minutes)
# is too short for a first collective that waits while rank 0 downloads or prepares a dataset, or for a slow
# node of a multi-node job: the other ranks would be killed though nothing hangs.
GROUP_TIMEOUT = timedelta(minutes=60)


def init_from_env(device: str = "auto") -> int:
    """Join the process group torchrun set up (if any); return the local rank (0 without torchrun)."""
    global _local_rank, _cuda_index
    _local_rank = local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return local_rank
    _cuda_index = None
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return local_rank
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        _cuda_index = choose_cuda_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(_cuda_index)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=GROUP_TIMEOUT)
    return local_rank


def choose_cuda_index(local_rank_: int, count: int) -> int:
    """The CUDA index of the process with this LOCAL_RANK among `count` visible GPUs: its own when it sees
    all of the node's GPUs (torchrun, SLURM without binding); the one there is where SLURM binds one GPU per
    task (--gpu-bind, --gpus-per-task: LOCAL_RANK 3 sees only its GPU, as cuda:0)."""
    if local_rank_ < count:
        return local_rank_
    if count == 1:
        return 0
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"{count} GPUs (cuda:0-cuda:{count - 1})" if count else "no GPU"
    raise UserError(f"LOCAL_RANK {local_rank_} but this process sees {seen}"
                    + (f" with CUDA_VISIBLE_DEVICES={mask}" if mask is not None else "")
                    + "; start at most one process per visible GPU, or give each process exactly one GPU")


def cuda_index() -> int | None:
    """The CUDA index this process trains on (`torch.device("cuda", cuda_index())`), None without CUDA: the one
    init_from_env chose, else as it would choose it. Not LOCAL_RANK itself: where SLURM binds one GPU per task,
    LOCAL_RANK 3 sees its GPU as cuda:0."""
    if _cuda_index is not None:
        return _cuda_index
    if not torch.cuda.is_available():
        return None
    return choose_cuda_index(_local_rank, torch.cuda.device_count())


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
