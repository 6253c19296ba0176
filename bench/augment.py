"""Device-resident image loading and augmentation (the airbench style), and Cutout for both data paths.

The whole dataset is moved to the device once, as uint8 (N, C, H, W); every batch is cut, augmented and
normalised there by a handful of vectorised kernels, with no worker processes, no per-image Python and no
host-to-device copy per step. Images may come as (N, H, W, C) (torchvision's CIFAR), (N, C, H, W)
(torchvision's SVHN: `layout="NCHW"`) or (N, H, W) (one channel: Fashion-MNIST). The augmentation has the very
semantics of torchvision's

    transforms.Compose([RandomCrop(size, padding=4, padding_mode=...), RandomHorizontalFlip(), ToTensor(),
                        Normalize(mean, std)])  (+ Cutout(16) when `cutout=16`)

- random crop: the raw uint8 image is padded by `padding` pixels on each side and a window of the original
  size is cut at an offset (dy, dx) drawn uniformly and independently from 0..2*padding each (81 positions
  for padding 4), per image. `padding_mode="constant"` pads with 0 in [0, 255] space, so after normalisation
  padded pixels hold exactly -mean/std, as with torchvision (the ASAM CIFAR recipe); `"reflect"` mirrors the
  image without repeating its edge (torchvision's and TensorFlow's REFLECT: the SAM code's `basic`).
- horizontal flip of the crop with probability 0.5, per image. (`crop_flip=False`: neither; `--augment none`.)
- normalisation `(x / 255 - mean) / std`, computed in float32 with the same operations as ToTensor +
  Normalize (divide by 255, subtract mean, divide by std), so evaluation batches are bit-identical to
  torchvision's; the result is then cast to `dtype`.
- cutout (`cutout=L` > 0): after normalisation, the L x L square centred at (cy, cx), cy and cx uniform over
  the image, clipped at the borders, is set to 0 (rows max(0, cy - L//2) .. min(H, cy + L//2) - 1, likewise
  columns), per image: the SAM code's `cutout` (cutout_length 16). The SAM code draws one centre per batch;
  here every image draws its own (DeVries & Taylor's Cutout), so an example's augmentation depends only on
  (seed, epoch, its position) and not on the batch it lands in.

Crop and flip are a single gather: output pixel (i, j) of image b reads source pixel
(dy_b + i - padding, dx_b + j' - padding), j' = j or (W - 1 - j) when flipped (`torch.where`); source
coordinates outside the image read 0 (constant) or are mirrored back inside (reflect) - no padded copy is
ever made.

Randomness (reproducible, restartable): epoch e (the `epoch` attribute, 0 for the first pass; it increments
each time the loader is iterated and can be set, e.g. to k when resuming at epoch k) draws

- its shuffling permutation from a CPU `torch.Generator` seeded with hash(seed, e, 0): the order of the
  examples is the same on every device;
- its crop offsets and flips from a `torch.Generator` on the loader's device seeded with hash(seed, e, 1),
  all at once at the start of the epoch (one draw per position in the epoch's order), and its cutout centres
  likewise from hash(seed, e, 2). The same (seed, epoch) gives the same batches on a given device; CPU and
  CUDA generators are different streams, so the augmentation (not the order) differs between a CPU and a
  GPU run.

hash(...) is `bench.data.stream_seed`, the suite's one mixing of (seed, epoch, ...) into generator seeds.
Evaluation loaders (train=False) neither shuffle nor augment: batches in dataset order, normalised only.
The last partial batch is kept (drop_last=False, as torch's DataLoader default).
AutoAugment works on PIL images and has no device version here: tasks refuse it on this loader.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import TensorDataset

from bench.data import stream_seed  # the suite's one way to derive (seed, epoch, ...) streams

LAYOUTS = ("NHWC", "NCHW")  # of 4-dimensional image arrays; a 3-dimensional one is (N, H, W), one channel
PADDING_MODES = ("constant", "reflect")


class Cutout:
    """torchvision-style transform for the CPU data path: zero a `length` x `length` square (clipped at the
    borders) of a normalised (C, H, W) tensor, in place, its centre uniform over the image, drawn from torch's
    RNG (which bench.data.SeededItems seeds per example). Put it after Normalize: the SAM code zeroes
    normalised pixels."""

    def __init__(self, length: int = 16):
        if length < 1:
            raise ValueError(f"cutout length must be >= 1, got {length}")
        self.length = int(length)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
        half = self.length // 2
        x[..., max(0, cy - half):min(h, cy + half), max(0, cx - half):min(w, cx + half)] = 0
        return x

    def __repr__(self) -> str:
        return f"Cutout(length={self.length})"


def as_nchw(images: torch.Tensor, layout: str) -> torch.Tensor:
    """uint8 (N, C, H, W) from (N, H, W), or (N, H, W, C) / (N, C, H, W) as `layout` says."""
    if images.dtype != torch.uint8 or images.dim() not in (3, 4):
        raise ValueError(f"images must be uint8 (N, H, W, C), (N, C, H, W) or (N, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if images.dim() == 3:
        return images[:, None]
    return images.permute(0, 3, 1, 2) if layout == "NHWC" else images


class DeviceCifarLoader:
    """Iterate (x, y) batches of a uint8 image set kept on `device`; see the module docstring. (Named for its
    first use; it serves every image task: CIFAR, SVHN, Fashion-MNIST.)

    images: uint8 (N, H, W, C) (`layout="NHWC"`, e.g. torchvision's CIFAR `.data`), (N, C, H, W)
    (`layout="NCHW"`, torchvision's SVHN) or (N, H, W) (one channel); labels: (N,) integers.
    mean, std: per-channel, in [0, 1] units (as given to transforms.Normalize).
    crop_flip: random crop (`padding`, `padding_mode`) + horizontal flip on training batches; cutout: the side
    of the square zeroed after normalisation (0: none).
    Yields x: `dtype` (N, C, H, W) normalised, channels_last memory format if asked; y: int64; both on device.
    """

    def __init__(self, images, labels, batch_size: int, train: bool, mean: Sequence[float],
                 std: Sequence[float], seed: int = 0, device: torch.device | str = "cpu",
                 channels_last: bool = False, dtype: torch.dtype = torch.float32, padding: int = 4,
                 layout: str = "NHWC", padding_mode: str = "constant", crop_flip: bool = True, cutout: int = 0):
        images = as_nchw(torch.as_tensor(images), layout)
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
        n, channels, h, w = images.shape
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values each, got {len(mean)} and {len(std)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if padding < 0 or (padding_mode == "reflect" and padding >= min(h, w)):
            raise ValueError(f"padding must be >= 0 (and below the image size to reflect), got {padding}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if cutout < 0:
            raise ValueError(f"cutout must be >= 0, got {cutout}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.seed = int(seed)
        stream_seed(self.seed)  # refuses a negative seed now rather than at the first epoch
        self.channels_last = bool(channels_last)
        self.dtype = dtype
        self.padding, self.padding_mode = int(padding), padding_mode
        self.crop_flip_on, self.cutout = bool(crop_flip), int(cutout)
        self.epoch = 0
        # plain NCHW storage on the device, moved once (a permuted view is made contiguous)
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.int64)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.dataset = TensorDataset(self.images, self.labels)  # len(loader.dataset) == N, as a DataLoader
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

    def cutout_draws(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cy, cx): the cutout centres of the k-th image of the epoch's order (a stream of their own, so the
        crops and flips are the same with and without cutout)."""
        n, (h, w) = len(self.labels), self.images.shape[2:]
        gen = torch.Generator(device=self.device).manual_seed(stream_seed(self.seed, epoch, 2))
        cy = torch.randint(0, h, (n,), generator=gen, device=self.device)
        cx = torch.randint(0, w, (n,), generator=gen, device=self.device)
        return cy, cx

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, b = len(self.labels), self.batch_size
        if not self.train:
            for start in range(0, n, b):
                yield self._normalise(self.images[start:start + b]), self.labels[start:start + b]
            return
        order, dy, dx, flip = self.epoch_draws(epoch)
        cy, cx = self.cutout_draws(epoch) if self.cutout else (None, None)
        for start in range(0, n, b):
            idx, part = order[start:start + b], slice(start, start + b)
            raw = self.crop_flip(idx, dy[part], dx[part], flip[part]) if self.crop_flip_on else self.images[idx]
            x = self._normalise(raw)
            if self.cutout:
                x = self.apply_cutout(x, cy[part], cx[part])
            yield x, self.labels[idx]

    def crop_flip(self, idx: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                  flip: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W): images `idx` padded by `padding`, cropped at (dy, dx), flipped where `flip`;
        one gather, no padded copy."""
        p = self.padding
        h, w = self._rows.numel(), self._cols.numel()
        rows = dy[:, None] + self._rows - p                                            # (B, H) source rows
        cols = dx[:, None] + torch.where(flip[:, None], (w - 1) - self._cols, self._cols) - p  # (B, W)
        if self.padding_mode == "reflect":  # -1 reads 1, h reads h - 2: the edge is not repeated
            return self.images[idx[:, None, None, None], self._chans[None, :, None, None],
                               _reflect(rows, h)[:, None, :, None], _reflect(cols, w)[:, None, None, :]]
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (B, H, W)
        out = self.images[idx[:, None, None, None], self._chans[None, :, None, None],
                          rows.clamp(0, h - 1)[:, None, :, None], cols.clamp(0, w - 1)[:, None, None, :]]
        return out.masked_fill_(~inside[:, None], 0)  # the zero padding, in [0, 255] space

    def apply_cutout(self, x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
        """Zero, in normalised x (B, C, H, W), the cutout square of each image (clipped at the borders)."""
        half = self.cutout // 2
        in_rows = (self._rows >= cy[:, None] - half) & (self._rows < cy[:, None] + half)  # (B, H)
        in_cols = (self._cols >= cx[:, None] - half) & (self._cols < cx[:, None] + half)  # (B, W)
        return x.masked_fill_((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0)

    def _normalise(self, raw: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            raw = raw.contiguous(memory_format=torch.channels_last)  # 1 byte/pixel; the float ops keep it
        x = raw.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)  # ToTensor + Normalize, exactly
        return x if self.dtype == torch.float32 else x.to(self.dtype)


def _reflect(coords: torch.Tensor, size: int) -> torch.Tensor:
    """Mirror coordinates in -size+1 .. 2*size-2 back into 0..size-1 without repeating the edge."""
    coords = coords.abs()
    return torch.where(coords > size - 1, 2 * (size - 1) - coords, coords)
