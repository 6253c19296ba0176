"""The generic torchvision image task: CIFAR-10/100, SVHN and Fashion-MNIST are instances of it.

A dataset is a short file (tasks/cifar.py, svhn.py, fashion_mnist.py) that subclasses `ImageTask`, names its
recipe file and implements `load` (one split as an `ImageSet`), `is_synthetic` and `make_fake`. What tells
the datasets apart is data, in the `[<task>.data]` table of that file: number of classes, channels, image
size, mean/std, the AutoAugment policy that fits the images (none: `--augment autoaugment` is refused) and
how the random crop pads. Models come from the zoo (`create_model(name, num_classes, in_chans=channels)`), or,
for the small demo tasks, from `LOCAL_MODELS`.

`--augment` (RunConfig.augment), the SAM code's menu (sam_jax/datasets/augmentation.py):
- `none`: normalise only;
- `basic`: random crop with 4-pixel padding (zeros in the ASAM CIFAR recipe, a mirror in the SAM code's
  datasets: `padding_mode`) + horizontal flip, then normalise;
- `cutout`: basic, then a 16 x 16 square (clipped at the borders) zeroed after normalisation;
- `autoaugment`: the dataset's AutoAugment policy (torchvision's, on the PIL image), then basic: as the
  SAM code's `autoaugment`, which applies the basic augmentation on top of the policy;
- `autoaugment-cutout`: autoaugment, then cutout.
Every random draw comes from torch's RNG, which bench.data.SeededItems seeds per (seed, epoch, example), so
a resumed run sees the very same augmentations. The device-resident loader (bench/augment.py) does none,
basic and cutout itself and refuses AutoAugment.

Tasks whose `settings` name "noise" corrupt their training labels with `symmetric_noise` (ASAM Table 6).
Tasks whose `settings` name "dropout" pass `--dropout` (RunConfig.dropout) to the models with dropout layers
(`has_dropout`: the LOCAL_DROPOUT models and the zoo's models registered with `dropout=True`); for any other
model a non-zero rate is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from bench.augment import Cutout, DeviceCifarLoader
from bench.config import load_toml
from bench.data import make_loader
from bench.errors import UserError
from bench.options import option
from bench.task import Job, Task, check_examples, cross_entropy_per_example, merge_recipe
from tasks.models import MODEL_INFO, create_model, model_names

CUTOUT = 16   # the SAM code's cutout_length
AUGMENTS = ("basic", "cutout", "autoaugment", "autoaugment-cutout", "none")


# The image tasks' options (declared as a minimizer's are; the CLI's --augment, --dropout, --noise, --noise-seed
# set them, and --topt KEY=VALUE any): each task's `Options` combines those it reads.
@dataclass(frozen=True)
class Augment:
    augment: str = option("basic", "training-image augmentation (the SAM code's menu; see tasks/images.py)",
                          choices=AUGMENTS)


@dataclass(frozen=True)
class Dropout:
    dropout: float = option(0.0, "dropout rate of the models with dropout layers (the MLPs, WRN-28-2/10)", ge=0, lt=1)


@dataclass(frozen=True)
class LabelNoise:
    noise: float = option(0.0, "symmetric noise rate of the training labels", ge=0, le=1)
    noise_seed: int = option(0, "seed of the label corruption (the same for every minimizer and seed)", ge=0,
                             integer=True)


@dataclass(frozen=True)
class AugmentDropout(Dropout, Augment):
    """augment, dropout"""


@dataclass(frozen=True)
class NoisyImages(LabelNoise, Dropout, Augment):
    """augment, dropout, noise, noise_seed"""
SUBTABLES = ("data", "by_model", "split")  # tables of a recipe file that are not RunConfig settings
PADDING = 4   # random-crop padding of `basic`, in every recipe of both papers


class ImageSet(Dataset):
    """uint8 images in their source layout ("NHWC", "NCHW" or "NHW" for one channel) and integer labels;
    `transform` is applied to the PIL image, as torchvision's datasets do, so the pixels are the same."""

    def __init__(self, data: np.ndarray, targets, layout: str = "NHWC", transform=None):
        if layout not in ("NHWC", "NCHW", "NHW"):
            raise ValueError(f"layout must be NHWC, NCHW or NHW, got {layout!r}")
        self.data, self.targets, self.layout, self.transform = data, [int(t) for t in targets], layout, transform

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, index: int) -> Image.Image:
        img = np.asarray(self.data[index])
        if self.layout == "NCHW":
            img = img.transpose(1, 2, 0)
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[..., 0]
        return Image.fromarray(img)  # a 2-D array gives a one-channel ("L") image

    def __getitem__(self, index: int):
        img = self.image(index)
        return (self.transform(img) if self.transform is not None else img), self.targets[index]

    def subset(self, indices) -> "ImageSet":
        indices = np.asarray(indices, dtype=np.int64)
        return ImageSet(self.data[indices], [self.targets[i] for i in indices], self.layout, self.transform)


def symmetric_noise(labels, num_classes: int, rate: float, seed: int) -> tuple[np.ndarray, float]:
    """Return (noisy labels, realised noise rate). Corrupted labels never equal the original: the new
    class is (y + k) mod C with k uniform in 1..C-1, i.e. uniform over the other classes."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    flip = rng.random(labels.shape[0]) < rate  # drawn for every example: rates nest for a fixed seed
    offsets = rng.integers(1, num_classes, size=labels.shape[0])
    noisy = np.where(flip, (labels + offsets) % num_classes, labels)
    realised = float((noisy != labels).mean()) if labels.size else 0.0
    return noisy, realised


def relu_dropout(p: float = 0.0) -> nn.Module:
    """A hidden layer's activation: ReLU, then dropout at rate `p` when p > 0. At p = 0 a bare ReLU (no dropout
    module at all: the network and its random stream are those of the MLP without dropout); at p > 0 one
    Sequential in the ReLU's place, so the parameter names (a Sequential's indices) are the same at every p."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    return nn.Sequential(nn.ReLU(), nn.Dropout(p)) if p > 0 else nn.ReLU()


def mlp(num_classes: int, in_chans: int, size: int, hidden: int = 512, dropout: float = 0.0) -> nn.Module:
    """A two-hidden-layer perceptron on the flattened image (the CPU demo's model); `dropout` after each hidden
    ReLU (RunConfig.dropout)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * size * size, hidden), relu_dropout(dropout),
                         nn.Linear(hidden, hidden), relu_dropout(dropout), nn.Linear(hidden, num_classes))


LOCAL_MODELS = {"mlp": mlp}  # built for the task's image shape; offered by tasks that list them
LOCAL_DROPOUT = ("mlp",)     # the LOCAL_MODELS whose builder takes `dropout`


@lru_cache(maxsize=None)
def _recipe_file(path: str) -> dict[str, Any]:
    return load_toml(path)


def make_loss(smoothing: float) -> nn.Module:
    if smoothing > 0:  # the official ASAM script's loss
        from timm.loss import LabelSmoothingCrossEntropy
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


def use_device_loader(cfg, device: torch.device) -> bool:
    """The GPU-resident loader: asked for, or automatic on CUDA in a single process when it can do the
    augmentation (not AutoAugment)."""
    from bench import distributed as D
    on_device = not cfg.augment.startswith("autoaugment")
    if cfg.loader == "device" and D.is_distributed():
        raise UserError("--loader device does not shard data across torchrun replicas yet; use --loader "
                        "torchvision (the default under torchrun)")
    if cfg.loader == "device" and not on_device:
        raise UserError(f"--augment {cfg.augment} needs PIL images (torchvision's AutoAugment); the device loader "
                        "cannot run it: use --loader torchvision")
    return cfg.loader == "device" or (cfg.loader == "auto" and device.type == "cuda" and on_device
                                      and not D.is_distributed())


class ImageTask(Task):
    """A torchvision image-classification task; see the module docstring. Registered with
    `recipe_file=<its TOML>` and `dataset=<the table of that file with its data spec>`. The recipe is the
    file's `[common]` table, then the dataset's table, then the `overrides` table where the task names one (a
    demo task on a dataset's images), then per-model differences. Sub-tables (`data`, `by_model`, `split`)
    are not settings."""

    recipe_file: str = ""
    dataset: str = ""
    overrides: str = ""
    base_optimizer = "sgd"
    Options: type = Augment
    loader_kinds = ("auto", "torchvision", "device")
    local_models: tuple[str, ...] = ()  # LOCAL_MODELS this task offers besides the zoo

    # -- the recipe, as data --------------------------------------------------------------------------

    def _table(self, name: str) -> dict[str, Any]:
        return _recipe_file(self.recipe_file).get(name, {})

    @property
    def spec(self) -> dict[str, Any]:
        """classes, channels, size, mean, std, padding_mode, autoaugment (a torchvision policy name or absent)."""
        return self._table(self.dataset)["data"]

    @property
    def num_classes(self) -> int:
        return int(self.spec["classes"])

    def recipe(self, model: str | None = None) -> dict[str, Any]:
        tables = [self._table(self.dataset)] + ([self._table(self.overrides)] if self.overrides else [])
        recipe = merge_recipe({}, self._table("common"))
        for table in tables:
            merge_recipe(recipe, {k: v for k, v in table.items() if k not in SUBTABLES})
        recipe["models"] = self.model_choices()
        if model in MODEL_INFO:  # per-model differences live next to the model's registration ...
            merge_recipe(recipe, MODEL_INFO[model]["recipe"])
        for table in tables:     # ... or per dataset, in the TOML (the SAM paper's rho for Shake-Shake)
            merge_recipe(recipe, table.get("by_model", {}).get(model, {}))
        return recipe

    def model_rev(self, name: str) -> str:
        return MODEL_INFO[name]["rev"] if name in MODEL_INFO else ""

    def model_choices(self) -> list[str]:
        return [*self.local_models, *model_names()] if self.local_models else model_names()

    def has_dropout(self, name: str) -> bool:
        """Whether model `name` has dropout layers (takes RunConfig.dropout)."""
        return name in LOCAL_DROPOUT if name in LOCAL_MODELS else bool(MODEL_INFO.get(name, {}).get("dropout"))

    def check_dropout(self, name: str, dropout: float) -> None:
        """Refuse a dropout rate for a model without dropout layers (one line naming the models with them)."""
        if dropout and not self.has_dropout(name):
            able = [m for m in self.model_choices() if self.has_dropout(m)]
            raise UserError(f"--dropout applies to {', '.join(able) or 'no model of this task'}; model {name} has "
                            "no dropout layers")

    def check_config(self, cfg) -> None:
        """The settings this task refuses for the config's model (before any data is read)."""
        self.check_dropout(cfg.model, cfg.dropout)

    def make_model(self, name: str, dropout: float = 0.0) -> nn.Module:
        """A freshly initialised model; `dropout` (RunConfig.dropout) only for the models with dropout layers."""
        self.check_dropout(name, dropout)
        spec = self.spec
        kw = {"dropout": dropout} if self.has_dropout(name) else {}
        if name in LOCAL_MODELS:
            return LOCAL_MODELS[name](self.num_classes, spec["channels"], spec["size"], **kw)
        return create_model(name, num_classes=self.num_classes, in_chans=spec["channels"], **kw)

    # -- data ------------------------------------------------------------------------------------------

    def load(self, cfg, train: bool) -> ImageSet:
        """One split of the dataset, untransformed; a missing dataset is a one-line UserError."""
        raise NotImplementedError

    def is_synthetic(self, cfg) -> bool:
        raise NotImplementedError

    def check_augment(self, augment: str) -> None:
        if augment.startswith("autoaugment") and not self.spec.get("autoaugment"):
            spec = self.spec
            raise UserError(f"--augment {augment} does not fit task {self.name}: no AutoAugment policy for its "
                            f"{spec['channels']}-channel {spec['size']}x{spec['size']} images (the SAM code "
                            "offers none either); use basic, cutout or none")

    def transforms(self, augment: str):
        """(train, test) transforms of PIL images for `--augment`; see the module docstring."""
        from torchvision import transforms  # lazy: torchvision costs ~1.5 s of every run's start, and the
        spec = self.spec                    # MLP demos and the device loader never need it
        norm = [transforms.ToTensor(), transforms.Normalize(spec["mean"], spec["std"])]
        train: list = []
        if augment.startswith("autoaugment"):
            train.append(transforms.AutoAugment(transforms.AutoAugmentPolicy(spec["autoaugment"])))
        if augment != "none":
            train += [transforms.RandomCrop(spec["size"], padding=PADDING, padding_mode=spec["padding_mode"]),
                      transforms.RandomHorizontalFlip()]
        train += norm
        if augment.endswith("cutout"):
            train.append(Cutout(CUTOUT))
        return transforms.Compose(train), transforms.Compose(norm)

    def splits(self, cfg) -> tuple[ImageSet, ImageSet]:
        """(train, evaluation) sets; the demo tasks carve a validation split out of the training set here."""
        return self.load(cfg, True), self.load(cfg, False)

    def datasets(self, cfg) -> tuple[ImageSet, ImageSet]:
        """(train, test) with their transforms, the training labels corrupted where the task has `noise`."""
        self.check_augment(cfg.augment)
        train, test = self.splits(cfg)
        train.transform, test.transform = self.transforms(cfg.augment)
        if "noise" in self.settings:
            noisy, realised = symmetric_noise(train.targets, self.num_classes, cfg.noise, cfg.noise_seed)
            train.clean_targets = list(train.targets)
            train.targets = noisy.tolist()
            train.realised_noise = realised  # the row records the realised rate (dataset_info)
        return train, test

    def dataset_info(self, train: ImageSet) -> dict[str, Any]:
        """Extra facts about the training set for the results row."""
        return {"realised_noise": train.realised_noise} if "noise" in self.settings else {}

    def loaders(self, cfg, device: torch.device, train_set: ImageSet, test_set: ImageSet):
        eval_batch = max(cfg.per_replica_batch, 256)
        if not use_device_loader(cfg, device):
            return (make_loader(train_set, cfg.per_replica_batch, train=True, seed=cfg.seed, workers=cfg.workers,
                                device=device),
                    make_loader(test_set, eval_batch, train=False, seed=cfg.seed, workers=cfg.workers,
                                device=device))
        spec = self.spec
        kw = dict(mean=spec["mean"], std=spec["std"], seed=cfg.seed, device=device, channels_last=cfg.channels_last,
                  padding=PADDING, padding_mode=spec["padding_mode"])
        kw["layout"] = "NCHW" if train_set.layout == "NCHW" else "NHWC"  # (N, H, W) needs none
        aug = dict(crop_flip=cfg.augment != "none", cutout=CUTOUT if cfg.augment.endswith("cutout") else 0)
        return (DeviceCifarLoader(*device_arrays(train_set), cfg.per_replica_batch, True, **kw, **aug),
                DeviceCifarLoader(*device_arrays(test_set), eval_batch, False, **kw))

    def measure_examples(self, cfg, n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The first n examples with the test transform (normalise only), the training labels as trained on."""
        train_set, test_set = self.datasets(cfg)
        check_examples(self.name, n, len(train_set))
        _, norm = self.transforms("none")
        out = []
        for ds in (train_set, test_set):
            xs = torch.stack([norm(ds.image(i)) for i in range(min(n, len(ds)))])
            out += [xs.to(device), torch.as_tensor(ds.targets[:len(xs)], device=device)]
        return tuple(out)

    def build(self, cfg, device: torch.device) -> Job:
        self.check_config(cfg)
        train_set, test_set = self.datasets(cfg)
        train, test = self.loaders(cfg, device, train_set, test_set)
        return Job(model=self.make_model(cfg.model, cfg.dropout), train_loader=train, test_loader=test,
                   loss_fn=make_loss(cfg.label_smoothing), num_train=len(train_set),
                   loss_per_sample=cross_entropy_per_example(cfg.label_smoothing),  # make_loss, per example
                   synthetic=self.is_synthetic(cfg),
                   info={"train_size": len(train_set), "test_size": len(test_set), **self.dataset_info(train_set)})


def device_arrays(ds: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) for DeviceCifarLoader: the images as stored, no copy (the loader is told their layout)."""
    return torch.as_tensor(ds.data), torch.as_tensor(ds.targets)


def fake_images(n: int, num_classes: int, seed: int, split: int, channels: int = 3,
                size: int = 32) -> tuple[np.ndarray, list[int]]:
    """Learnable synthetic images: each class is a smooth random template (drawn from `seed`, shared by the
    splits); an image is its class's template, randomly shifted, plus noise (drawn per split).
    uint8 (n, channels, size, size); size a multiple of 4."""
    coarse = np.random.default_rng(seed).uniform(0, 255, size=(num_classes, channels, 4, 4))
    rng = np.random.default_rng([seed, split])
    templates = coarse.repeat(size // 4, axis=2).repeat(size // 4, axis=3)  # (classes, C, size, size)
    labels = rng.integers(0, num_classes, size=n)
    shifts = rng.integers(-4, 5, size=(n, 2))
    imgs = np.empty((n, channels, size, size), dtype=np.float32)
    for i, (c, (dy, dx)) in enumerate(zip(labels, shifts)):
        imgs[i] = np.roll(templates[c], (dy, dx), axis=(1, 2))
    imgs += rng.normal(0, 40, size=imgs.shape)
    return np.clip(imgs, 0, 255).astype(np.uint8), labels.tolist()
