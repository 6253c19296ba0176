"""Label-noise task (ASAM Table 6): the corruption, its seed, and the end-to-end run."""
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from bench.cli.main import app
from bench.recipes import make_config
from bench.registry import get_task
from tasks.images import symmetric_noise


@pytest.mark.parametrize("rate", [0.2, 0.4, 0.6, 0.8])
def test_realised_rate_and_no_label_kept_when_corrupted(rate):
    labels = np.random.default_rng(0).integers(0, 10, size=200_000)
    noisy, realised = symmetric_noise(labels, 10, rate, seed=123)
    assert realised == pytest.approx(rate, abs=0.005)
    changed = noisy != labels
    assert changed.mean() == realised
    assert noisy.min() >= 0 and noisy.max() < 10
    # the new class is uniform over the 9 others
    counts = np.bincount((noisy[changed] - labels[changed]) % 10, minlength=10)
    assert counts[0] == 0
    assert np.allclose(counts[1:] / counts[1:].sum(), 1 / 9, atol=0.01)


def test_corruption_fixed_by_its_own_seed():
    labels = np.arange(1000) % 10
    a, _ = symmetric_noise(labels, 10, 0.4, seed=5)
    b, _ = symmetric_noise(labels, 10, 0.4, seed=5)
    c, _ = symmetric_noise(labels, 10, 0.4, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_same_noisy_labels_for_every_minimizer_and_run_seed(fake_cifar10):
    task = get_task("cifar10-noise")
    sets = []
    for minimizer, seed in (("sgd", 0), ("sam", 1), ("asam", 2)):
        cfg = make_config("cifar10-noise", minimizer=minimizer, seed=seed, noise=0.6, noise_seed=3,
                          data_dir=str(fake_cifar10))
        train, test = task.datasets(cfg)
        sets.append((list(train.targets), list(test.targets), list(train.clean_targets)))
    assert sets[0] == sets[1] == sets[2]
    noisy, test_labels, clean = sets[0]
    clean_test = get_task("cifar10").datasets(make_config("cifar10", minimizer="sgd",
                                                          data_dir=str(fake_cifar10)))[1].targets
    assert test_labels == list(clean_test)  # the test split is untouched
    assert noisy != clean


def test_defaults_and_noise_refused_elsewhere():
    cfg = make_config("cifar10-noise", minimizer="asam")
    assert (cfg.model, cfg.noise, cfg.rho, cfg.eta) == ("resnet32", 0.2, 1.0, 0.0)
    r = CliRunner().invoke(app, ["run", "cifar10", "--noise", "0.4"])
    assert r.exit_code == 2 and "--noise does not apply to task cifar10" in r.output
    r = CliRunner().invoke(app, ["run", "cifar10-noise", "--noise", "1.5"])
    assert r.exit_code == 2 and "--noise must be in [0, 1]" in r.output


def test_run_records_noise_in_row(fake_cifar10, tmp_path):
    r = CliRunner().invoke(app, ["run", "cifar10-noise", "--minimizer", "sam", "--model", "resnet20",
                                 "--noise", "0.4", "--noise-seed", "9", "--epochs", "1", "--batch-size", "64",
                                 "--workers", "0", "--data-dir", str(fake_cifar10), "--results-dir",
                                 str(tmp_path), "--quiet"])
    assert r.exit_code == 0, r.output
    row = pd.read_csv(tmp_path / "cifar10-noise.csv").iloc[0]
    assert (row.noise, row.noise_seed, row.rho) == (0.4, 9, 0.1)
    assert row.realised_noise == pytest.approx(0.4, abs=0.12)  # 200 labels
    assert row.realised_noise == symmetric_noise(np.zeros(200, int), 10, 0.4, 9)[1]


def test_list_shows_noise_task():
    r = CliRunner().invoke(app, ["list"])
    assert "cifar10-noise" in r.output and "noise=0.2" in r.output
