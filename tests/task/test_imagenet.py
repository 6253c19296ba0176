"""ImageNet task: the folder layout through torchvision, real JPEG files, timm models, top-1/top-5."""
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from bench.cli.main import app
from bench.errors import UserError
from bench.registry import get_task
from bench.recipes import make_config

runner = CliRunner()


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    r = runner.invoke(app, ["data", "fake", "imagenet", str(root), "--classes", "6", "--per-class", "4"])
    assert r.exit_code == 0, r.output
    return root


def test_fake_tree_is_real_jpegs_in_the_imagenet_layout(fake_imagenet):
    train = sorted((fake_imagenet / "train").iterdir())
    assert [p.name for p in train] == [f"n{c:08d}" for c in range(6)]
    files = list((fake_imagenet / "train" / "n00000000").glob("*.JPEG"))
    assert len(files) == 4 and len(list((fake_imagenet / "val" / "n00000000").glob("*.JPEG"))) == 2
    with Image.open(files[0]) as im:
        assert im.format == "JPEG" and im.mode == "RGB"


def test_recipe_defaults():
    cfg = make_config("imagenet", minimizer="asam")
    assert (cfg.model, cfg.rho, cfg.eta, cfg.weight_decay, cfg.label_smoothing, cfg.epochs, cfg.lr) == \
        ("resnet50", 1.0, 0.01, 1e-4, 0.1, 100, 0.1)
    assert make_config("imagenet", minimizer="sam").rho == 0.05
    assert make_config("imagenet", minimizer="sgd", model="vit_tiny_patch16_224").model == "vit_tiny_patch16_224"


def test_run_top1_top5(fake_imagenet, tmp_path):
    r = runner.invoke(app, ["run", "imagenet", "--model", "resnet10t", "--minimizer", "sam", "--epochs", "1",
                            "--batch-size", "8", "--workers", "0", "--data-dir", str(fake_imagenet),
                            "--results-dir", str(tmp_path), "--quiet"])
    assert r.exit_code == 0, r.output
    row = pd.read_csv(tmp_path / "imagenet.csv").iloc[0]
    assert row.synthetic and row.num_classes == 6 and row.train_size == 24 and row.test_size == 12
    assert 0 <= row.max_test_acc <= row.max_test_top5 <= 100
    epochs = pd.read_csv(tmp_path / "runs" / row.run_id / "epochs.csv")
    assert {"test_acc", "test_top5", "data_time_s", "loader_items_per_s"} <= set(epochs.columns)


def test_missing_and_malformed_trees(tmp_path):
    task = get_task("imagenet")
    with pytest.raises(UserError, match="expected <data-dir>/train/<wnid>/\\*.JPEG"):
        task.build(make_config("imagenet", minimizer="sgd", data_dir=str(tmp_path)), device=None)
    (tmp_path / "train" / "n01").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    with pytest.raises(UserError, match="malformed ImageNet train folder"):
        task.build(make_config("imagenet", minimizer="sgd", data_dir=str(tmp_path)), device=None)
    r = runner.invoke(app, ["run", "imagenet", "--model", "nosuchnet"])
    assert r.exit_code == 2 and "unknown model 'nosuchnet'" in r.output


def test_the_model_is_in_the_format_the_row_says(fake_imagenet):
    """No hidden channels_last on CUDA: the row's channels_last is what ran (the engine converts when asked)."""
    import torch
    cfg = make_config("imagenet", model="resnet10t", minimizer="sgd", data_dir=str(fake_imagenet), workers=0)
    job = get_task("imagenet").build(cfg, torch.device("cuda"))  # building touches no GPU
    assert not cfg.channels_last
    assert all(p.is_contiguous() for p in job.model.parameters() if p.dim() == 4)


def test_loader_device_is_refused_in_one_line(fake_imagenet, tmp_path):
    with pytest.raises(UserError, match="--loader device does not apply to task imagenet"):
        make_config("imagenet", minimizer="sgd", loader="device")
    r = runner.invoke(app, ["run", "imagenet", "--model", "resnet10t", "--loader", "device", "--data-dir",
                            str(fake_imagenet), "--results-dir", str(tmp_path)])
    assert r.exit_code == 2 and "--loader device does not apply" in r.output and not list(tmp_path.iterdir())
    assert make_config("imagenet", minimizer="sgd", loader="torchvision").loader == "torchvision"
