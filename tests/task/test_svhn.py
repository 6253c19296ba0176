"""SVHN (SAM Table 5): synthetic .mat files in torchvision's format, train + extra, refusals, a run."""
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.io import loadmat
from typer.testing import CliRunner

from bench.cli.main import app
from bench.errors import UserError
from bench.registry import get_task
from bench.recipes import make_config
from tasks.svhn import load_split, write_fake_svhn


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny tensors and models: one thread (see conftest)."""


@pytest.fixture(scope="module")
def fake_svhn(tmp_path_factory):
    root = tmp_path_factory.mktemp("svhn")
    write_fake_svhn(root, 120, 40, seed=0)
    return root


def test_fake_files_are_svhn_mat_files(fake_svhn):
    folder = fake_svhn / "svhn"
    assert sorted(p.name for p in folder.iterdir()) == ["SYNTHETIC", "extra_32x32.mat", "test_32x32.mat",
                                                        "train_32x32.mat"]
    mat = loadmat(folder / "train_32x32.mat")
    assert mat["X"].dtype == np.uint8 and mat["X"].shape == (32, 32, 3, 60) and mat["y"].shape == (60, 1)
    assert set(np.unique(mat["y"])) <= set(range(1, 11))  # SVHN's labels: 10 is the digit 0
    images, labels = load_split(fake_svhn, "train")  # read by torchvision's own SVHN class
    assert images.shape == (60, 3, 32, 32) and labels.min() >= 0 and labels.max() <= 9
    assert np.array_equal(labels, np.where(mat["y"][:, 0] == 10, 0, mat["y"][:, 0]))
    assert np.array_equal(images[5].transpose(1, 2, 0), mat["X"][..., 5])


def test_training_set_is_train_plus_extra(fake_svhn):
    cfg = make_config("svhn", minimizer="sgd", data_dir=str(fake_svhn))
    train, test = get_task("svhn").datasets(cfg)
    assert (len(train), len(test), train.layout) == (120, 40, "NCHW")
    extra, _ = load_split(fake_svhn, "extra")
    assert np.array_equal(train.data[60:], extra)


def test_recipe_is_the_sam_papers():
    cfg = make_config("svhn", minimizer="sam")
    assert (cfg.model, cfg.rho, cfg.lr, cfg.batch_size, cfg.weight_decay) == ("wrn28_10", 0.01, 0.01, 256, 5e-4)
    assert (cfg.nesterov, cfg.weight_decay_style, cfg.schedule, cfg.label_smoothing, cfg.clip_norm) == (
        True, "loss", "cosine-step", 0.0, 5.0)


def test_missing_truncated_and_corrupted_files_are_one_line(fake_svhn, tmp_path):
    with pytest.raises(UserError, match="--download") as e:
        load_split(tmp_path, "test")
    assert "\n" not in str(e.value) and str(tmp_path / "svhn" / "test_32x32.mat") in str(e.value)
    import shutil
    shutil.copytree(fake_svhn / "svhn", tmp_path / "svhn")
    mat = tmp_path / "svhn" / "test_32x32.mat"
    mat.write_bytes(mat.read_bytes()[:5000])
    with pytest.raises(UserError, match="cannot be read as a MATLAB file") as e:
        load_split(tmp_path, "test")
    assert "\n" not in str(e.value)
    (tmp_path / "svhn" / "SYNTHETIC").unlink()  # real data: torchvision's md5 check refuses these files
    with pytest.raises(UserError, match="not found \\(or corrupted\\)"):
        load_split(tmp_path, "train")


@pytest.mark.parametrize("loader", ["torchvision", "device"])
def test_run_end_to_end(fake_svhn, tmp_path, loader):
    r = CliRunner().invoke(app, ["run", "svhn", "--model", "resnet20", "--minimizer", "sam", "--epochs", "1",
                                 "--batch-size", "32", "--workers", "0", "--augment", "cutout", "--loader", loader,
                                 "--data-dir", str(fake_svhn), "--results-dir", str(tmp_path), "--quiet",
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    row = pd.read_csv(tmp_path / "svhn.csv").iloc[0]
    assert (row.status, row.synthetic, row.train_size, row.test_size, row.rho) == ("ok", True, 120, 40, 0.01)


def test_cli_fake_and_missing_data(tmp_path):
    r = CliRunner().invoke(app, ["data", "fake", "svhn", str(tmp_path / "d"), "--train", "10", "--test", "4"])
    assert r.exit_code == 0 and "5 in extra" in r.output
    assert (tmp_path / "d" / "svhn" / "extra_32x32.mat").exists()
    r = CliRunner().invoke(app, ["run", "svhn", "--model", "resnet20", "--epochs", "1", "--data-dir",
                                 str(tmp_path / "none"), "--results-dir", str(tmp_path), "--device", "cpu"])
    assert r.exit_code == 2 and "svhn train not found" in r.output


def test_device_loader_takes_svhn_nchw_storage(fake_svhn):
    """SVHN's (N, 3, 32, 32) arrays go to the device loader as stored; its batches are the torchvision path's."""
    task = get_task("svhn")
    cfg = make_config("svhn", minimizer="sgd", model="resnet20", data_dir=str(fake_svhn), loader="device",
                      augment="none", batch_size=120)
    job = task.build(cfg, torch.device("cpu"))
    train, test = task.datasets(cfg)
    x, _ = next(iter(job.test_loader))
    assert torch.equal(x[3], test.transform(test.image(3)))
    order = job.train_loader.epoch_draws(0)[0]
    xt, yt = next(iter(job.train_loader))
    _, plain = task.transforms("none")
    assert xt.shape == (120, 3, 32, 32) and yt.tolist() == [train.targets[i] for i in order.tolist()]
    assert all(torch.equal(xt[k], plain(train.image(int(order[k])))) for k in (0, 59, 60, 119))
