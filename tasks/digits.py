"""`digits-noise`: label noise on scikit-learn's bundled digits (real data that needs no download).

1,797 8x8 grey images scaled to [0, 1] and flattened; a fixed split (500 test images, drawn once with
seed 0, stratified by nothing but chance) that never depends on the run's seed; the training labels get the
symmetric noise of the `cifar10-noise` task; `--dropout` puts dropout after the MLP's hidden ReLUs. Data sits
in tensors on the device (`TensorLoader`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.config import load_toml
from bench.data import TensorLoader
from bench.errors import UserError
from bench.registry import register_task
from bench.task import DataStatus, Job, Task, check_examples, cross_entropy_per_example
from tasks.images import Dropout, LabelNoise, relu_dropout, symmetric_noise

RECIPE = load_toml(Path(__file__).with_name("digits.toml"))
TEST_SIZE = 500


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as `sklearn.datasets.load_digits` gives them ((1797, 64) pixels 0..16, labels), read
    from the CSV file bundled in its package without importing scikit-learn (~1 s of every run's start), or through
    it where the file is not where scikit-learn keeps it."""
    import importlib.util
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise UserError("the digits-noise task needs scikit-learn: pip install scikit-learn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        table = np.loadtxt(path, delimiter=",")
        return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits
    data = load_digits()
    return data.data, data.target


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    pixels, labels = load_digits_arrays()
    x = (pixels / 16.0).astype(np.float32)
    y = labels.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[:TEST_SIZE], order[TEST_SIZE:]
    return x[train], y[train], x[test], y[test]


def mlp(num_classes: int = 10, hidden: int = 256, dropout: float = 0.0) -> nn.Module:
    """Two hidden ReLU layers, each followed by dropout at rate `dropout` (RunConfig.dropout) when it is > 0; at 0
    no dropout module is built (`relu_dropout`): the very network, parameter names and random stream of before."""
    return nn.Sequential(nn.Linear(64, hidden), relu_dropout(dropout), nn.Linear(hidden, hidden),
                         relu_dropout(dropout), nn.Linear(hidden, num_classes))


@dataclass(frozen=True)
class NoisyDigits(LabelNoise, Dropout):
    """dropout, noise, noise_seed"""


@register_task("digits-noise", description="scikit-learn digits (real 8x8 images) with symmetric label "
                                           "noise, MLP: the no-download demo")
class DigitsNoiseTask(Task):
    Options = NoisyDigits
    loader_kinds = ("auto", "device")  # always device-resident tensors (TensorLoader)

    def data_status(self, data_dir) -> DataStatus:
        import importlib.util
        if importlib.util.find_spec("sklearn") is None:
            return DataStatus(None, "scikit-learn's bundled digits", "pip install scikit-learn")
        return DataStatus(None, "bundled with scikit-learn", bundled=True)

    def recipe(self, model: str | None = None) -> dict[str, Any]:
        return {**RECIPE, "models": ["mlp"]}

    def measure_examples(self, cfg, n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        x_train, y_train, x_test, y_test = load_digits_split()
        y_train, _ = symmetric_noise(y_train, 10, cfg.noise, cfg.noise_seed)  # the labels it trained on
        check_examples(self.name, n, len(y_train))
        return tuple(torch.as_tensor(a[:n], device=device) for a in (x_train, y_train, x_test, y_test))

    def build(self, cfg, device: torch.device) -> Job:
        x_train, y_train, x_test, y_test = load_digits_split()
        noisy, realised = symmetric_noise(y_train, 10, cfg.noise, cfg.noise_seed)
        t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
        train = TensorLoader(t(x_train), t(noisy), cfg.per_replica_batch, shuffle=True, seed=cfg.seed)
        test = TensorLoader(t(x_test), t(y_test), 500, shuffle=False)
        loss = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        return Job(model=mlp(dropout=cfg.dropout), train_loader=train, test_loader=test, loss_fn=loss,
                   num_train=len(y_train),
                   loss_per_sample=cross_entropy_per_example(cfg.label_smoothing),  # `loss`, per example
                   info={"train_size": len(y_train), "test_size": len(y_test), "realised_noise": realised})
