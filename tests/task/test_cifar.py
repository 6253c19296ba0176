"""The CIFAR task's data path: synthetic files in torchvision's format, the real loader, the recipe."""
import pickle

import numpy as np
import pytest
import torch
from torchvision import datasets

from bench.errors import UserError
from bench.recipes import make_config
from tasks.cifar import load_cifar, write_fake_cifar


def test_fake_cifar10_is_torchvision_format(fake_cifar10):
    folder = fake_cifar10 / "cifar-10-batches-py"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["SYNTHETIC", "batches.meta", "data_batch_1", "data_batch_2", "data_batch_3",
                            "data_batch_4", "data_batch_5", "test_batch"])
    with open(folder / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    assert entry["data"].dtype == np.uint8 and entry["data"].shape[1] == 3072
    train = load_cifar(fake_cifar10, "cifar10", train=True)
    test = load_cifar(fake_cifar10, "cifar10", train=False)
    assert isinstance(train, datasets.CIFAR10)  # torchvision's own class reads it
    assert (len(train), len(test)) == (200, 100)
    img, label = train[0]
    assert img.size == (32, 32) and 0 <= label < 10
    assert train.classes == [f"class_{i}" for i in range(10)]


def test_fake_cifar100(tmp_path):
    write_fake_cifar(tmp_path, "cifar100", 300, 50, seed=1)
    train = load_cifar(tmp_path, "cifar100", train=True)
    assert isinstance(train, datasets.CIFAR100) and len(train) == 300 and len(train.classes) == 100
    assert max(train.targets) < 100


def test_real_data_keeps_md5_check(fake_cifar10, tmp_path):
    """Without the SYNTHETIC marker the files are checked against torchvision's md5 sums and refused."""
    import shutil
    shutil.copytree(fake_cifar10 / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "SYNTHETIC").unlink()
    with pytest.raises(UserError, match="not found \\(or corrupted\\)"):
        load_cifar(tmp_path, "cifar10", train=True)


def test_missing_data_says_what_to_do(tmp_path):
    with pytest.raises(UserError) as e:
        load_cifar(tmp_path, "cifar10", train=True)
    msg = str(e.value)
    assert str(tmp_path) in msg and "--download" in msg and "bench data fake" in msg and "\n" not in msg


def test_synthetic_classes_are_learnable_and_splits_share_templates(tmp_path):
    write_fake_cifar(tmp_path, "cifar10", 500, 200, seed=0)
    tr, te = load_cifar(tmp_path, "cifar10", True), load_cifar(tmp_path, "cifar10", False)
    xtr, ytr = torch.tensor(tr.data).float().flatten(1), torch.tensor(tr.targets)
    xte, yte = torch.tensor(te.data).float().flatten(1), torch.tensor(te.targets)
    centroids = torch.stack([xtr[ytr == c].mean(0) for c in range(10)])
    acc = (torch.cdist(xte, centroids).argmin(1) == yte).float().mean().item()
    assert acc > 0.5  # a nearest-centroid classifier transfers from train to test


def test_recipe_defaults_per_dataset():
    c10 = make_config("cifar10", minimizer="sam")
    c100 = make_config("cifar100", minimizer="sam")
    a10 = make_config("cifar10", minimizer="asam")
    a100 = make_config("cifar100", minimizer="asam")
    assert (c10.rho, c100.rho, a10.rho, a100.rho) == (0.05, 0.10, 0.5, 1.0)
    assert (a10.eta, a100.eta, c10.eta) == (0.0, 0.0, 0.0)  # ASAM's eta as released: example_cifar.py's --eta 0.0
    assert (c10.lr, c10.momentum, c10.weight_decay, c10.batch_size, c10.epochs) == (0.1, 0.9, 5e-4, 128, 200)
    assert (c10.label_smoothing, c10.schedule, c10.nesterov, c10.model) == (0.1, "cosine", False, "resnet20")
    sgd = make_config("cifar10", minimizer="sgd", lr=0.05, epochs=3)
    assert (sgd.rho, sgd.lr, sgd.epochs) == (0.0, 0.05, 3)


@pytest.mark.parametrize("extra", [["--loader", "device"], ["--precision", "bf16", "--channels-last"],
                                   ["--loader", "device", "--minimizer", "asam", "--precision", "bf16"]])
def test_fast_path_options_run_on_cpu(fake_cifar10, tmp_path, extra):
    """The GPU-fast options (device-resident loader, bf16 autocast, channels_last) on the CPU."""
    import pandas as pd
    from typer.testing import CliRunner

    from bench.cli.main import app
    args = ["run", "cifar10", "--minimizer", "sam", "--epochs", "1", "--batch-size", "64", "--workers", "0",
            "--data-dir", str(fake_cifar10), "--results-dir", str(tmp_path), "--quiet", "--device", "cpu", *extra]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    row = pd.read_csv(tmp_path / "cifar10.csv").iloc[0]
    assert row.status == "ok" and row.train_size == 200
    assert row.precision == ("bf16" if "bf16" in extra else "fp32")


def test_device_loader_is_chosen_automatically_only_on_cuda(fake_cifar10):
    from bench.augment import DeviceCifarLoader
    from bench.registry import get_task
    task = get_task("cifar10")
    cfg = make_config("cifar10", minimizer="sgd", data_dir=str(fake_cifar10), workers=0)
    assert not isinstance(task.build(cfg, torch.device("cpu")).train_loader, DeviceCifarLoader)
    cfg = make_config("cifar10", minimizer="sgd", data_dir=str(fake_cifar10), workers=0, loader="device")
    job = task.build(cfg, torch.device("cpu"))
    assert isinstance(job.train_loader, DeviceCifarLoader) and len(job.train_loader.dataset) == 200
