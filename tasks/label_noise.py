"""CIFAR-10 with symmetric label noise (ASAM Table 6), task `cifar10-noise`.

Each training label is, with probability `--noise`, replaced by a class drawn uniformly from the *other*
nine. The corruption comes from its own seed (`--noise-seed`), never from the run's seed, so SGD, SAM
and ASAM (and every training seed) see the very same noisy labels. Test labels stay clean.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from bench.registry import register_task
from bench.task import load_toml
from tasks.cifar import CifarTask

NOISE_RECIPE = load_toml(Path(__file__).with_name("label_noise.toml"))


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


@register_task("cifar10-noise", dataset="cifar10",
               description="CIFAR-10 with symmetric label noise, ASAM Table 6 (--noise, --noise-seed)")
class LabelNoiseTask(CifarTask):
    settings = ("noise", "noise_seed")

    def recipe(self, model: str | None = None) -> dict[str, Any]:
        return {**super().recipe(model), **NOISE_RECIPE}

    def datasets(self, cfg):
        train, test = super().datasets(cfg)
        noisy, realised = symmetric_noise(train.targets, self.num_classes, cfg.noise, cfg.noise_seed)
        train.clean_targets = list(train.targets)
        train.targets = noisy.tolist()
        train.realised_noise = realised  # the row records the realised rate (dataset_info)
        return train, test

    def dataset_info(self, train) -> dict[str, Any]:
        return {"realised_noise": train.realised_noise}
