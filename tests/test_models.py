"""Every registered CIFAR model: forward/backward on CPU and its size against the published figure."""
import pytest
import torch

from tasks.models import MODEL_INFO, count_params, create_model, model_names


def test_issue_models_registered():
    assert {"resnet20", "resnet32", "resnet56", "wrn28_2", "wrn28_10"} <= set(model_names())


@pytest.mark.parametrize("name", model_names())
def test_param_count_matches_published(name):
    published = MODEL_INFO[name]["params_m"] * 1e6
    ours = count_params(create_model(name, num_classes=10))
    assert abs(ours - published) / published < 0.02, f"{name}: {ours} vs published {published:.0f}"


@pytest.mark.parametrize("name", [n for n in model_names() if MODEL_INFO[n]["params_m"] < 5])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_forward_backward(name, num_classes):
    model = create_model(name, num_classes=num_classes)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, num_classes)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_model():
    with pytest.raises(KeyError, match="resnet20"):
        create_model("resnet21")
