"""The larger CIFAR zoo models (VGG-19-BN, DenseNet-121, ResNeXt-29 32x4d, PyramidNet-272 plain and with
ShakeDrop, Shake-Shake 26 2x96d): forward/backward on CPU, and ShakeDrop's forward/backward gates,
true_gradient and RNG reproducibility (Shake-Shake's own: test_models_shake.py)."""
import pytest
import torch

from tasks.models import MODEL_INFO, create_model, model_names
from tasks.models.pyramidnet import PyramidNet, ShakeDrop, ShakeDropFunction, shake_drop

ZOO = ["vgg19_bn", "densenet121", "resnext29_32x4d", "pyramidnet272", "pyramidnet272_shakedrop",
       "shake_shake26_2x96d"]


def test_zoo_models_registered():
    assert set(ZOO) <= set(model_names())
    for name in ZOO:
        assert MODEL_INFO[name]["recipe"] == {}
        assert MODEL_INFO[name]["source"]


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    return {name: create_model(name, num_classes=10) for name in ZOO}


@pytest.mark.parametrize("name", ZOO)
def test_forward_backward_cifar10(built, name):
    model = built[name].train()
    torch.manual_seed(1)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]


# PyramidNet-272 at 100 classes is left out (slow, and its only change is the head); the same head
# change is exercised on the three others.
@pytest.mark.parametrize("name", ["vgg19_bn", "densenet121", "resnext29_32x4d"])
def test_forward_backward_cifar100(name):
    model = create_model(name, num_classes=100)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ZOO)
def test_parameter_names_weight_bias(built, name):
    """ASAM scales parameters whose name contains "weight": every conv/linear/BN tensor must be named so."""
    for n, p in built[name].named_parameters():
        assert n.endswith(".weight") or n.endswith(".bias"), n


def test_eval_mode_deterministic(built):
    model = built["pyramidnet272_shakedrop"].eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(123)
        b = model(x)
    assert torch.equal(a, b)
    model.train()


# --- ShakeDrop -----------------------------------------------------------------------------------------

def test_pyramidnet272_plain_has_no_shakedrop(built):
    model = built["pyramidnet272"]
    assert not any(isinstance(m, ShakeDrop) for m in model.modules())
    assert model.drop_probs == [0.0] * 90
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():                                    # no randomness left in training mode
        torch.manual_seed(0)
        a = model.train()(x)
        torch.manual_seed(1)
        b = model(x)
    assert torch.equal(a, b)


def test_pyramidnet272_drop_probs_linear(built):
    model = built["pyramidnet272_shakedrop"]
    assert sum(isinstance(m, ShakeDrop) for m in model.modules()) == 90
    probs = model.drop_probs
    L = len(probs)
    assert L == 90                                           # (272 - 2) / 9 = 30 blocks per stage
    assert probs == pytest.approx([0.5 * l / L for l in range(1, L + 1)])
    assert probs[-1] == pytest.approx(0.5)
    assert all(b > a for a, b in zip(probs, probs[1:]))
    diffs = torch.tensor(probs).diff()
    assert torch.allclose(diffs, torch.full_like(diffs, 0.5 / L))


def test_shakedrop_eval_is_expectation():
    x = torch.randn(4, 3, 5, 5)
    for p in (0.0, 0.25, 0.5, 1.0):
        m = ShakeDrop(p).eval()
        torch.manual_seed(0)
        a = m(x)
        torch.manual_seed(1)
        b = m(x)
        assert torch.equal(a, b)
        assert torch.allclose(a, (1 - p) * x)


def test_shakedrop_p0_is_identity_forward_and_backward():
    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    g = torch.randn_like(x)
    y = ShakeDropFunction.apply(x, 0.0)                      # b = 1 always
    assert torch.equal(y, x.detach())
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_shakedrop_p1_uses_alpha_forward_beta_backward():
    n = 256
    x = torch.ones(n, 2, 3, 3, requires_grad=True)
    g = torch.ones_like(x)
    torch.manual_seed(0)
    y = ShakeDropFunction.apply(x, 1.0)                      # b = 0 always: y = alpha * x
    y.backward(g)
    alpha = y.detach()[:, 0, 0, 0]
    beta = x.grad[:, 0, 0, 0]
    # one factor per sample, broadcast over C, H, W
    assert torch.equal(y.detach(), alpha.view(n, 1, 1, 1).expand_as(y))
    assert torch.equal(x.grad, beta.view(n, 1, 1, 1).expand_as(x))
    assert alpha.min() >= -1 and alpha.max() <= 1
    assert alpha.min() < 0 < alpha.max()                     # alpha ~ U[-1, 1] has both signs
    assert beta.min() >= 0 and beta.max() <= 1
    assert not torch.equal(alpha, beta)                      # backward uses beta, not alpha


def test_shakedrop_train_values_match_formula():
    """Re-draw b, alpha, beta in the same order from the same seed: y = x (b + a - b a), dx = g (b + B - b B)."""
    n, p = 64, 0.4
    x = torch.randn(n, 3, 2, 2, requires_grad=True)
    g = torch.randn_like(x)
    torch.manual_seed(7)
    y = ShakeDropFunction.apply(x, p)
    y.backward(g)
    torch.manual_seed(7)
    shape = (n, 1, 1, 1)
    b = torch.bernoulli(torch.full(shape, 1 - p))
    alpha = torch.rand(shape) * 2 - 1
    beta = torch.rand(shape)
    assert 0 < b.sum() < n                                   # both gate values occur at this seed
    assert torch.allclose(y, x.detach() * (b + alpha - b * alpha))
    assert torch.allclose(x.grad, g * (b + beta - b * beta))
    kept = b.view(-1) == 1
    assert torch.equal(y.detach()[kept], x.detach()[kept])   # b = 1: branch passes unchanged
    assert torch.equal(x.grad[kept], g[kept])


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_shakedrop_true_gradient(p):
    """true_gradient: dL/dx = g * the forward's factor (b + alpha - b alpha); without it the backward's own
    factor (b + beta - b beta). The forward, and the draws it makes, are the same either way."""
    n = 64
    x = torch.randn(n, 3, 2, 2)
    g = torch.randn_like(x)
    runs = {}
    for flag in (True, False):
        m = ShakeDrop(p).train()
        m.true_gradient = flag
        xi = x.clone().requires_grad_()
        torch.manual_seed(3)
        y = m(xi)
        y.backward(g)
        runs[flag] = (y.detach(), xi.grad, torch.get_rng_state())
    torch.manual_seed(3)
    shape = (n, 1, 1, 1)
    b = torch.bernoulli(torch.full(shape, 1 - p))
    alpha = torch.rand(shape) * 2 - 1
    forward_gate = b + alpha - b * alpha
    assert torch.equal(runs[True][0], runs[False][0])
    assert torch.equal(runs[True][2], runs[False][2])
    assert torch.allclose(runs[True][0], x * forward_gate)
    assert torch.allclose(runs[True][1], g * forward_gate)
    assert not torch.allclose(runs[False][1], g * forward_gate)
    drawn = b.view(-1) == 0                                  # only there do alpha and beta matter
    assert (runs[False][1] - g * forward_gate)[drawn].abs().amin(dim=(1, 2, 3)).gt(0).all()


def test_shakedrop_rng_reproducible():
    x = torch.randn(32, 4, 3, 3)
    torch.manual_seed(0)
    a = shake_drop(x, 0.5, training=True)
    state = torch.get_rng_state()
    b = shake_drop(x, 0.5, training=True)                    # different RNG state -> different masks
    torch.set_rng_state(state)
    c = shake_drop(x, 0.5, training=True)
    torch.manual_seed(0)
    d = shake_drop(x, 0.5, training=True)
    assert not torch.equal(a, b)
    assert torch.equal(b, c)
    assert torch.equal(a, d)


def test_pyramidnet_train_rng_reproducible():
    """A small PyramidNet of the same kind (depth 20, 2 blocks per stage): train-mode outputs and
    gradients are a function of torch's RNG state."""
    torch.manual_seed(0)
    model = PyramidNet(20, 24, num_classes=10).train()
    x = torch.randn(4, 3, 32, 32)

    def step(seed=None, state=None):
        if seed is not None:
            torch.manual_seed(seed)
        if state is not None:
            torch.set_rng_state(state)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out1, g1 = step(seed=1)
    out2, g2 = step(seed=1)
    out3, _ = step(seed=2)
    assert torch.equal(out1, out2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(out1, out3)
    state = torch.get_rng_state()
    out4, g4 = step(state=state)
    out5, g5 = step(state=state)
    assert torch.equal(out4, out5)
    assert all(torch.equal(a, b) for a, b in zip(g4, g5))


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    from tasks.cifar import write_fake_cifar
    root = tmp_path_factory.mktemp("tiny")
    write_fake_cifar(root, "cifar10", 4, 4, seed=0)
    return root


@pytest.mark.parametrize("name", ["vgg19_bn", "densenet121", "resnext29_32x4d", "pyramidnet272_shakedrop",
                                  "shake_shake26_2x96d", "wrn28_10", "resnet56"])
def test_every_model_trains_through_bench_run(name, tiny_cifar, tmp_path):
    """One SAM step + evaluation through the real CLI, data loader and results row."""
    import pandas as pd
    from typer.testing import CliRunner

    from bench.cli.main import app
    r = CliRunner().invoke(app, ["run", "cifar10", "--model", name, "--minimizer", "sam", "--epochs", "1",
                                 "--batch-size", "4", "--workers", "0", "--data-dir", str(tiny_cifar),
                                 "--results-dir", str(tmp_path), "--quiet"])
    assert r.exit_code == 0, r.output
    row = pd.read_csv(tmp_path / "cifar10.csv").iloc[0]
    assert row.model == name and row.status == "ok" and row.epochs_done == 1


@pytest.mark.parametrize("mode", ["fresh", "reuse"])
def test_shakedrop_masks_across_sam_passes(mode):
    """The real ShakeDrop inside a PyramidNet under SAM: the second pass redraws its gates by default and
    replays the first pass's gates with second_pass_rng='reuse'."""
    from bench.minimizers import SAM, Switches
    torch.manual_seed(0)
    model = PyramidNet(20, 24, num_classes=10).train()
    gates = []
    last = model.blocks[-1].shake_drop  # p = 0.5: half the gates are random
    last.register_forward_hook(lambda mod, inp, out: gates.append((out / inp[0]).flatten(1)[:, 0].clone()))
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.01), model, rho=0.05, switches=Switches(second_pass_rng=mode))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def closure():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    opt.step(closure)
    assert len(gates) == 2
    assert torch.allclose(gates[0], gates[1]) is (mode == "reuse")
