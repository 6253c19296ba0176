"""Our resnet20/32/56, wrn28_2, wrn28_10 and resnext29_32x4d are homura-core 2021.3.1's models (what the
official ASAM code trains), checked against tests/fixtures/homura_cifar_resnet.pt, which
scripts/record_homura_fixture.py records from the homura wheel (so this test needs neither homura nor the
network): same state_dict names and shapes, same parameter counts, bit-identical initial weights under the
same seed, and the same outputs, in train and eval mode, from the same weights."""
from pathlib import Path

import pytest
import torch

from tasks.models import MODEL_INFO, count_params, create_model
from tasks.models.cifar_resnet import resnet
from tasks.models.resnext import resnext
from tasks.models.wrn import wide_resnet

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "homura_cifar_resnet.pt"
FULL = ["resnet20", "resnet32", "resnet56", "wrn28_2", "wrn28_10", "resnext29_32x4d"]
SMALL = {  # the fixture's small homura models, built with our builders
    "resnet14_w4": lambda: resnet(14, width=4),
    "wrn16_2_w2": lambda: wide_resnet(16, 2, width=2),
    "resnext20_2x32d_w4": lambda: resnext(20, 2, 32, width=4),
}
TOL = 1e-6


@pytest.fixture(scope="module")
def homura():
    return torch.load(FIXTURE)


def run(model, x, modes):
    out = {}
    with torch.no_grad():
        for mode in modes:
            model.train(mode == "train")
            out[mode] = model(x)
    return out


def test_fixture_covers_the_official_models(homura):
    assert homura["homura"] == "homura-core==2021.3.1"
    assert set(homura["full"]) == set(FULL) and set(homura["small"]) == set(SMALL)


@pytest.mark.parametrize("name", FULL)
def test_same_modules_and_counts_as_homura(homura, name):
    ref = homura["full"][name]
    model = create_model(name)
    sd = model.state_dict()
    assert list(sd) == ref["keys"]                     # same names, same order: homura checkpoints load as-is
    assert [tuple(t.shape) for t in sd.values()] == ref["shapes"]
    assert count_params(model) == ref["params"] == round(MODEL_INFO[name]["params_m"] * 1e6)


@pytest.mark.parametrize("name", FULL)
def test_same_seed_same_initial_weights_and_outputs(homura, name):
    """Under torch.manual_seed(0) our model's initial tensors are homura's (fingerprint of each), and
    from them (float64, so that CPU kernel differences cannot matter) it computes homura's outputs: a
    train-mode pass, then an eval-mode pass with the running statistics that pass left."""
    ref = homura["full"][name]
    torch.manual_seed(0)
    model = create_model(name)
    ours = torch.tensor([(t.double().sum().item(), t.double().square().sum().item())
                         for t in model.state_dict().values()], dtype=torch.float64)
    torch.testing.assert_close(ours, ref["fingerprint"], rtol=1e-9, atol=1e-9)
    out = run(model.double(), homura["x"].double(), ("train", "eval"))
    for mode in ("train", "eval"):
        assert (out[mode] - ref[mode]).abs().max().item() <= TOL * max(1.0, ref[mode].abs().max().item()), mode


@pytest.mark.parametrize("name", list(SMALL))
def test_homura_weights_give_homura_outputs(homura, name):
    """homura's weights (BN weights, biases and running statistics randomised) loaded into ours, strictly:
    eval-mode and then train-mode outputs equal homura's to 1e-6."""
    ref = homura["small"][name]
    model = SMALL[name]()
    model.load_state_dict(ref["state_dict"])
    out = run(model.double(), homura["x"].double(), ("eval", "train"))
    for mode in ("eval", "train"):
        assert ref[mode].abs().max() > 0.1                         # a non-trivial output to compare
        assert (out[mode] - ref[mode]).abs().max().item() <= TOL, mode


def test_layer_init_statistics():
    """What homura's init is, independently of the fixture: over 3 seeds, every conv weight has std
    sqrt(2 / fan_out) (kaiming normal, fan_out, relu), BN weight 1 / bias 0, and the Linear head PyTorch's
    default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(create_model("resnext29_32x4d"))   # plain, grouped and 1x1 convs, BN, Linear
    for name, p in models[0].named_parameters():
        values = torch.cat([dict(m.named_parameters())[name].detach().flatten() for m in models])
        if p.dim() == 4:
            fan_out = p.shape[0] * p.shape[2] * p.shape[3]
            expected = (2 / fan_out) ** 0.5
            # the sample std of n normals is within 5 / sqrt(2n) of the true one with near certainty
            assert abs(values.std().item() / expected - 1) < 5 / (2 * values.numel()) ** 0.5, name
            assert abs(values.mean().item()) < 5 * expected / values.numel() ** 0.5, name
        elif name.startswith("fc."):
            bound = 1 / models[0].fc.in_features ** 0.5
            assert values.abs().max() <= bound and values.abs().max() > 0.9 * bound, name
        else:
            assert torch.equal(values, torch.full_like(values, 1.0 if name.endswith("weight") else 0.0)), name
