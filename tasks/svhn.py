"""SVHN (SAM paper Table 5, appendix B.1): torchvision's SVHN, cropped house-number digits, 32x32 RGB.

Training set: `train` + `extra` (73,257 + 531,131 = 604,388 images); test set: `test` (26,032). The
official SAM code trains on both (sam_jax/datasets/dataset_source.py, class SVHN: `train` concatenated with
`extra`, num_training_obs 604,388), and the paper's appendix says nothing that departs from it, so `extra`
is used.

Recipe (svhn.toml) and augmentation as the SAM code: WRN-28-10, batch 256, lr 0.01, weight decay 5e-4, SAM
rho 0.01 (Shake-Shake too), its SVHN mean/std, and its `basic` augmentation, which is the same for every
dataset, digits included: a horizontal flip, then a random crop of the image mirrored ("REFLECT") by 4
pixels. A mirrored digit is not always a digit, but that is what the paper's numbers were trained with.
`--augment autoaugment` uses torchvision's SVHN policy and then `basic`, as the SAM code's `autoaugment`
(its `aa-only`, the policy alone, is not offered).

Files: `<data-dir>/svhn/{train,extra,test}_32x32.mat`, read by torchvision's SVHN class and checked against
its md5 sums; `--download` fetches them (extra is 1.3 GB). `bench data fake svhn DIR` writes small synthetic
.mat files in the same MATLAB format (`X` uint8 (32, 32, 3, N), `y` (N, 1) with 10 for the digit 0) into
`DIR/svhn/`, marked by a `SYNTHETIC` file (for it alone the md5 check is skipped).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.download import download_once
from bench.errors import UserError
from bench.registry import register_task
from bench.task import SYNTHETIC_MARKER, DataStatus, holding
from tasks.images import ImageSet, ImageTask, fake_images

RECIPE_FILE = str(Path(__file__).with_name("svhn.toml"))
SPLITS = {True: ("train", "extra"), False: ("test",)}
FOLDER = "svhn"


def _svhn_class(synthetic: bool):
    """torchvision's SVHN (imported when needed: tasks/images.py says why), or for synthetic data a copy with md5
    None: it then checks only that the file exists."""
    from torchvision import datasets
    if not synthetic:
        return datasets.SVHN

    class SyntheticSVHN(datasets.SVHN):
        split_list = {split: [url, name, None] for split, (url, name, _) in datasets.SVHN.split_list.items()}
    return SyntheticSVHN


def _tv_utils():
    from torchvision.datasets import utils
    return utils


def _file_name(split: str) -> str:
    return _svhn_class(False).split_list[split][1]


def svhn_root(data_dir: str | Path) -> Path:
    return Path(data_dir) / FOLDER


def is_synthetic(data_dir: str | Path) -> bool:
    return (svhn_root(data_dir) / SYNTHETIC_MARKER).exists()


def load_split(data_dir: str | Path, split: str, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels (N,)) of one .mat file; missing or unreadable: one line."""
    root = svhn_root(data_dir)
    path = root / _file_name(split)
    cls = _svhn_class(is_synthetic(data_dir))
    if download:  # one process downloads (bench/download.py), the others wait and find it done
        url, name, md5 = cls.split_list[split]
        # SVHN.download's own call, without the constructor's reading of the file (extra is 1.3 GB)
        download_once(root, f"svhn {split} into {root}", lambda: _tv_utils().check_integrity(str(path), md5),
                      lambda: _tv_utils().download_url(url, str(root), name, md5))
    try:
        ds = cls(str(root), split=split)
    except RuntimeError:  # torchvision: missing, or its md5 differs
        raise UserError(f"svhn {split} not found (or corrupted) at {path}; pass --download to fetch it, --data-dir "
                        f"to point at the folder that holds {FOLDER}/, or `bench data fake svhn DIR` for synthetic "
                        "data") from None
    except Exception as e:  # scipy's loadmat on a truncated or foreign file raises many types
        raise UserError(f"{path} cannot be read as a MATLAB file ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:120]}); delete it and fetch it again") from None
    return ds.data, ds.labels


class SvhnTask(ImageTask):
    recipe_file = RECIPE_FILE
    dataset = "svhn"

    def load(self, cfg, train: bool) -> ImageSet:
        parts = [load_split(cfg.data_dir, split, cfg.download) for split in SPLITS[train]]
        images = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        return ImageSet(images, labels, "NCHW")  # torchvision's SVHN keeps (N, 3, 32, 32)

    def is_synthetic(self, cfg) -> bool:
        return is_synthetic(cfg.data_dir)

    def data_status(self, data_dir: str | Path) -> DataStatus:
        root = svhn_root(data_dir)
        names = [_file_name(s) for s in ("train", "extra", "test")]
        return DataStatus(holding(root, names), f"{root}/", "`bench run svhn --download` fetches it (1.5 GB)")

    def make_fake(self, out_dir: str, train: int = 2000, test: int = 500, seed: int = 0, **_: Any) -> str:
        path = write_fake_svhn(out_dir, train, test, seed)
        return (f"wrote synthetic svhn ({train} training images: {train - train // 2} in train, {train // 2} in "
                f"extra; {test} test images) to {path}")


register_task("svhn", description="SVHN (train + extra), SAM Table 5 (torchvision's .mat files, the SAM code's "
                                  "recipe)")(SvhnTask)


def write_fake_svhn(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Synthetic SVHN as torchvision reads it: {train,extra,test}_32x32.mat written by scipy.io.savemat (MATLAB 5),
    X uint8 (32, 32, 3, N), y uint8 (N, 1) in 1..10 (10 is the digit 0). The training images are split
    between train and extra (extra gets half)."""
    from scipy.io import savemat
    if n_train < 2 or n_test < 1:
        raise UserError("--train must be >= 2 (train and extra) and --test >= 1")
    root = svhn_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    x_train, y_train = fake_images(n_train, 10, seed, split=0)
    x_test, y_test = fake_images(n_test, 10, seed, split=1)
    cut = n_train - n_train // 2
    parts = {"train": (x_train[:cut], y_train[:cut]), "extra": (x_train[cut:], y_train[cut:]),
             "test": (x_test, y_test)}
    for split, (x, y) in parts.items():
        labels = np.where(np.asarray(y) == 0, 10, y).astype(np.uint8)[:, None]
        savemat(root / _file_name(split), {"X": x.transpose(2, 3, 1, 0), "y": labels})
    (root / SYNTHETIC_MARKER).write_text(f"synthetic data written by sambench (seed {seed})\n")
    return root
