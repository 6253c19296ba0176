"""`--dropout` (RunConfig.dropout): the digits and image MLPs and the Wide ResNets take it; at 0 every model is
the very network of before (modules, parameter names, initial weights, outputs and torch's random stream), at
p > 0 dropout layers drop in train mode only; a model without dropout layers refuses a non-zero rate."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import tasks.digits as digits
import tasks.images as images
from bench.errors import UserError
from bench.registry import get_task
from bench.recipes import make_config
from tasks.models import MODEL_INFO, create_model, dropout_models
from tasks.models.wrn import wide_resnet


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


# -- the networks as they were before --dropout (the references p = 0 must equal) -------------------------------

def old_digits_mlp(num_classes: int = 10, hidden: int = 256) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def old_image_mlp(num_classes: int, in_chans: int, size: int, hidden: int = 512) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * size * size, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def built(builder, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The model built under `seed` and torch's random state right after building it."""
    torch.manual_seed(seed)
    model = builder()
    return model, torch.get_rng_state()


def train_forward(model: nn.Module, x: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A train-mode forward from a fixed random state: (output, torch's random state after it)."""
    model.train()
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model(x)
    return out, torch.get_rng_state()


def dropouts(model: nn.Module) -> list[nn.Dropout]:
    return [m for m in model.modules() if isinstance(m, nn.Dropout)]


def assert_same_network(new: nn.Module, new_rng, old: nn.Module, old_rng, x: torch.Tensor) -> None:
    assert [type(m) for m in new.modules()] == [type(m) for m in old.modules()]
    assert [n for n, _ in new.named_modules()] == [n for n, _ in old.named_modules()]
    assert list(new.state_dict()) == list(old.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))
    assert torch.equal(new_rng, old_rng)                 # building it drew what the old one drew
    out_new, rng_new = train_forward(new, x)
    out_old, rng_old = train_forward(old, x)
    assert torch.equal(out_new, out_old)
    assert torch.equal(rng_new, rng_old)                 # a train-mode forward draws nothing more
    new.eval(), old.eval()
    with torch.no_grad():
        assert torch.equal(new(x), old(x))


# -- p = 0 is the network of before ------------------------------------------------------------------------

def test_digits_mlp_at_zero_is_the_old_mlp():
    x = torch.rand(16, 64)
    for new in (lambda: digits.mlp(), lambda: digits.mlp(dropout=0.0)):
        assert_same_network(*built(new), *built(old_digits_mlp), x)
    assert not dropouts(digits.mlp(dropout=0.0))


def test_image_mlp_at_zero_is_the_old_mlp():
    task = get_task("fmnist-demo")
    x = torch.rand(8, 1, 28, 28)
    for new in (lambda: task.make_model("mlp"), lambda: task.make_model("mlp", 0.0)):
        assert_same_network(*built(new), *built(lambda: old_image_mlp(10, 1, 28)), x)


@pytest.mark.parametrize("name", ["wrn28_2"])
def test_wrn_at_zero_is_homuras_network(name):
    """create_model(name) is the network tests/task/test_models_homura.py checks against homura's recorded one."""
    x = torch.randn(2, 3, 32, 32)
    task = get_task("cifar10")
    for new in (lambda: create_model(name, dropout=0.0), lambda: task.make_model(name, 0.0)):
        assert_same_network(*built(new), *built(lambda: create_model(name)), x)
    assert not dropouts(create_model(name, dropout=0.0))


# -- p > 0: dropout layers, dropping in train mode only ----------------------------------------------------

def zero_fraction_through(model: nn.Module, x: torch.Tensor) -> float:
    """The fraction of activations the model's dropout layers zero in one train-mode forward."""
    zeros, total = [], []

    def hook(module, inputs, output):
        kept = inputs[0] != 0  # count only what dropout could have zeroed (ReLU already zeroes some)
        zeros.append(((output == 0) & kept).sum().item())
        total.append(kept.sum().item())
    handles = [m.register_forward_hook(hook) for m in dropouts(model)]
    train_forward(model, x)
    for h in handles:
        h.remove()
    return sum(zeros) / sum(total)


@pytest.mark.parametrize("builder, x, count", [
    (lambda p: digits.mlp(dropout=p), torch.rand(64, 64), 2),
    (lambda p: get_task("fmnist-demo").make_model("mlp", p), torch.rand(16, 1, 28, 28), 2),
    (lambda p: wide_resnet(16, 2, width=4, dropout=p), torch.randn(4, 3, 32, 32), 6),
])
def test_dropout_drops_in_train_mode_only(builder, x, count):
    plain, plain_rng = built(lambda: builder(0.0))
    model, rng = built(lambda: builder(0.3))
    assert len(dropouts(model)) == count and all(d.p == 0.3 for d in dropouts(model))
    # the same parameter names and the same initial weights (a dropout layer holds and draws nothing) ...
    assert list(model.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    assert torch.equal(rng, plain_rng)
    # ... and in train mode it drops about p of the activations, drawing from torch's random stream
    assert 0.25 < zero_fraction_through(model, x) < 0.35
    out_a, rng_a = train_forward(model, x, seed=1)
    out_b, _ = train_forward(model, x, seed=2)
    _, rng_plain = train_forward(plain, x, seed=1)
    assert not torch.equal(out_a, out_b) and not torch.equal(rng_a, rng_plain)
    # in eval mode it is the network without dropout, with the same weights (and BN statistics)
    plain.load_state_dict(model.state_dict())
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        assert torch.equal(model(x), plain(x))


def test_wrn_dropout_sits_between_the_two_convs_of_every_block():
    model = create_model("wrn28_2", dropout=0.3)
    blocks = [m for m in model.modules() if hasattr(m, "conv2") and hasattr(m, "norm2")]
    assert len(blocks) == 12 and all(isinstance(b.dropout, nn.Dropout) for b in blocks)
    seen = []
    block = blocks[0]
    hooks = [block.norm2.register_forward_hook(lambda *_: seen.append("norm2")),
             block.dropout.register_forward_hook(lambda *_: seen.append("dropout")),
             block.conv2.register_forward_hook(lambda *_: seen.append("conv2"))]
    train_forward(model, torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert seen == ["norm2", "dropout", "conv2"]


def test_models_with_dropout_layers():
    assert dropout_models() == ["wrn28_10", "wrn28_2"]
    assert all(MODEL_INFO[name]["dropout"] is (name in dropout_models()) for name in MODEL_INFO)
    assert get_task("fmnist-demo").has_dropout("mlp") and not get_task("cifar10").has_dropout("resnet20")
    with pytest.raises(ValueError, match="resnet20 has no dropout layers"):
        create_model("resnet20", dropout=0.3)
    assert not dropouts(create_model("resnet20", dropout=0.0))


# -- configs: who accepts --dropout, and run ids -------------------------------------------------------------

def test_dropout_refused_for_a_model_without_dropout_layers():
    with pytest.raises(UserError) as err:
        cfg = make_config("cifar10", model="resnet20", minimizer="sgd", dropout=0.3)
        get_task("cifar10").check_config(cfg)   # what runs before any data is read (ImageTask.build)
    message = str(err.value)
    assert "\n" not in message and "model resnet20 has no dropout layers" in message
    assert message.startswith("--dropout applies to wrn28_10, wrn28_2;")
    with pytest.raises(UserError, match=r"--dropout applies to mlp, wrn28_10, wrn28_2; model resnet20 has no"):
        get_task("fmnist-demo").make_model("resnet20", 0.3)


def test_build_refuses_dropout_before_reading_data(tmp_path):
    with pytest.raises(UserError, match="no dropout layers"):   # make_config refuses it ...
        make_config("cifar10", model="resnet20", minimizer="sgd", dropout=0.3, data_dir=str(tmp_path))
    ok = make_config("cifar10", model="resnet20", minimizer="sgd", data_dir=str(tmp_path))
    cfg = dataclasses.replace(ok, topts={**ok.topts, "dropout": 0.3})  # ... and so does build, for a config made some other way
    with pytest.raises(UserError, match="no dropout layers"):   # not "cifar10 not found"
        get_task("cifar10").build(cfg, torch.device("cpu"))


def test_tasks_without_the_setting_refuse_it():
    with pytest.raises(UserError, match="--dropout does not apply to task svhn"):
        make_config("svhn", minimizer="sgd", dropout=0.3)


@pytest.mark.parametrize("task, model", [("digits-noise", "mlp"), ("cifar10", "wrn28_2"), ("cifar100", "wrn28_10"),
                                         ("cifar10-noise", "wrn28_2"), ("fashion-mnist", "wrn28_10"),
                                         ("fmnist-demo", "mlp"), ("fmnist-demo-val", "mlp")])
def test_dropout_accepted(task, model):
    cfg = make_config(task, model=model, minimizer="sgd", dropout=0.3)
    assert cfg.dropout == 0.3 and "dropout" in get_task(task).settings
    if hasattr(get_task(task), "check_config"):
        get_task(task).check_config(cfg)
    assert cfg.run_id != make_config(task, model=model, minimizer="sgd").run_id


def test_digits_build_passes_dropout():
    job = get_task("digits-noise").build(make_config("digits-noise", minimizer="sgd", dropout=0.2),
                                         torch.device("cpu"))
    assert [d.p for d in dropouts(job.model)] == [0.2, 0.2]
    job = get_task("digits-noise").build(make_config("digits-noise", minimizer="sgd"), torch.device("cpu"))
    assert not dropouts(job.model)


def test_image_build_passes_dropout(fake_cifar10):
    cfg = make_config("cifar10", model="wrn28_2", minimizer="sgd", dropout=0.2, data_dir=str(fake_cifar10),
                      loader="torchvision", workers=0)
    job = get_task("cifar10").build(cfg, torch.device("cpu"))
    assert len(dropouts(job.model)) == 12 and all(d.p == 0.2 for d in dropouts(job.model))


def test_dropout_zero_keeps_the_run_id():
    plain = make_config("digits-noise", minimizer="sgd")
    assert make_config("digits-noise", minimizer="sgd", dropout=0.0).run_id == plain.run_id
    assert "dropout" not in plain.identity()
    assert make_config("digits-noise", minimizer="sgd", dropout=0.1).run_id != plain.run_id
    assert (make_config("cifar10", model="wrn28_2", minimizer="sgd", dropout=0.0).run_id
            == make_config("cifar10", model="wrn28_2", minimizer="sgd").run_id)


def test_perf_builds_with_one_argument():
    """`bench perf` calls task.make_model(name): no dropout, the model of before."""
    assert not dropouts(get_task("cifar10").make_model("wrn28_2"))
    assert not dropouts(get_task("fmnist-demo").make_model("mlp"))
