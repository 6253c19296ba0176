"""The generic image task (tasks/images.py): --augment on both data paths, refusals, seeded resumes."""
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from bench.augment import Cutout, DeviceCifarLoader
from bench.cli.main import app
from bench.data import set_epoch
from bench.errors import UserError
from bench.registry import get_task
from bench.recipes import make_config
from tasks.images import ImageSet, symmetric_noise, use_device_loader

AUGMENTS = ("basic", "cutout", "autoaugment", "autoaugment-cutout", "none")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny tensors and models: one thread (see conftest)."""


def build(data_dir, augment="basic", loader="torchvision", task="cifar10", **kw):
    cfg = make_config(task, minimizer="sgd", model="resnet20", data_dir=str(data_dir), workers=0, batch_size=50,
                      augment=augment, loader=loader, **kw)
    return get_task(task).build(cfg, torch.device("cpu"))


def zero_boxes(x: torch.Tensor) -> list[tuple[int, int]]:
    """(height, width) of the all-channel zero rectangle of each image (asserting there is exactly one)."""
    out = []
    for img in x:
        zero = (img == 0).all(0)
        rows, cols = zero.any(1).nonzero()[:, 0], zero.any(0).nonzero()[:, 0]
        h, w = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
        assert zero.sum() == h * w
        out.append((h, w))
    return out


@pytest.mark.parametrize("loader", ["torchvision", "device"])
@pytest.mark.parametrize("augment", AUGMENTS)
def test_each_option_runs_or_is_refused_in_one_line(fake_cifar10, augment, loader):
    if loader == "device" and augment.startswith("autoaugment"):
        with pytest.raises(UserError, match="use --loader torchvision"):
            build(fake_cifar10, augment, loader)
        return
    job = build(fake_cifar10, augment, loader)
    assert isinstance(job.train_loader, DeviceCifarLoader) == (loader == "device")
    set_epoch(job.train_loader, 0)
    x, y = next(iter(job.train_loader))
    assert x.shape == (50, 3, 32, 32) and torch.isfinite(x).all() and y.shape == (50,)
    if augment.endswith("cutout"):
        assert all(8 <= h <= 16 and 8 <= w <= 16 for h, w in zero_boxes(x))


def test_none_is_normalisation_only(fake_cifar10):
    job = build(fake_cifar10, "none")
    train = job.train_loader.dataset.base
    order = [i for _, i in job.train_loader.sampler][:50]
    x, y = next(iter(job.train_loader))
    _, test_transform = get_task("cifar10").transforms("none")
    assert torch.equal(x, torch.stack([test_transform(train.image(i)) for i in order]))
    assert y.tolist() == [train.targets[i] for i in order]


def test_cutout_comes_last_and_keeps_the_crops(fake_cifar10):
    """Cutout zeroes normalised pixels (after Normalize) and draws after the crop and flip, so cutout's batch
    equals basic's outside the square."""
    train, _ = get_task("cifar10").transforms("cutout")
    assert isinstance(train.transforms[-1], Cutout) and type(train.transforms[-2]).__name__ == "Normalize"
    basic, _ = next(iter(build(fake_cifar10, "basic").train_loader))
    cut, _ = next(iter(build(fake_cifar10, "cutout").train_loader))
    kept = cut != 0
    assert torch.equal(cut[kept], basic[kept]) and not torch.equal(cut, basic)


def test_augmentation_is_seeded_per_example_so_resumes_are_identical(fake_cifar10):
    first = build(fake_cifar10, "autoaugment-cutout").train_loader
    again = build(fake_cifar10, "autoaugment-cutout").train_loader
    set_epoch(first, 1), set_epoch(again, 1)  # a run resumed at epoch 2
    a, b = next(iter(first)), next(iter(again))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    set_epoch(again, 2)
    assert not torch.equal(next(iter(again))[0], a[0])


def test_policies_and_padding_come_from_the_recipe_data():
    def ops(task, augment):
        return get_task(task).transforms(augment)[0].transforms
    cifar, svhn = ops("cifar10", "autoaugment"), ops("svhn", "autoaugment")
    assert cifar[0].policy.value == "cifar10" and svhn[0].policy.value == "svhn"
    assert cifar[1].padding_mode == "constant" and svhn[1].padding_mode == "reflect"  # ASAM code / SAM code
    assert [type(t).__name__ for t in ops("svhn", "basic")] == ["RandomCrop", "RandomHorizontalFlip", "ToTensor",
                                                                "Normalize"]
    assert [type(t).__name__ for t in ops("fashion-mnist", "none")] == ["ToTensor", "Normalize"]


def test_auto_loader_uses_the_device_path_only_where_it_can_augment():
    cuda = torch.device("cuda")  # only its type is read
    for augment, expected in (("basic", True), ("cutout", True), ("none", True), ("autoaugment", False)):
        cfg = make_config("cifar10", minimizer="sgd", augment=augment)
        assert use_device_loader(cfg, cuda) is expected
    assert not use_device_loader(make_config("cifar10", minimizer="sgd"), torch.device("cpu"))


def test_image_set_layouts_give_the_same_pil_images():
    g = torch.Generator().manual_seed(0)
    nhwc = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8, generator=g).numpy()
    a = ImageSet(nhwc, [0, 1, 2], "NHWC")
    b = ImageSet(nhwc.transpose(0, 3, 1, 2).copy(), [0, 1, 2], "NCHW")
    grey = ImageSet(nhwc[..., 0].copy(), [0, 1, 2], "NHW")
    assert (np.asarray(a.image(1)) == nhwc[1]).all() and (np.asarray(b.image(1)) == nhwc[1]).all()
    assert grey.image(1).mode == "L" and (np.asarray(grey.image(1)) == nhwc[1, ..., 0]).all()
    assert a.subset([2, 0]).targets == [2, 0]


def test_noise_settings_are_applied_by_any_task_that_lists_them(fake_cifar10):
    cfg = make_config("cifar10-noise", minimizer="sgd", noise=0.5, noise_seed=4, data_dir=str(fake_cifar10))
    train, _ = get_task("cifar10-noise").datasets(cfg)
    assert train.targets == symmetric_noise(train.clean_targets, 10, 0.5, 4)[0].tolist()


def test_cli_records_augment_and_refuses_in_one_line(fake_cifar10, tmp_path):
    base = ["run", "cifar10", "--model", "resnet20", "--epochs", "1", "--batch-size", "64", "--workers", "0",
            "--data-dir", str(fake_cifar10), "--results-dir", str(tmp_path), "--quiet", "--device", "cpu"]
    r = CliRunner().invoke(app, [*base, "--augment", "cutout"])
    assert r.exit_code == 0, r.output
    assert pd.read_csv(tmp_path / "cifar10.csv").iloc[0].augment == "cutout"
    r = CliRunner().invoke(app, [*base, "--augment", "autoaugment", "--loader", "device"])
    assert r.exit_code == 2 and "use --loader torchvision" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(app, [*base, "--augment", "mixup"])
    assert r.exit_code == 2 and "--augment must be one of" in r.output
