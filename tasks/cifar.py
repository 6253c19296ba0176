"""CIFAR-10 / CIFAR-100 (ASAM Tables 2 and 3): torchvision's datasets, the official recipe.

Data lives under `--data-dir` exactly as torchvision's CIFAR10/CIFAR100 expect it
(`<data-dir>/cifar-10-batches-py/`, `<data-dir>/cifar-100-python/`); `--download` fetches it.
`bench data fake cifar10 DIR` writes a small synthetic set in the same pickle format, marked by a
`SYNTHETIC` file: for it (and only for it) the loader skips torchvision's md5 check.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision import datasets, transforms

from bench.augment import DeviceCifarLoader
from bench.data import make_loader
from bench.errors import UserError
from bench.registry import register_task
from bench.task import SYNTHETIC_MARKER, Job, Task, load_toml
from tasks.models import MODEL_INFO, create_model, model_names

RECIPE = load_toml(Path(__file__).with_name("cifar.toml"))

_SPEC = {  # torchvision class, its folder, number of classes
    "cifar10": (datasets.CIFAR10, "cifar-10-batches-py", 10),
    "cifar100": (datasets.CIFAR100, "cifar-100-python", 100),
}


def is_synthetic(root: str | Path, dataset: str) -> bool:
    return (Path(root) / _SPEC[dataset][1] / SYNTHETIC_MARKER).exists()


def load_cifar(root: str | Path, dataset: str, train: bool, transform=None, download: bool = False):
    """torchvision's CIFAR dataset; a missing dataset is a one-line UserError saying how to get it."""
    cls, folder, _ = _SPEC[dataset]
    root = str(root)
    if download:
        try:
            cls(root, train=train, download=True)
        except Exception as e:  # network errors come in many types
            raise UserError(f"could not download {dataset} into {root}: {e}") from None
    if is_synthetic(root, dataset):
        # Instance-level copies with md5 None: torchvision then checks only that the files exist.
        class Synthetic(cls):
            train_list = [(f, None) for f, _ in cls.train_list]
            test_list = [(f, None) for f, _ in cls.test_list]
            meta = {**cls.meta, "md5": None}
        cls = Synthetic
    try:
        return cls(root, train=train, transform=transform, download=False)
    except RuntimeError:
        where = os.path.join(root, folder)
        raise UserError(
            f"{dataset} not found (or corrupted) at {where}/; pass --download to fetch it, --data-dir to "
            f"point at the folder that holds {folder}/, or `bench data fake {dataset} DIR` for synthetic "
            "data") from None


class CifarTask(Task):
    dataset = "cifar10"
    base_optimizer = "sgd"

    def recipe(self, model: str | None = None) -> dict[str, Any]:
        spec = RECIPE[self.dataset]
        recipe = {**RECIPE["common"], "rho_by_minimizer": spec["rho_by_minimizer"], "models": model_names()}
        if model in MODEL_INFO:  # per-model differences live next to the model's registration
            recipe.update(MODEL_INFO[model]["recipe"])
        return recipe

    def model_rev(self, name: str) -> str:
        return MODEL_INFO[name]["rev"] if name in MODEL_INFO else ""

    @property
    def num_classes(self) -> int:
        return _SPEC[self.dataset][2]

    def transforms(self):
        spec = RECIPE[self.dataset]
        norm = transforms.Normalize(spec["mean"], spec["std"])
        train = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), norm])
        test = transforms.Compose([transforms.ToTensor(), norm])
        return train, test

    def datasets(self, cfg):
        """(train, test) datasets; subclasses (label noise) change the training labels here."""
        t_train, t_test = self.transforms()
        train = load_cifar(cfg.data_dir, self.dataset, True, t_train, cfg.download)
        test = load_cifar(cfg.data_dir, self.dataset, False, t_test, False)
        return train, test

    def build(self, cfg, device: torch.device) -> Job:
        train_set, test_set = self.datasets(cfg)
        if use_device_loader(cfg, device):
            spec = RECIPE[self.dataset]
            kw = dict(mean=spec["mean"], std=spec["std"], seed=cfg.seed, device=device,
                      channels_last=cfg.channels_last)
            train = DeviceCifarLoader(train_set.data, train_set.targets, cfg.per_replica_batch, train=True, **kw)
            test = DeviceCifarLoader(test_set.data, test_set.targets, max(cfg.per_replica_batch, 256), train=False, **kw)
        else:
            train = make_loader(train_set, cfg.per_replica_batch, train=True, seed=cfg.seed, workers=cfg.workers,
                                device=device)
            test = make_loader(test_set, max(cfg.per_replica_batch, 256), train=False, seed=cfg.seed,
                               workers=cfg.workers, device=device)
        model = create_model(cfg.model, num_classes=self.num_classes)
        return Job(model=model, train_loader=train, test_loader=test, loss_fn=make_loss(cfg.label_smoothing),
                   num_train=len(train_set), synthetic=is_synthetic(cfg.data_dir, self.dataset),
                   info={"train_size": len(train_set), "test_size": len(test_set), **self.dataset_info(train_set)})

    def make_model(self, name: str) -> nn.Module:
        return create_model(name, num_classes=self.num_classes)

    def dataset_info(self, train) -> dict[str, Any]:
        """Extra facts about the training set for the results row (label noise: the realised rate)."""
        return {}

    def make_fake(self, out_dir: str, train: int = 2000, test: int = 500, seed: int = 0, **_: Any) -> str:
        path = write_fake_cifar(out_dir, self.dataset, train, test, seed)
        return f"wrote synthetic {self.dataset} ({train} train / {test} test images) to {path}"


def use_device_loader(cfg, device: torch.device) -> bool:
    """The GPU-resident loader: asked for, or automatic on CUDA in a single process."""
    from bench import distributed as D
    if cfg.loader == "device" and D.is_distributed():
        raise UserError("--loader device does not shard data across torchrun replicas yet; use --loader "
                        "torchvision (the default under torchrun)")
    return cfg.loader == "device" or (cfg.loader == "auto" and device.type == "cuda" and not D.is_distributed())


register_task("cifar10", dataset="cifar10",
              description="CIFAR-10, ASAM Table 2 (torchvision data, official recipe)")(CifarTask)
register_task("cifar100", dataset="cifar100",
              description="CIFAR-100, ASAM Table 3 (torchvision data, official recipe)")(CifarTask)


def make_loss(smoothing: float) -> nn.Module:
    if smoothing > 0:  # the official script's loss
        from timm.loss import LabelSmoothingCrossEntropy
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


def fake_images(n: int, num_classes: int, seed: int, split: int) -> tuple[np.ndarray, list[int]]:
    """Learnable synthetic images: each class is a smooth random colour template (drawn from `seed`, shared
    by the splits); an image is its class's template, randomly shifted, plus noise (drawn per split).
    uint8, (n, 3072) in CIFAR's channel-major row layout."""
    coarse = np.random.default_rng(seed).uniform(0, 255, size=(num_classes, 3, 4, 4))
    rng = np.random.default_rng([seed, split])
    templates = coarse.repeat(8, axis=2).repeat(8, axis=3)                 # (C, 3, 32, 32)
    labels = rng.integers(0, num_classes, size=n)
    shifts = rng.integers(-4, 5, size=(n, 2))
    imgs = np.empty((n, 3, 32, 32), dtype=np.float32)
    for i, (c, (dy, dx)) in enumerate(zip(labels, shifts)):
        imgs[i] = np.roll(templates[c], (dy, dx), axis=(1, 2))
    imgs += rng.normal(0, 40, size=imgs.shape)
    return np.clip(imgs, 0, 255).astype(np.uint8).reshape(n, 3072), labels.tolist()


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_fake_cifar(out_dir: str | Path, dataset: str, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write a synthetic CIFAR in torchvision's on-disk format (the python pickle batches)."""
    if n_train < 1 or n_test < 1:
        raise UserError("--train and --test must be >= 1")
    _, folder, num_classes = _SPEC[dataset]
    root = Path(out_dir) / folder
    root.mkdir(parents=True, exist_ok=True)
    x_train, y_train = fake_images(n_train, num_classes, seed, split=0)
    x_test, y_test = fake_images(n_test, num_classes, seed, split=1)
    names = [f"class_{i}" for i in range(num_classes)]
    if dataset == "cifar10":
        parts = np.array_split(np.arange(n_train), 5)
        for k, idx in enumerate(parts, start=1):
            _dump(root / f"data_batch_{k}", {"batch_label": f"training batch {k} of 5", "data": x_train[idx],
                                             "labels": [y_train[i] for i in idx],
                                             "filenames": [f"img_{i}.png" for i in idx]})
        _dump(root / "test_batch", {"batch_label": "testing batch 1 of 1", "data": x_test, "labels": y_test,
                                    "filenames": [f"test_{i}.png" for i in range(n_test)]})
        _dump(root / "batches.meta", {"label_names": names, "num_cases_per_batch": len(parts[0]),
                                      "num_vis": 3072})
    else:
        for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
            _dump(root / split, {"data": x, "fine_labels": y, "coarse_labels": [v // 5 for v in y],
                                 "filenames": [f"{split}_{i}.png" for i in range(len(y))],
                                 "batch_label": split})
        _dump(root / "meta", {"fine_label_names": names,
                              "coarse_label_names": [f"superclass_{i}" for i in range(20)]})
    (root / SYNTHETIC_MARKER).write_text(f"synthetic data written by sambench (seed {seed})\n")
    return root
