"""Fashion-MNIST (SAM paper Table 5, appendix B.1): 70,000 grey 28x28 images of 10 kinds of clothing.

Task `fashion-mnist`: the 60,000 training and 10,000 test images, the SAM code's recipe (fashion_mnist.toml:
WRN-28-10, batch 256, lr 0.1, weight decay 5e-4, SAM rho 0.05; Shake-Shake rho 0.02), its normalisation
(mean 0.1307, std 0.3081) and its `basic` augmentation (horizontal flip and a random crop of the image
mirrored by 4 pixels). AutoAugment is refused: the SAM code allows only none/basic (+ cutout) here. The
training labels take symmetric noise with `--noise` (default 0), as `cifar10-noise`.

Tasks `fmnist-demo` / `fmnist-demo-val`: the CPU demo (`bench reproduce fmnist --preset fmnist`), a small
MLP trained on the first 54,000 training images, with label noise. The last 6,000 training images are held
out as a validation split (the SAM code's own Fashion-MNIST validation split, `train[54000:]`):
`fmnist-demo-val` scores on them and is what the demo's settings were chosen with; `fmnist-demo` scores on
the test split, which chose nothing.

Where the files are looked for, in this order (each the four original idx files, gzipped or not):
`<data-dir>/FashionMNIST/raw/` (torchvision's layout; `--download` fills it), then
`/usr/share/datasets/fashion-mnist/` (Debian's `dataset-fashion-mnist` package). `bench data fake
fashion-mnist DIR` writes small synthetic idx files into `DIR/FashionMNIST/raw/`, marked `SYNTHETIC`.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.download import download_once
from bench.errors import UserError
from bench.registry import register_task
from bench.task import SYNTHETIC_MARKER, DataStatus
from bench.options import option
from tasks.images import ImageSet, ImageTask, NoisyImages, fake_images

RECIPE_FILE = str(Path(__file__).with_name("fashion_mnist.toml"))
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
HOW_TO_GET = ("pass --download, install Debian's dataset-fashion-mnist package (apt-get install "
              "dataset-fashion-mnist), point --data-dir at a folder with FashionMNIST/raw/, or write synthetic data "
              "with `bench data fake fashion-mnist DIR`")


def _file(folder: Path, name: str) -> Path | None:
    for path in (folder / name, folder / f"{name}.gz"):
        if path.is_file():
            return path
    return None


def find_folder(data_dir: str | Path) -> Path | None:
    """The first folder that holds all four idx files (see the module docstring), or None."""
    for folder in (Path(data_dir) / "FashionMNIST" / "raw", SYSTEM_DIR):
        if all(_file(folder, name) for names in FILES.values() for name in names):
            return folder
    return None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A uint8 idx file (LeCun's MNIST format: magic 0x0800 + ndim, big-endian sizes, then the bytes),
    gzipped or not; a truncated or foreign file is a one-line UserError."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path} cannot be read ({e}); delete it and fetch the data again") from None
    head = 4 * (ndim + 1)
    if len(raw) < head or struct.unpack(">I", raw[:4])[0] != 0x0800 + ndim:
        raise UserError(f"{path} is not a {ndim}-dimensional uint8 idx file; delete it and fetch the data again")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    if len(raw) != head + int(np.prod(dims)):
        raise UserError(f"{path} is truncated ({len(raw) - head} bytes of data, {int(np.prod(dims))} expected); "
                        "delete it and fetch the data again")
    # a writable copy: torch.as_tensor (the device loader) warns on read-only buffers
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims).copy()


def load_fashion_mnist(data_dir: str | Path, train: bool, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels (N,)) of one split."""
    if download:  # one process downloads (bench/download.py), the others wait and find it done
        download_once(Path(data_dir) / "FashionMNIST", f"fashion-mnist into {data_dir}",
                      lambda: find_folder(data_dir) is not None, lambda: _fetch(data_dir))
    folder = find_folder(data_dir)
    if folder is None:
        raise UserError(f"fashion-mnist not found in {Path(data_dir) / 'FashionMNIST' / 'raw'}/ nor {SYSTEM_DIR}/; "
                        + HOW_TO_GET)
    images_name, labels_name = FILES[train]
    images, labels = read_idx(_file(folder, images_name), 3), read_idx(_file(folder, labels_name), 1)
    if len(images) != len(labels):
        raise UserError(f"{folder}: {len(images)} images but {len(labels)} labels; fetch the data again")
    return images, labels


def _fetch(data_dir: str | Path) -> None:
    from torchvision import datasets
    datasets.FashionMNIST(str(data_dir), train=True, download=True)


class FashionMnistTask(ImageTask):
    recipe_file = RECIPE_FILE
    dataset = "fashion-mnist"
    Options = NoisyImages  # --dropout: the WRNs and the demo's MLP

    def load(self, cfg, train: bool) -> ImageSet:
        images, labels = load_fashion_mnist(cfg.data_dir, train, cfg.download)
        return ImageSet(images, labels, "NHW")

    def is_synthetic(self, cfg) -> bool:
        folder = find_folder(cfg.data_dir)
        return folder is not None and (folder / SYNTHETIC_MARKER).exists()

    def data_status(self, data_dir: str | Path) -> DataStatus:
        return DataStatus(find_folder(data_dir), f"{Path(data_dir)}/FashionMNIST/raw/ or {SYSTEM_DIR}/", HOW_TO_GET)

    def make_fake(self, out_dir: str, train: int = 2000, test: int = 500, seed: int = 0, **_: Any) -> str:
        path = write_fake_fashion_mnist(out_dir, train, test, seed)
        return f"wrote synthetic fashion-mnist ({train} train / {test} test images) to {path}"


@dataclass(frozen=True)
class DemoImages(NoisyImages):
    """augment, dropout, noise, noise_seed, train_images"""
    train_images: int = option(0, "train on the first N images of the demo's training part, before the held-out "
                                  "validation tail (0: all of it)", ge=0, integer=True)


class FashionMnistDemoTask(FashionMnistTask):
    """The demo: a held-out tail of the training split (`[fmnist-demo.split]`), scored on it or on the test
    split (`evaluate_on`); `train_images`: a training subset small enough for SGD to memorise its noisy labels
    in minutes on a CPU, the regime of both papers' label-noise tables."""

    Options = DemoImages
    local_models = ("mlp",)
    overrides = "fmnist-demo"
    evaluate_on = "test"

    def splits(self, cfg) -> tuple[ImageSet, ImageSet]:
        full = self.load(cfg, True)
        n_val = round(len(full) * self._table(self.overrides)["split"]["validation_fraction"])
        if not 0 < n_val < len(full):
            raise UserError(f"{len(full)} training images leave no validation split and training set")
        n_train = cfg.topts.get("train_images", 0) or len(full) - n_val
        if n_train > len(full) - n_val:
            raise UserError(f"train_images={n_train}: the training part holds {len(full) - n_val} images")
        train = full.subset(np.arange(n_train))
        held_out = full.subset(np.arange(len(full) - n_val, len(full)))
        return train, (held_out if self.evaluate_on == "validation" else self.load(cfg, False))


register_task("fashion-mnist", description="Fashion-MNIST, SAM Table 5 (idx files, the SAM code's recipe; "
                                           "--noise)")(FashionMnistTask)
register_task("fmnist-demo", description="Fashion-MNIST CPU demo: MLP on 54,000 training images, label noise, "
                                         "scored on the test split")(FashionMnistDemoTask)
register_task("fmnist-demo-val", evaluate_on="validation",
              description="as fmnist-demo, scored on the 6,000 held-out training images (choose settings "
                          "here)")(FashionMnistDemoTask)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(f">I{array.ndim}I", 0x0800 + array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fake_fashion_mnist(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Synthetic Fashion-MNIST as the four gzipped idx files torchvision downloads (one channel, 28x28)."""
    if n_train < 1 or n_test < 1:
        raise UserError("--train and --test must be >= 1")
    root = Path(out_dir) / "FashionMNIST" / "raw"
    root.mkdir(parents=True, exist_ok=True)
    for train, n, split in ((True, n_train, 0), (False, n_test, 1)):
        images, labels = fake_images(n, 10, seed, split, channels=1, size=28)
        images_name, labels_name = FILES[train]
        _write_idx(root / f"{images_name}.gz", images[:, 0])
        _write_idx(root / f"{labels_name}.gz", np.asarray(labels, dtype=np.uint8))
    (root / SYNTHETIC_MARKER).write_text(f"synthetic data written by sambench (seed {seed})\n")
    return root
