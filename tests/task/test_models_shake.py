"""Shake-Shake (Gastaldi 2017, Shake-Shake-Image): the mixing module's forward/backward coefficients and
true_gradient, its shortcut, and -- for Shake-Shake and ShakeDrop nets alike -- that true_gradient gives
the true gradient of the sampled network (a finite-difference check) while the default does not."""
import pytest
import torch

from tasks.models.pyramidnet import PyramidNet
from tasks.models.shake_shake import ShakeShake, ShakeShakeNet, ShiftedProjection


def mix(flag: bool, a, b, g, seed: int = 5):
    m = ShakeShake().train()
    m.true_gradient = flag
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    torch.manual_seed(seed)
    y = m(a, b)
    y.backward(g)
    return y.detach(), a.grad, b.grad, torch.get_rng_state()


def test_shake_shake_coefficients_per_image():
    """Forward alpha * a + (1 - alpha) * b; backward beta * g and (1 - beta) * g, one alpha and one
    beta per image, both U[0, 1], drawn in that order; true_gradient: alpha * g and (1 - alpha) * g."""
    n = 128
    a, b, g = torch.randn(n, 3, 4, 4), torch.randn(n, 3, 4, 4), torch.randn(n, 3, 4, 4)
    torch.manual_seed(5)
    alpha, beta = torch.rand(n, 1, 1, 1), torch.rand(n, 1, 1, 1)
    y, ga, gb, state = mix(False, a, b, g)
    y_t, ga_t, gb_t, state_t = mix(True, a, b, g)
    assert torch.allclose(y, alpha * a + (1 - alpha) * b)
    assert torch.allclose(ga, beta * g) and torch.allclose(gb, (1 - beta) * g)
    assert torch.equal(y, y_t) and torch.equal(state, state_t)      # the flag changes no draw
    assert torch.allclose(ga_t, alpha * g) and torch.allclose(gb_t, (1 - alpha) * g)
    assert not torch.allclose(ga, ga_t)
    assert 0 <= alpha.min() and alpha.max() <= 1 and alpha.std() > 0.2


def test_shake_shake_eval_is_mean():
    a, b = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    m = ShakeShake().eval()
    m.true_gradient = True
    assert torch.allclose(m(a, b), 0.5 * (a + b))


def test_shifted_projection_halves():
    """Half the channels see x subsampled at (2i, 2j), the other half x at (2i + 1, 2j + 1)."""
    torch.manual_seed(0)
    proj = ShiftedProjection(2, 4, stride=2).eval()
    for conv in (proj.conv1, proj.conv2):
        conv.weight.data = torch.eye(2).view(2, 2, 1, 1)              # 1x1 identity on 2 channels
    x = torch.randn(1, 2, 6, 6)
    with torch.no_grad():
        out = proj(x)
    eps = proj.norm.eps
    assert out.shape == (1, 4, 3, 3)
    assert torch.allclose(out[:, :2], x[:, :, ::2, ::2] / (1 + eps) ** 0.5)
    assert torch.allclose(out[:, 2:], x[:, :, 1::2, 1::2] / (1 + eps) ** 0.5)


def small_nets():
    return {"shake_shake": lambda: ShakeShakeNet(blocks_per_stage=1, widen=1),
            "shakedrop": lambda: PyramidNet(20, 24, num_classes=10)}


@pytest.mark.parametrize("kind", list(small_nets()))
def test_true_gradient_is_the_sampled_networks_gradient(kind):
    """With true_gradient on every module that has it (as the engine sets it for SAM's first pass), the
    gradient matches the central finite difference of the loss with the same random draws, along a random
    direction; with the default (independent backward coefficients) it does not."""
    torch.manual_seed(0)
    model = small_nets()[kind]().double().train()
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    params = list(model.parameters())
    direction = [torch.randn_like(p) for p in params]

    def loss(flag: bool):
        for m in model.modules():
            if hasattr(m, "true_gradient"):
                m.true_gradient = flag
        torch.manual_seed(42)                                        # the same draws on every call
        return torch.nn.functional.cross_entropy(model(x), y)

    def shifted_loss(step: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(d, alpha=step)
            value = loss(False).item()
            for p, d in zip(params, direction):
                p.sub_(d, alpha=step)
        return value

    eps = 1e-8   # small: a wider step lets ReLU units cross their kink, which biases the difference
    numeric = (shifted_loss(eps) - shifted_loss(-eps)) / (2 * eps)
    slopes = {}
    for flag in (True, False):
        model.zero_grad()
        loss(flag).backward()
        slopes[flag] = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
    assert slopes[True] == pytest.approx(numeric, rel=1e-5)
    assert abs(slopes[False] - numeric) > 1e-3 * abs(numeric)
