"""Generic data plumbing shared by tasks: loaders that know about epochs, seeds and data parallelism."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bench import distributed as D


def stream_seed(*parts: int) -> int:
    """A 63-bit seed for torch's generators from non-negative integers (seed, epoch, index, stream...),
    stable across processes and runs. Cheap (a few integer operations): it runs once per example."""
    if any(p < 0 for p in parts):
        raise ValueError(f"seeds and epochs must be >= 0, got {parts}")
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class EpochSampler(Sampler):
    """Training order: one permutation per epoch from (seed, epoch), padded to a multiple of the world size
    and split into disjoint shards (rank r takes r, r + W, ...). Yields (epoch, index) pairs so that the
    dataset (SeededItems) can seed each example's augmentation, even inside persistent worker processes."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0
        self.rank, self.world = D.rank(), D.world_size()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.world)

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(stream_seed(self.seed, self.epoch)))
        order = torch.cat([order, order[:len(self) * self.world - self.n]])  # equal shards for DDP
        return iter([(self.epoch, i) for i in order[self.rank::self.world].tolist()])


class SeededItems(Dataset):
    """Wraps a dataset so that example i of epoch e is augmented with torch's CPU RNG seeded from
    (seed, e, i): augmentation no longer depends on the number of workers, on which worker loads an
    example, or on whether the run was resumed, so a resumed run is bit-identical to an uninterrupted one."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG (dropout, ...) untouched
            # the CPU generator only: torch.manual_seed would also reseed every CUDA generator, which
            # fork_rng(devices=[]) does not restore (the loader may run in the training process)
            torch.default_generator.manual_seed(stream_seed(self.seed, epoch, index))
            return self.base[index]


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, seed: int, workers: int,
                device: torch.device, collate_fn=None) -> DataLoader:
    """A DataLoader that keeps a GPU fed (worker processes, pinned memory, persistent workers, prefetching)
    and whose batches depend only on (seed, epoch): see EpochSampler and SeededItems. Evaluation data is
    sharded across ranks without padding (ShardSampler), so every example counts once."""
    kw: dict = {"num_workers": workers, "pin_memory": device.type == "cuda", "collate_fn": collate_fn}
    if workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=4)
    if train:
        return DataLoader(SeededItems(dataset, seed), batch_size=batch_size,
                          sampler=EpochSampler(len(dataset), seed), **kw)
    sampler = D.ShardSampler(len(dataset)) if D.is_distributed() else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, **kw)


def base_dataset(loader) -> Dataset:
    """The task's own dataset behind a loader (unwrapping SeededItems)."""
    ds = loader.dataset
    return ds.base if isinstance(ds, SeededItems) else ds


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
            g = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        order = order[self.rank::self.world].to(self.x.device)
        self.epoch += 1
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
