"""Device-resident CIFAR loading and augmentation (the airbench style).

The whole dataset is moved to the device once, as uint8 (N, C, H, W); every batch is cut, augmented and
normalised there by a handful of vectorised kernels, with no worker processes, no per-image Python and no
host-to-device copy per step. The augmentation is the official CIFAR recipe, with the very semantics of
torchvision's

    transforms.Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)])

- random crop: the raw uint8 image is zero-padded by `padding` pixels on each side and a window of the
  original size is cut at an offset (dy, dx) drawn uniformly and independently from 0..2*padding each
  (81 positions for padding 4), per image. Padded pixels are 0 in [0, 255] space, so after normalisation
  they hold exactly -mean/std, as with torchvision (the padding happens before ToTensor/Normalize).
- horizontal flip of the crop with probability 0.5, per image.
- normalisation `(x / 255 - mean) / std`, computed in float32 with the same operations as ToTensor +
  Normalize (divide by 255, subtract mean, divide by std), so evaluation batches are bit-identical to
  torchvision's; the result is then cast to `dtype`.

Crop and flip are a single gather: output pixel (i, j) of image b reads source pixel
(dy_b + i - padding, dx_b + j' - padding), j' = j or (W - 1 - j) when flipped (`torch.where`), and
source coordinates outside the image read 0 (the zero padding) - no padded copy is ever made.

Randomness (reproducible, restartable): epoch e (the `epoch` attribute, 0 for the first pass; it increments
each time the loader is iterated and can be set, e.g. to k when resuming at epoch k) draws

- its shuffling permutation from a CPU `torch.Generator` seeded with hash(seed, e, 0): the order of the
  examples is the same on every device;
- its crop offsets and flips from a `torch.Generator` on the loader's device seeded with hash(seed, e, 1),
  all at once at the start of the epoch (one draw per position in the epoch's order). The same (seed, epoch)
  gives the same batches on a given device; CPU and CUDA generators are different streams, so the
  augmentation (not the order) differs between a CPU and a GPU run.

hash(...) is `bench.data.stream_seed`, the suite's one mixing of (seed, epoch, ...) into generator seeds.
Evaluation loaders (train=False) neither shuffle nor augment: batches in dataset order, normalised only.
The last partial batch is kept (drop_last=False, as torch's DataLoader default).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import TensorDataset

from bench.data import stream_seed  # the suite's one way to derive (seed, epoch, ...) streams


class DeviceCifarLoader:
    """Iterate (x, y) batches of a uint8 image set kept on `device`; see the module docstring.

    images: uint8 (N, H, W, C), e.g. `torch.as_tensor(torchvision_cifar.data)`; labels: (N,) integers.
    mean, std: per-channel, in [0, 1] units (as given to transforms.Normalize).
    Yields x: `dtype` (N, C, H, W) normalised, channels_last memory format if asked; y: int64; both on device.
    """

    def __init__(self, images, labels, batch_size: int, train: bool, mean: Sequence[float],
                 std: Sequence[float], seed: int = 0, device: torch.device | str = "cpu",
                 channels_last: bool = False, dtype: torch.dtype = torch.float32, padding: int = 4):
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
        channels = images.shape[3]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values each, got {len(mean)} and {len(std)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.seed = int(seed)
        stream_seed(self.seed)  # refuses a negative seed now rather than at the first epoch
        self.channels_last = bool(channels_last)
        self.dtype = dtype
        self.padding = int(padding)
        self.epoch = 0
        # NCHW view of the data, moved once. (A permuted NHWC tensor made contiguous: plain NCHW storage.)
        self.images = images.to(self.device).permute(0, 3, 1, 2).contiguous()
        self.labels = labels.to(self.device, torch.int64)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.dataset = TensorDataset(self.images, self.labels)  # len(loader.dataset) == N, as a DataLoader
        _, _, h, w = self.images.shape
        self._rows = torch.arange(h, device=self.device)
        self._cols = torch.arange(w, device=self.device)
        self._chans = torch.arange(channels, device=self.device)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)  # drop_last=False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1  # at the call, so an epoch that is not read to the end still counts
        return self._batches(epoch)

    # -- internals -------------------------------------------------------------------------------------

    def epoch_draws(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, dy, dx, flip) of a training epoch: order is a permutation of 0..N-1 (on the device);
        dy, dx, flip are the crop offsets and flips of the k-th image of that order."""
        n = len(self.labels)
        cpu = torch.Generator().manual_seed(stream_seed(self.seed, epoch, 0))
        order = torch.randperm(n, generator=cpu).to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(stream_seed(self.seed, epoch, 1))
        span = 2 * self.padding + 1
        dy = torch.randint(0, span, (n,), generator=gen, device=self.device)
        dx = torch.randint(0, span, (n,), generator=gen, device=self.device)
        flip = torch.rand(n, generator=gen, device=self.device) < 0.5
        return order, dy, dx, flip

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, b = len(self.labels), self.batch_size
        if not self.train:
            for start in range(0, n, b):
                yield self._normalise(self.images[start:start + b]), self.labels[start:start + b]
            return
        order, dy, dx, flip = self.epoch_draws(epoch)
        for start in range(0, n, b):
            idx = order[start:start + b]
            raw = self.crop_flip(idx, dy[start:start + b], dx[start:start + b], flip[start:start + b])
            yield self._normalise(raw), self.labels[idx]

    def crop_flip(self, idx: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                  flip: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W): images `idx` zero-padded by `padding`, cropped at (dy, dx), flipped where
        `flip`; one gather, no padded copy."""
        p = self.padding
        h, w = self._rows.numel(), self._cols.numel()
        rows = dy[:, None] + self._rows - p                                            # (B, H) source rows
        cols = dx[:, None] + torch.where(flip[:, None], (w - 1) - self._cols, self._cols) - p  # (B, W)
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (B, H, W)
        out = self.images[idx[:, None, None, None], self._chans[None, :, None, None],
                          rows.clamp(0, h - 1)[:, None, :, None], cols.clamp(0, w - 1)[:, None, None, :]]
        return out.masked_fill_(~inside[:, None], 0)  # the zero padding, in [0, 255] space

    def _normalise(self, raw: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            raw = raw.contiguous(memory_format=torch.channels_last)  # 1 byte/pixel; the float ops keep it
        x = raw.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)  # ToTensor + Normalize, exactly
        return x if self.dtype == torch.float32 else x.to(self.dtype)
