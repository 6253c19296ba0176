"""Sharpness measures against closed forms (a quadratic), a brute-force Hessian, ASAM's scale invariance,
and their contract (determinism, nothing changed); Kendall's tau-b against scipy."""
import copy
import math

import pytest
import scipy.stats
import torch
from torch import nn
from torch.func import functional_call

from bench.sharpness.measures import (MEASURES, RHO_MEASURES, Protocol, batches_of, loss_and_accuracy,
                                      measure)
from bench.report.stats import kendall_tau


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny tensors and models: one thread (see conftest)."""


def half_mse(out, y):
    return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()


def quadratic(eigs, n=60, rotate=True, seed=0):
    """Linear regression at its exact least-squares minimizer, where the loss is w -> L* + 0.5 d^T A d with
    A = X^T X / n = V diag(eigs) V^T (V = I when not rotated), built from orthonormal columns."""
    gen = torch.Generator().manual_seed(seed)
    d = len(eigs)
    u, _ = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))
    v = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0] if rotate else torch.eye(d)
    x = math.sqrt(n) * u @ torch.diag(torch.tensor(eigs, dtype=torch.float64).sqrt()) @ v.T.double()
    y = x @ torch.randn(d, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(n, generator=gen,
                                                                                    dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y.unsqueeze(-1)).solution.T)
    return model, x.float(), y.float(), (x.T @ x / n)


def test_batches_of_cuts_consecutive_chunks_last_smaller():
    x, y = torch.arange(10).float().unsqueeze(-1), torch.arange(10)
    chunks = batches_of(x, y, 4)
    assert [len(xb) for xb, _ in chunks] == [4, 4, 2]
    assert torch.equal(torch.cat([yb for _, yb in chunks]), y)


def test_quadratic_hessian_measures_match_the_closed_form():
    # Batches of 16 over 60 examples (the last one 12): the HVP must weight each batch by its size.
    model, x, y, a = quadratic([4.0, 2.0, 1.0, 0.5, 0.25])
    top = measure(model, x, y, half_mse, "hessian_top", None, Protocol(m=16))
    assert top == pytest.approx(torch.linalg.eigvalsh(a).max().item(), rel=1e-3)
    # Diagonal A: every Rademacher probe gives v^T A v = tr(A) exactly.
    model, x, y, a = quadratic([3.0, 1.5, 1.0, 0.5], rotate=False)
    trace = measure(model, x, y, half_mse, "hessian_trace", None, Protocol(m=16, iters=3))
    assert trace == pytest.approx(a.trace().item(), rel=1e-4)


def test_quadratic_worst_and_average_match_the_closed_form():
    rho, eigs = 0.1, [4.0, 2.0, 1.0, 0.5, 0.25]
    model, x, y, a = quadratic(eigs)
    one_batch = Protocol(m=len(x))
    worst = measure(model, x, y, half_mse, "worst_l2", rho, one_batch)
    exact = 0.5 * rho**2 * max(eigs)              # max of 0.5 d^T A d on the ball: the top eigenvector
    assert 0.99 * exact <= worst <= exact * (1 + 1e-4)
    avg = measure(model, x, y, half_mse, "avg_l2", rho, Protocol(m=len(x), iters=4000))
    assert avg == pytest.approx(0.5 * rho**2 * sum(eigs) / len(eigs), rel=0.05)   # E[u^T A u] = tr(A) / d
    # Diagonal A on the l-inf box: every corner is a maximum, 0.5 rho^2 tr(A).
    model, x, y, a = quadratic([3.0, 1.5, 1.0, 0.5], rotate=False)
    linf = measure(model, x, y, half_mse, "worst_linf", rho, Protocol(m=len(x)))
    assert linf == pytest.approx(0.5 * rho**2 * a.trace().item(), rel=1e-3)


@pytest.mark.parametrize("name", ["worst_l2", "worst_linf"])
def test_worst_backtracks_and_keeps_the_best_point(name):
    # L(w) = w - 2 w^2 at w = 0 (one weight, input 1), rho = 1: the first-order step lands on d = 1 (objective
    # -1), the halvings reach d = 0.25, the maximum 0.125, where the gradient is exactly 0 (random directions
    # then, all worse). The value is the best objective seen, not the last one.
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    loss_fn = lambda out, t: (out - 2 * out**2).mean()                     # noqa: E731
    x, y = torch.ones(4, 1), torch.zeros(4)
    assert measure(model, x, y, loss_fn, name, 1.0, Protocol(m=4, iters=8)) == pytest.approx(0.125, rel=1e-6)


def test_each_batch_draws_its_own_directions():
    # Two copies of one batch: with the same directions in both, the mean would equal the one batch's value.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    ce, protocol = nn.functional.cross_entropy, Protocol(m=8, iters=3)
    one = measure(model, x, y, ce, "avg_l2", 0.5, protocol)
    two = measure(model, torch.cat([x, x]), torch.cat([y, y]), ce, "avg_l2", 0.5, protocol)
    assert two != pytest.approx(one, rel=1e-4)


@pytest.mark.parametrize("name", ["worst_l2", "worst_adaptive_l2", "worst_linf", "worst_adaptive_linf"])
def test_one_ascent_step_is_the_first_order_solution(name):
    # iters = 1: the value is max(0, L(w + e) - L(w)) with SAM's / ASAM's e = rho T^2 g / ||T g||_2 (l2) or
    # e = rho T sign(g) (linf); T = |w| + eta on the "weight" parameters (adaptive), 1 elsewhere.
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(12, 3), torch.randint(0, 3, (12,))
    ce, rho, eta = nn.functional.cross_entropy, 0.2, 0.05
    w = dict(model.named_parameters())
    g = dict(zip(w, torch.autograd.grad(ce(model(x), y), list(w.values()))))
    t = {n: p.detach().abs() + eta if "adaptive" in name and "weight" in n else torch.ones_like(p)
         for n, p in w.items()}
    if name.endswith("l2"):
        norm = torch.sqrt(sum(((t[n] * g[n]) ** 2).sum() for n in w))
        e = {n: rho * t[n] ** 2 * g[n] / norm for n in w}
    else:
        e = {n: rho * t[n] * g[n].sign() for n in w}
    with torch.no_grad():
        want = ce(functional_call(model, {n: w[n] + e[n] for n in w}, (x,)), y).item() - ce(model(x), y).item()
    got = measure(model, x, y, ce, name, rho, Protocol(m=12, iters=1, eta=eta))
    assert want > 0 and got == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("name", ["avg_l2", "avg_adaptive_l2"])
def test_avg_follows_the_documented_draws(name):
    # The docstring's protocol by hand: batch b draws z ~ N(0, I) from a generator seeded seed * 1_000_003 + b,
    # d = T rho z / ||z||_2, value = mean over draws and batches of L_B(w + d) - L_B(w), all from the same w.
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(20, 3), torch.randint(0, 3, (20,))
    ce, protocol, rho = nn.functional.cross_entropy, Protocol(m=8, iters=3, seed=2, eta=0.1), 0.5
    w = dict(model.named_parameters())
    t = {n: p.detach().abs() + protocol.eta if name == "avg_adaptive_l2" and "weight" in n else 1.0
         for n, p in w.items()}
    values = []
    with torch.no_grad():
        for b, (xb, yb) in enumerate(batches_of(x, y, protocol.m)):
            gen = torch.Generator().manual_seed(protocol.seed * 1_000_003 + b)
            base = ce(model(xb), yb).item()
            for _ in range(protocol.iters):
                z = {n: torch.randn(p.shape, generator=gen) for n, p in w.items()}
                norm = torch.sqrt(sum((v**2).sum() for v in z.values()))
                moved = {n: w[n] + t[n] * rho * z[n] / norm for n in w}
                values.append(ce(functional_call(model, moved, (xb,)), yb).item() - base)
    assert measure(model, x, y, ce, name, rho, protocol) == pytest.approx(sum(values) / len(values), rel=1e-5)


@pytest.mark.parametrize("name", ["worst_l2", "worst_adaptive_linf"])
def test_worst_is_the_mean_of_the_batches_values(name):
    # Each batch starts from the unperturbed weights: two batches measured together give the mean of each
    # measured alone (worst_* draw nothing off a critical point, so the batch index does not matter).
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(16, 3), torch.randint(0, 3, (16,))
    ce, protocol = nn.functional.cross_entropy, Protocol(m=8, iters=5)
    both = measure(model, x, y, ce, name, 0.5, protocol)
    alone = [measure(model, x[i:i + 8], y[i:i + 8], ce, name, 0.5, protocol) for i in (0, 8)]
    assert both == pytest.approx(sum(alone) / 2, rel=1e-5)


def brute_force_hessian(model, x, y, loss_fn):
    """The full Hessian of loss_fn(model(x), y) in the flattened parameters (autograd.functional)."""
    names, shapes = zip(*[(n, p.shape) for n, p in model.named_parameters()])
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(vec):
        params = dict(zip(names, torch.split(vec, [s.numel() for s in shapes])))
        params = {n: t.reshape(s) for (n, t), s in zip(params.items(), shapes)}
        return loss_fn(functional_call(model, params, (x,)), y)
    return torch.autograd.functional.hessian(loss, flat)


@pytest.fixture(scope="module")
def tanh_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(40, 3, dtype=torch.float64), torch.randint(0, 3, (40,))
    return model, x, y


@pytest.mark.parametrize("sign", [1, -1], ids=["loss", "negated_loss"])
def test_hessian_top_matches_the_brute_force_top_eigenvalue(tanh_mlp, sign):
    # The negated loss has its dominant eigenvalue negative: the shifted second power iteration must
    # still return the largest ALGEBRAIC one.
    model, x, y = tanh_mlp
    loss_fn = lambda out, t: sign * nn.functional.cross_entropy(out, t)     # noqa: E731
    h = brute_force_hessian(model, x, y, loss_fn)
    eigs = torch.linalg.eigvalsh(h)
    assert (abs(eigs[0]) > abs(eigs[-1])) == (sign == -1)                  # both branches exercised
    top = measure(model, x, y, loss_fn, "hessian_top", None, Protocol(m=16, power_iters=3000, power_tol=1e-9))
    assert top == pytest.approx(eigs[-1].item(), rel=1e-5)


def test_hessian_trace_is_hutchinson_of_the_brute_force_hessian(tanh_mlp):
    model, x, y = tanh_mlp
    h = brute_force_hessian(model, x, y, nn.functional.cross_entropy)
    probes = 400
    # Rademacher probes: Var(v^T H v) = 2 sum_{i != j} H_ij^2, so the mean is within 4 sd of tr(H).
    sd = math.sqrt(2 * ((h - torch.diag(torch.diag(h))) ** 2).sum().item() / probes)
    trace = measure(model, x, y, nn.functional.cross_entropy, "hessian_trace", None,
                    Protocol(m=16, iters=probes))
    assert abs(trace - h.trace().item()) < 4 * sd
    assert sd < 0.05 * h.trace().item()                                    # and 4 sd is a tight check


def test_adaptive_measures_are_invariant_to_rescaling_a_relu_net():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled[0].weight.mul_(4.0)
        scaled[2].weight.div_(4.0)
    assert torch.allclose(model(x), scaled(x), atol=1e-5)                 # the same function
    protocol, ce = Protocol(m=16, iters=10, eta=0.0), nn.functional.cross_entropy
    for name in ("worst_adaptive_l2", "worst_adaptive_linf", "avg_adaptive_l2"):
        before, after = (measure(net, x, y, ce, name, 0.5, protocol) for net in (model, scaled))
        assert abs(before) > 1e-4                    # not a trivial 0 (avg may be < 0 off a minimum)
        assert after == pytest.approx(before, rel=1e-4), name
    before, after = (measure(net, x, y, ce, "worst_l2", 0.5, protocol) for net in (model, scaled))
    assert abs(after - before) > 0.2 * before


def bn_model():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        for _ in range(3):                      # running stats away from their initial values
            model(torch.randn(16, 4) * 2 + 1)
    return model


@pytest.mark.parametrize("name", MEASURES)
def test_measure_is_deterministic_and_changes_nothing(name):
    model = bn_model()                          # left in train mode, with a submodule in eval mode
    model[3].eval()
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    protocol, rho = Protocol(m=8, iters=4, power_iters=10), (0.3 if name in RHO_MEASURES else None)
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    first = measure(model, x, y, nn.functional.cross_entropy, name, rho, protocol)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())   # weights and BN buffers
    assert [m.training for m in model.modules()] == [True, True, True, True, False]
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)                                 # global RNG untouched
    assert measure(model, x, y, nn.functional.cross_entropy, name, rho, protocol) == first
    model.eval()                                # the measure runs in eval mode whatever the caller's mode
    assert measure(model, x, y, nn.functional.cross_entropy, name, rho, protocol) == first
    if name.startswith("avg") or name == "hessian_trace":                         # the seed is used
        other = measure(model, x, y, nn.functional.cross_entropy, name, rho, Protocol(m=8, iters=4, seed=1))
        assert other != first


def test_loss_and_accuracy_weights_batches_by_size():
    model = bn_model().eval()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    loss, acc = loss_and_accuracy(model, x, y, nn.functional.cross_entropy, batch=4)
    with torch.no_grad():
        out = model(x)
    assert loss == pytest.approx(nn.functional.cross_entropy(out, y).item(), rel=1e-6)
    assert acc == pytest.approx(100.0 * (out.argmax(-1) == y).float().mean().item())


def test_unknown_measure_and_bad_rho_raise_one_line_value_errors():
    model = nn.Linear(2, 1, bias=False)
    x, y = torch.randn(4, 2), torch.randn(4)
    with pytest.raises(ValueError, match="unknown sharpness measure") as err:
        measure(model, x, y, half_mse, "worst_l3", 0.1, Protocol())
    assert "\n" not in str(err.value)
    for rho in (0.0, -0.1, None):
        with pytest.raises(ValueError, match="rho > 0"):
            measure(model, x, y, half_mse, "avg_l2", rho, Protocol())
    assert measure(model, x, y, half_mse, "hessian_trace", None, Protocol(iters=2)) > 0     # no rho needed


def test_kendall_tau_matches_scipy_tau_b_with_ties():
    x = [1, 2, 2, 3, 4, 4, 4, 5, 6, 6]
    y = [2.0, 1.0, 3.0, 3.0, 5.0, 4.0, 4.0, 6.0, 5.0, 7.0]
    assert kendall_tau(x, y) == pytest.approx(scipy.stats.kendalltau(x, y).statistic, abs=1e-12)
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, 4, (25,), generator=gen).tolist() for _ in range(2))
    assert kendall_tau(a, b) == pytest.approx(scipy.stats.kendalltau(a, b).statistic, abs=1e-12)


def test_kendall_tau_hand_computed_cases():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # Pairs: (1,2) tied in y, (1,3) and (2,3) concordant: 2 / sqrt(3 * 2).
    assert kendall_tau([1, 2, 3], [1, 1, 2]) == pytest.approx(2 / math.sqrt(6))
    assert math.isnan(kendall_tau([1], [2]))
    assert math.isnan(kendall_tau([1, 2, 3], [5, 5, 5]))
    assert math.isnan(kendall_tau([1, 2, float("nan")], [1, 2, 3]))
