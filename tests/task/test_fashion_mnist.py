"""Fashion-MNIST (SAM Table 5) and its CPU demo: idx files, where they are found, refusals, splits, runs."""
import gzip
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.datasets.mnist import read_image_file, read_label_file
from typer.testing import CliRunner

import tasks.fashion_mnist as F
from bench.cli.main import app
from bench.errors import UserError
from bench.registry import get_task
from bench.recipes import make_config

SAM_RHO, ASAM_RHO = 0.3, 3.0  # the demo's radii, chosen on its validation split (tasks/fashion_mnist.toml)

@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny tensors and models: one thread (see conftest)."""


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    F.write_fake_fashion_mnist(root, 400, 60, seed=0)
    return root


@pytest.fixture
def no_system_copy(monkeypatch, tmp_path):
    """Pretend Debian's dataset-fashion-mnist package is not installed."""
    monkeypatch.setattr(F, "SYSTEM_DIR", tmp_path / "not-installed")


def test_fake_files_are_the_idx_format_torchvision_reads(fake_fmnist, tmp_path):
    raw = fake_fmnist / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["SYNTHETIC", "t10k-images-idx3-ubyte.gz",
                                                     "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz",
                                                     "train-labels-idx1-ubyte.gz"]
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):  # torchvision reads them unzipped
        (tmp_path / name).write_bytes(gzip.decompress((raw / f"{name}.gz").read_bytes()))
    images = read_image_file(str(tmp_path / "train-images-idx3-ubyte"))
    labels = read_label_file(str(tmp_path / "train-labels-idx1-ubyte"))
    ours, our_labels = F.load_fashion_mnist(fake_fmnist, train=True)
    assert images.shape == (400, 28, 28) and np.array_equal(images.numpy(), ours)
    assert np.array_equal(labels.numpy(), our_labels) and labels.max() <= 9


def test_data_dir_first_then_the_debian_package(fake_fmnist, tmp_path, monkeypatch):
    system = tmp_path / "usr-share"
    shutil.copytree(fake_fmnist / "FashionMNIST" / "raw", system)
    (system / "t10k-labels-idx1-ubyte.gz").rename(system / "t10k-labels-idx1-ubyte")  # plain files count too
    (system / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress(
        (fake_fmnist / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    monkeypatch.setattr(F, "SYSTEM_DIR", system)
    assert F.find_folder(tmp_path / "empty") == system
    assert len(F.load_fashion_mnist(tmp_path / "empty", train=False)[1]) == 60
    assert F.find_folder(fake_fmnist) == fake_fmnist / "FashionMNIST" / "raw"


def test_missing_everywhere_says_how_to_get_it(tmp_path, no_system_copy):
    with pytest.raises(UserError) as e:
        F.load_fashion_mnist(tmp_path, train=True)
    msg = str(e.value)
    assert "\n" not in msg and "apt-get install dataset-fashion-mnist" in msg and "--download" in msg
    assert str(tmp_path / "FashionMNIST" / "raw") in msg and "bench data fake fashion-mnist" in msg


@pytest.mark.parametrize("damage, message", [("truncate", "cannot be read"), ("short", "is truncated"),
                                             ("magic", "is not a 3-dimensional uint8 idx file")])
def test_damaged_files_are_one_line(fake_fmnist, tmp_path, no_system_copy, damage, message):
    raw = tmp_path / "FashionMNIST" / "raw"
    shutil.copytree(fake_fmnist / "FashionMNIST" / "raw", raw)
    path = raw / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    if damage == "truncate":   # a download cut short: the gzip stream ends early
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "short":    # complete gzip, too few pixels
        path.write_bytes(gzip.compress(data[:-28]))
    else:                      # a labels file under an images name
        path.write_bytes((raw / "train-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(UserError, match=message) as e:
        F.load_fashion_mnist(tmp_path, train=True)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.skipif(not (F.SYSTEM_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="real data: apt-get install dataset-fashion-mnist")
def test_real_data_from_the_debian_package(tmp_path):
    images, labels = F.load_fashion_mnist(tmp_path, train=False)
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
    assert not get_task("fashion-mnist").is_synthetic(make_config("fashion-mnist", minimizer="sgd",
                                                                  data_dir=str(tmp_path)))


def test_autoaugment_refused_in_one_line(fake_fmnist, tmp_path):
    r = CliRunner().invoke(app, ["run", "fashion-mnist", "--model", "resnet20", "--augment", "autoaugment",
                                 "--data-dir", str(fake_fmnist), "--results-dir", str(tmp_path), "--device", "cpu",
                                 "--quiet"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "does not fit task fashion-mnist" in r.output and "use basic, cutout or none" in r.output


def test_recipes():
    sam = make_config("fashion-mnist", minimizer="sam")
    assert (sam.model, sam.rho, sam.lr, sam.batch_size, sam.weight_decay, sam.noise) == ("wrn28_10", 0.05, 0.1,
                                                                                        256, 5e-4, 0.0)
    assert get_task("fashion-mnist").recipe("shake_shake26_2x96d")["minimizers"]["sam"]["rho"] == 0.02
    demo = make_config("fmnist-demo-val", minimizer="sam")
    assert demo.identity() | {"task": "fmnist-demo"} == make_config("fmnist-demo", minimizer="sam").identity()
    assert (demo.model, demo.augment, demo.loader) == ("mlp", "none", "device")


def test_demo_splits_hold_out_the_tail_of_the_training_set(fake_fmnist):
    cfg = make_config("fmnist-demo", minimizer="sgd", noise=0.4, data_dir=str(fake_fmnist),
                      topts={"train_images": 300})
    train, test = get_task("fmnist-demo").datasets(cfg)
    _, val = get_task("fmnist-demo-val").datasets(cfg)
    images, labels = F.load_fashion_mnist(fake_fmnist, train=True)
    assert (len(train), len(val), len(test)) == (300, 40, 60)    # the first 300 of the 360 before the tail
    assert np.array_equal(train.data, images[:300]) and np.array_equal(val.data, images[360:])
    assert val.targets == labels[360:].tolist()                  # validation labels stay clean
    assert train.clean_targets == labels[:300].tolist() and train.targets != train.clean_targets
    whole = make_config("fmnist-demo", minimizer="sgd", data_dir=str(fake_fmnist), topts={"train_images": 0})
    assert len(get_task("fmnist-demo").datasets(whole)[0]) == 360   # 0: the whole training part


def test_a_training_subset_larger_than_the_training_part_is_one_line(fake_fmnist, tmp_path):
    r = CliRunner().invoke(app, ["run", "fmnist-demo", "--minimizer", "sgd", "--epochs", "1", "--data-dir",
                                 str(fake_fmnist), "--results-dir", str(tmp_path), "--device", "cpu", "--quiet"])
    assert r.exit_code == 2 and "train_images=3000: the training part holds 360 images" in r.output
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("task, loader", [("fmnist-demo", "device"), ("fmnist-demo-val", "torchvision"),
                                          ("fashion-mnist", "device")])
def test_runs_end_to_end(fake_fmnist, tmp_path, task, loader):
    args = ["run", task, "--minimizer", "asam", "--epochs", "4", "--batch-size", "32", "--workers", "0",
            "--noise", "0.2", "--loader", loader, *(["--topt", "train_images=0"] if "demo" in task else []), "--data-dir", str(fake_fmnist), "--results-dir", str(tmp_path),
            "--quiet", "--device", "cpu"]
    if task == "fashion-mnist":  # a zoo model on one channel needs the builders' in_chans
        try:
            get_task(task).make_model("resnet20")
        except TypeError:
            pytest.skip("this checkout's model builders lack in_chans (tasks/models)")
        args += ["--model", "resnet20", "--augment", "cutout", "--lr", "0.1"]  # not the lr scaled to batch 32
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    row = pd.read_csv(tmp_path / f"{task}.csv").iloc[0]
    assert (row.status, row.synthetic, row.noise) == ("ok", True, 0.2) and row.realised_noise > 0
    assert row.test_size == (40 if task == "fmnist-demo-val" else 60)
    assert row.max_test_acc > 30  # learnable synthetic classes: well above chance (10 %) after 4 epochs


def test_mlp_sees_one_channel_28x28():
    model = get_task("fmnist-demo").make_model("mlp")
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == 784 * 512 + 512 + 512 * 512 + 512 + 5130


def test_fmnist_table_plans_the_chosen_demo(monkeypatch, tmp_path):
    import bench.tables.plan as P
    from bench.registry import tables_file
    from bench.tables.layout import load_tables
    monkeypatch.setattr(P, "PRESETS", tuple(dict.fromkeys((*P.PRESETS, "fmnist"))))  # if plan.py lacks it
    tables = load_tables(tables_file())
    assert tables["fmnist"]["paper"] == "demo"  # no paper figure beside it
    assert set(tables["fmnist"]["metrics"].values()) == {"max_test_acc", "final_test_acc"}
    runs = P.plan(tables, ["fmnist"], "fmnist", results_dir=str(tmp_path))[0].runs
    assert len(runs) == 27 and {c.seed for c in runs} == {0, 1, 2} and {c.noise for c in runs} == {0.0, 0.4, 0.6}
    assert {(c.minimizer, c.rho) for c in runs} == {("sgd", 0.0), ("sam", SAM_RHO), ("asam", ASAM_RHO)}
    assert all((c.task, c.model, c.epochs, c.batch_size, c.lr, c.augment, c.topts["train_images"])
               == ("fmnist-demo", "mlp", 60, 128, 0.1, "none", 3000) for c in runs)


@pytest.mark.skipif(not (F.SYSTEM_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="real data: apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_trains(tmp_path):
    """CI trains on real data: three epochs of the demo's MLP with SAM on its 3,000 training images."""
    from bench.train.runner import execute
    cfg = make_config("fmnist-demo", minimizer="sam", epochs=3, device="cpu", workers=0, seed=0,
                      data_dir=str(tmp_path / "none"), results_dir=str(tmp_path))
    row = execute(cfg)
    assert row["status"] == "ok" and row["synthetic"] is False and row["train_size"] == 3000
    assert row["final_test_acc"] > 60  # three epochs of SAM (rho 0.3) on 3,000 clean images: 69.8 % on the real test set
