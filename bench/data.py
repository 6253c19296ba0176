"""Generic data plumbing shared by tasks: a loader over tensors that already sit on the device."""
from __future__ import annotations

import torch


class TensorLoader:
    """Mini-batches from in-memory tensors, reshuffled every epoch from (seed, epoch).

    For small data sets (and data kept resident on the GPU) this replaces torch's DataLoader: no worker
    processes, no per-item Python calls. The order of an epoch depends only on the seed and the epoch
    number, so a run that restarts at epoch k sees the batches it would have seen.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0,
                 drop_last: bool = False):
        assert x.shape[0] == y.shape[0]
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.epoch = 0
        self.dataset = self  # DataLoader-like: len(loader.dataset) is the number of examples

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = self.x.shape[0]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g).to(self.x.device)
        else:
            order = None
        self.epoch += 1
        for i in range(len(self)):
            if order is None:
                yield self.x[i * self.batch_size:(i + 1) * self.batch_size], \
                      self.y[i * self.batch_size:(i + 1) * self.batch_size]
            else:
                idx = order[i * self.batch_size:(i + 1) * self.batch_size]
                yield self.x[idx], self.y[idx]
