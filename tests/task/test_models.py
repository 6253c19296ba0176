"""Every registered CIFAR model: forward/backward on CPU, its size against the published figure, and its
input channels (1x28x28 Fashion-MNIST, 3x32x32 CIFAR/SVHN)."""
import pytest
import torch

from tasks.models import MODEL_INFO, count_params, create_model, model_names


def test_issue_models_registered():
    assert {"resnet20", "resnet32", "resnet56", "wrn28_2", "wrn28_10", "resnet20_a", "resnet32_a", "resnet56_a",
            "pyramidnet272", "pyramidnet272_shakedrop", "shake_shake26_2x96d"} <= set(model_names())


@pytest.mark.parametrize("name", model_names())
def test_param_count_matches_published(name):
    published = MODEL_INFO[name]["params_m"] * 1e6
    ours = count_params(create_model(name, num_classes=10))
    assert abs(ours - published) / published < 0.02, f"{name}: {ours} vs published {published:.0f}"


@pytest.mark.parametrize("name, count", [
    ("resnet20", 272_474), ("resnet32", 466_906), ("resnet56", 855_770),            # homura, option B
    ("resnet20_a", 269_722), ("resnet32_a", 464_154), ("resnet56_a", 853_018),      # He et al., option A
    ("wrn28_2", 1_467_610), ("wrn28_10", 36_479_194), ("resnext29_32x4d", 4_775_754),
    ("pyramidnet272", 26_210_842), ("pyramidnet272_shakedrop", 26_210_842),
    ("shake_shake26_2x96d", 26_192_922)])
def test_exact_param_counts(name, count):
    """Our exact counts (10 classes); the homura ones are also checked against the wheel's models in
    test_models_homura.py. Shake-Shake 26 2x96d: 26.2M in Gastaldi 2017, Table 1 (0.03 % off)."""
    assert count_params(create_model(name)) == count


@pytest.mark.parametrize("name", [n for n in model_names() if MODEL_INFO[n]["params_m"] < 5])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_forward_backward(name, num_classes):
    model = create_model(name, num_classes=num_classes)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, num_classes)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", model_names())
def test_input_channels_and_sizes(name):
    """Fashion-MNIST (1x28x28) and CIFAR/SVHN (3x32x32): the stem takes in_chans, the pooling any size."""
    for in_chans, size in ((1, 28), (3, 32)):
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, in_chans=in_chans)
        stem = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert stem.in_channels == in_chans
        with torch.no_grad():
            out = model.train()(torch.randn(2, in_chans, size, size))
        assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_unknown_model():
    with pytest.raises(KeyError, match="resnet20"):
        create_model("resnet21")
