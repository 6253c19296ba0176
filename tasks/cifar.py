"""CIFAR-10 / CIFAR-100 (ASAM Tables 2 and 3): torchvision's datasets, the official recipe (cifar.toml).

Data lives under `--data-dir` exactly as torchvision's CIFAR10/CIFAR100 expect it
(`<data-dir>/cifar-10-batches-py/`, `<data-dir>/cifar-100-python/`); `--download` fetches it.
`bench data fake cifar10 DIR` writes a small synthetic set in the same pickle format, marked by a
`SYNTHETIC` file: for it (and only for it) the loader skips torchvision's md5 check.
Everything else (augmentation, loaders, models, label noise) is the generic image task, tasks/images.py.
"""
from __future__ import annotations

import os
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from bench.config import load_toml
from bench.download import download_once
from bench.errors import UserError
from bench.registry import register_task
from bench.task import SYNTHETIC_MARKER, DataStatus, holding, merge_recipe
from tasks.images import AugmentDropout, ImageSet, ImageTask, NoisyImages, fake_images

RECIPE_FILE = str(Path(__file__).with_name("cifar.toml"))

_SPEC = {  # torchvision class (imported when needed: tasks/images.py says why), its folder, number of classes
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10),
    "cifar100": ("CIFAR100", "cifar-100-python", 100),
}


def is_synthetic(root: str | Path, dataset: str) -> bool:
    return (Path(root) / _SPEC[dataset][1] / SYNTHETIC_MARKER).exists()


def _dataset_class(root: str, dataset: str):
    """torchvision's class, or for synthetic data a copy with md5 None (torchvision then checks only that the
    files exist)."""
    from torchvision import datasets
    cls = getattr(datasets, _SPEC[dataset][0])
    if not is_synthetic(root, dataset):
        return cls

    class Synthetic(cls):
        train_list = [(f, None) for f, _ in cls.train_list]
        test_list = [(f, None) for f, _ in cls.test_list]
        meta = {**cls.meta, "md5": None}
    return Synthetic


def _is_complete(root: str, cls) -> bool:
    """Every file of both splits and the metadata, checked against the class's md5 sums."""
    from torchvision.datasets.utils import check_integrity
    files = [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]
    return all(check_integrity(os.path.join(root, cls.base_folder, name), md5) for name, md5 in files)


def load_cifar(root: str | Path, dataset: str, train: bool, transform=None, download: bool = False):
    """torchvision's CIFAR dataset; a missing dataset is a one-line UserError saying how to get it."""
    folder = _SPEC[dataset][1]
    root = str(root)
    cls = _dataset_class(root, dataset)
    if download:  # one process downloads (bench/download.py), the others wait and find it done
        download_once(Path(root) / folder, f"{dataset} into {root}", lambda: _is_complete(root, cls),
                      lambda: cls(root, train=train, download=True))
    try:
        return cls(root, train=train, transform=transform, download=False)
    except RuntimeError:
        where = os.path.join(root, folder)
        raise UserError(
            f"{dataset} not found (or corrupted) at {where}/; pass --download to fetch it, --data-dir to "
            f"point at the folder that holds {folder}/, or `bench data fake {dataset} DIR` for synthetic "
            "data") from None


class CifarTask(ImageTask):
    recipe_file = RECIPE_FILE
    dataset = "cifar10"
    Options = AugmentDropout  # --dropout: the models with dropout layers (the WRNs)

    def load(self, cfg, train: bool) -> ImageSet:
        ds = load_cifar(cfg.data_dir, self.dataset, train, download=cfg.download and train)
        return ImageSet(ds.data, ds.targets, "NHWC")  # (N, 32, 32, 3) uint8, as torchvision keeps it

    def is_synthetic(self, cfg) -> bool:
        return is_synthetic(cfg.data_dir, self.dataset)

    def data_status(self, data_dir: str | Path) -> DataStatus:
        from torchvision import datasets
        name, folder, _ = _SPEC[self.dataset]
        cls = getattr(datasets, name)
        names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        root = Path(data_dir) / folder
        return DataStatus(holding(root, names), f"{root}/", f"`bench run {self.name} --download` fetches it")

    def make_fake(self, out_dir: str, train: int = 2000, test: int = 500, seed: int = 0, **_: Any) -> str:
        path = write_fake_cifar(out_dir, self.dataset, train, test, seed)
        return f"wrote synthetic {self.dataset} ({train} train / {test} test images) to {path}"


register_task("cifar10", dataset="cifar10",
              description="CIFAR-10, ASAM Table 2 (torchvision data, official recipe)")(CifarTask)
register_task("cifar100", dataset="cifar100",
              description="CIFAR-100, ASAM Table 3 (torchvision data, official recipe)")(CifarTask)


@register_task("cifar10-noise", dataset="cifar10",
               description="CIFAR-10 with symmetric label noise, ASAM Table 6 (--noise, --noise-seed)")
class LabelNoiseTask(CifarTask):
    """CIFAR-10 whose training labels are, each with probability `--noise`, replaced by a class drawn uniformly
    from the other nine (`tasks.images.symmetric_noise`). The corruption comes from its own seed (`--noise-seed`),
    never from the run's, so SGD, SAM and ASAM (and every training seed) see the very same noisy labels; the test
    labels stay clean. Its recipe: cifar.toml's, then label_noise.toml's."""
    Options = NoisyImages

    def recipe(self, model: str | None = None) -> dict[str, Any]:
        return merge_recipe(super().recipe(model), _noise_recipe())


@lru_cache(maxsize=None)
def _noise_recipe() -> dict[str, Any]:
    return load_toml(Path(__file__).with_name("label_noise.toml"))


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
    x_train, x_test = x_train.reshape(n_train, 3072), x_test.reshape(n_test, 3072)  # CIFAR's row layout
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
