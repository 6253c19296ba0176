"""Generic data plumbing shared by tasks: loaders that know about epochs, seeds and data parallelism."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from bench import distributed as D


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, seed: int, workers: int,
                device: torch.device, collate_fn=None) -> DataLoader:
    """A DataLoader that keeps a GPU fed: worker processes, pinned memory, persistent workers, prefetching.

    Under data parallelism the training set is split by DistributedSampler (one permutation per epoch
    from `seed`, a disjoint shard per rank) and the evaluation set by ShardSampler (no duplicates). The
    worker seeds (augmentation) differ per rank; the model initialisation does not (see runner)."""
    kw: dict = {"num_workers": workers, "pin_memory": device.type == "cuda", "collate_fn": collate_fn}
    if workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=4)
    gen = torch.Generator().manual_seed(seed * 7919 + D.rank())
    if train:
        if D.is_distributed():
            sampler = DistributedSampler(dataset, shuffle=True, seed=seed)
            return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=gen, **kw)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen, **kw)
    sampler = D.ShardSampler(len(dataset)) if D.is_distributed() else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, **kw)


def set_epoch(loader, epoch: int) -> None:
    """Tell a loader which epoch (0-based) comes next, so its order depends on (seed, epoch) only."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if hasattr(loader, "epoch"):
        loader.epoch = epoch


class TensorLoader:
    """Mini-batches from in-memory tensors, reshuffled every epoch from (seed, epoch).

    For small data sets (and data kept resident on the GPU) this replaces torch's DataLoader: no worker
    processes, no per-item Python calls. The order of an epoch depends only on the seed and the epoch
    number, so a run that restarts at epoch k sees the batches it would have seen. Under data parallelism
    each rank takes every W-th example of the epoch's order.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0,
                 drop_last: bool = False):
        assert x.shape[0] == y.shape[0]
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world = D.rank(), D.world_size()
        self.epoch = 0
        self.dataset = range(x.shape[0])  # DataLoader-like: len(loader.dataset) is the number of examples

    def _count(self) -> int:
        return len(range(self.rank, self.x.shape[0], self.world))

    def __len__(self) -> int:
        n = self._count()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = self.x.shape[0]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        order = order[self.rank::self.world].to(self.x.device)
        self.epoch += 1
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]
