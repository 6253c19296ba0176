"""SAM / ASAM against hand-computed cases, the official per-parameter algorithm, and their properties."""
import copy
import math

import pytest
import torch
from torch import nn

from bench.minimizers import ASAM, SAM, Minimizer, Switches, create_minimizer


class TwoParams(nn.Module):
    """L(a, b) = 0.5 a^2 + 2 b^2: gradient (a, 4b). `a` is named like a weight, `b` like a bias."""

    def __init__(self, a=3.0, b=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([a], dtype=torch.float64))
        self.bias = nn.Parameter(torch.tensor([b], dtype=torch.float64))

    def loss(self):
        return 0.5 * self.weight.pow(2).sum() + 2 * self.bias.pow(2).sum()


def one_step(cls, model, lr=0.1, **kw):
    opt = cls(torch.optim.SGD(model.parameters(), lr=lr), model, **kw)

    def closure():
        loss = model.loss()
        loss.backward()
        return loss.detach()

    return opt.step(closure)


def test_sam_hand_computed():
    m = TwoParams(3.0, 1.0)
    one_step(SAM, m, rho=0.5)
    # g = (3, 4), ||g|| = 5, e = 0.5 * g / 5 = (0.3, 0.4); g' at (3.3, 1.4) = (3.3, 5.6)
    # w <- w - 0.1 g' = (3 - 0.33, 1 - 0.56)
    assert m.weight.item() == pytest.approx(2.67, abs=1e-12)
    assert m.bias.item() == pytest.approx(0.44, abs=1e-12)


def test_asam_hand_computed():
    a, b, rho, eta, lr = 3.0, 1.0, 0.5, 0.01, 0.1
    m = TwoParams(a, b)
    one_step(ASAM, m, rho=rho, eta=eta)
    g = (a, 4 * b)
    t = (abs(a) + eta, 1.0)                      # T = |w| + eta on "weight", 1 on "bias"
    n = math.sqrt((t[0] * g[0]) ** 2 + (t[1] * g[1]) ** 2) + 1e-16
    e = (rho * t[0] ** 2 * g[0] / n, rho * t[1] ** 2 * g[1] / n)
    g2 = (a + e[0], 4 * (b + e[1]))
    assert m.weight.item() == pytest.approx(a - lr * g2[0], abs=1e-12)
    assert m.bias.item() == pytest.approx(b - lr * g2[1], abs=1e-12)


def test_first_pass_loss_is_returned():
    m = TwoParams(3.0, 1.0)
    assert one_step(SAM, m, rho=0.5).item() == pytest.approx(0.5 * 9 + 2)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)


def train_steps(model, opt, steps=3):
    x, y = batch()

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    for _ in range(steps):
        opt.step(closure)
    return model


@pytest.mark.parametrize("cls", [SAM, ASAM])
def test_rho_zero_equals_plain_base_step(cls):
    ref = small_net()
    ours = copy.deepcopy(ref)
    train_steps(ref, Minimizer(torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), ref))
    base = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    train_steps(ours, cls(base, ours, rho=0.0), steps=3)
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def official_ascent(model, rho, eta, adaptive):
    """The official per-parameter loop (SamsungLabs/ASAM asam.py), transcribed as the reference."""
    eps = {}
    with torch.no_grad():
        grads = []
        for n, p in model.named_parameters():
            if p.grad is None:
                continue
            if adaptive and "weight" in n:
                p.grad.mul_(p.abs() + eta)
            grads.append(torch.norm(p.grad, p=2))
        norm = torch.norm(torch.stack(grads), p=2) + 1e-16
        for n, p in model.named_parameters():
            if p.grad is None:
                continue
            if adaptive and "weight" in n:
                p.grad.mul_(p.abs() + eta)
            eps[n] = p.grad * (rho / norm)
            p.add_(eps[n])
    model.zero_grad()
    return eps


@pytest.mark.parametrize("cls,adaptive", [(SAM, False), (ASAM, True)])
def test_matches_official_per_parameter_loop(cls, adaptive):
    ref, ours = small_net(), small_net()
    x, y = batch()
    for m in (ref, ours):
        nn.functional.cross_entropy(m(x), y).backward()
    kw = {"rho": 0.7, "eta": 0.05} if adaptive else {"rho": 0.7}
    opt = cls(torch.optim.SGD(ours.parameters(), lr=0.1), ours, **kw)
    eps = official_ascent(ref, 0.7, 0.05, adaptive)
    opt.ascent_step()
    for (n, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8, msg=n)
        assert q.grad is None
    assert len(eps) == len(list(ours.parameters()))
    # the descent restores the weights exactly before the base step (lr 0 isolates the restore)
    before = [p.detach().clone() - e for p, e in zip(ref.parameters(), eps.values())]
    for g in opt.base_optimizer.param_groups:
        g["lr"] = 0.0
    nn.functional.cross_entropy(ours(x), y).backward()
    opt.descent_step()
    for b, q in zip(before, ours.parameters()):
        torch.testing.assert_close(b, q, rtol=0, atol=1e-7)


def relu_net(a: float):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False)).double()
    with torch.no_grad():
        net[0].weight.mul_(a)
        net[2].weight.div_(a)
    return net


def perturbed_loss(cls, a, **kw):
    net = relu_net(a)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
    opt = cls(torch.optim.SGD(net.parameters(), lr=0.1), net, **kw)
    nn.functional.cross_entropy(net(x), y).backward()
    clean = nn.functional.cross_entropy(net(x), y).item()
    opt.ascent_step()
    return clean, nn.functional.cross_entropy(net(x), y).item()


def test_asam_is_scale_invariant_and_sam_is_not():
    clean1, asam1 = perturbed_loss(ASAM, 1.0, rho=0.5, eta=0.0)
    clean5, asam5 = perturbed_loss(ASAM, 5.0, rho=0.5, eta=0.0)
    assert clean1 == pytest.approx(clean5, rel=1e-12)       # the rescaled net is the same function
    assert asam1 == pytest.approx(asam5, rel=1e-9)
    assert asam1 > clean1                                    # and the perturbation does something
    _, sam1 = perturbed_loss(SAM, 1.0, rho=0.5)
    _, sam5 = perturbed_loss(SAM, 5.0, rho=0.5)
    assert abs(sam1 - sam5) > 1e-3


@pytest.mark.parametrize("cls", [SAM, ASAM])
def test_frozen_and_unused_parameters_untouched(cls):
    net = small_net()
    net.register_parameter("unused_weight", nn.Parameter(torch.ones(3)))  # never in the loss: no gradient
    net[0].weight.requires_grad_(False)
    frozen, unused = net[0].weight.detach().clone(), net.unused_weight.detach().clone()
    params = [p for p in net.parameters() if p.requires_grad]
    train_steps(net, cls(torch.optim.SGD(params, lr=0.1, momentum=0.9), net, rho=0.5))
    assert torch.equal(net[0].weight, frozen)
    assert torch.equal(net.unused_weight, unused)


@pytest.mark.parametrize("kw", [{"rho": -0.1}, {"rho": float("nan")}, {"eta": -0.01}, {"eta": float("nan")}])
def test_bad_rho_eta_refused(kw):
    net = small_net()
    with pytest.raises(ValueError):
        ASAM(torch.optim.SGD(net.parameters(), lr=0.1), net, **kw)
    if "rho" in kw:
        with pytest.raises(ValueError):
            SAM(torch.optim.SGD(net.parameters(), lr=0.1), net, **kw)


def bn_stats(net):
    bn = net[1]
    return bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()


@pytest.mark.parametrize("mode,same", [("freeze", True), ("update", False)])
def test_bn_second_pass(mode, same):
    net, probe = small_net(), small_net()
    x, _ = batch()
    probe(x)  # one train-mode forward: the statistics after the first pass alone
    train_steps(net, SAM(torch.optim.SGD(net.parameters(), lr=0.1), net, rho=0.5, switches=Switches(bn_second_pass=mode)), steps=1)
    got, want = bn_stats(net), bn_stats(probe)
    assert all(torch.equal(g, w) for g, w in zip(got, want)) is same
    if not same:
        assert got[2].item() == 2  # both passes counted


def test_state_dict_round_trip():
    net = small_net()
    opt = ASAM(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net, rho=0.3, eta=0.02)
    train_steps(net, opt, steps=2)
    state = copy.deepcopy(opt.state_dict())  # as if saved to disk: no tensor shared with `opt`
    net2 = copy.deepcopy(net)
    opt2 = ASAM(torch.optim.SGD(net2.parameters(), lr=0.5, momentum=0.9), net2, rho=1.0, eta=0.1)
    opt2.load_state_dict(state)
    assert (opt2.rho, opt2.eta, opt2.param_groups[0]["lr"]) == (0.3, 0.02, 0.1)
    train_steps(net, opt, steps=1)
    train_steps(net2, opt2, steps=1)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)


def test_create_minimizer_by_name():
    net = small_net()
    base = torch.optim.SGD(net.parameters(), lr=0.1)
    assert type(create_minimizer("sgd", base, net)) is Minimizer
    assert type(create_minimizer("sam", base, net, rho=0.1)) is SAM
    asam = create_minimizer("asam", base, net, rho=0.2, eta=0.3)
    assert (type(asam), asam.rho, asam.eta) == (ASAM, 0.2, 0.3)


def test_an_option_a_minimizer_does_not_have_is_refused_not_dropped():
    """One way for options: SAM has no eta, the base optimizer alone no rho; saying so beats training without it."""
    from bench.options import OptionError
    net = small_net()
    base = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(OptionError, match="unknown option.s. eta for minimizer sam; its options: rho"):
        create_minimizer("sam", base, net, rho=0.1, eta=0.1)
    with pytest.raises(OptionError, match="unknown option.s. rho for the base optimizer alone"):
        create_minimizer("sgd", base, net, rho=0.1)
    with pytest.raises(OptionError, match="bn_second_pass"):  # the engine's switches are one typed value (Switches)
        create_minimizer("sam", base, net, bn_second_pass="freeze")


class RecordsDraws(nn.Module):
    """Dropout-like layer that remembers the random numbers each forward pass drew."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.draws = []

    def forward(self, x):
        mask = torch.rand(x.shape)
        self.draws.append(mask)
        return self.lin(x * mask)


@pytest.mark.parametrize("cls", [SAM, ASAM])
@pytest.mark.parametrize("mode", ["fresh", "reuse"])
def test_second_pass_randomness(cls, mode):
    torch.manual_seed(0)
    net = RecordsDraws()
    opt = cls(torch.optim.SGD(net.parameters(), lr=0.1), net, rho=0.5, switches=Switches(second_pass_rng=mode))
    x = torch.randn(5, 4)

    def closure():
        loss = net(x).pow(2).mean()
        loss.backward()
        return loss.detach()

    opt.step(closure)
    opt.step(closure)
    first, second, third, _ = net.draws
    assert torch.equal(first, second) is (mode == "reuse")
    assert not torch.equal(first, third)  # the next step always draws anew
    with pytest.raises(ValueError):
        cls(torch.optim.SGD(net.parameters(), lr=0.1), net, switches=Switches(second_pass_rng="same"))


def test_unknown_minimizer_name_is_refused_with_the_valid_ones():
    from bench.errors import UserError
    net = small_net()
    base = torch.optim.SGD(net.parameters(), lr=0.1)
    for name in ("sma", "SAM", ""):
        with pytest.raises(UserError) as e:
            create_minimizer(name, base, net)
        msg = str(e.value)
        assert "\n" not in msg and repr(name) in msg and all(v in msg for v in ("sam", "asam", "sgd", "adam"))
    assert type(create_minimizer("adam", base, net)) is Minimizer  # a base optimizer alone
    with pytest.raises(UserError):
        create_minimizer("adam", base, net, base_names=("sgd",))


def test_every_task_base_optimizer_runs_plain():
    from bench.minimizers import BASE_NAMES
    from bench.registry import get_task, task_names
    assert {get_task(t).base_optimizer for t in task_names()} <= set(BASE_NAMES)


@pytest.mark.parametrize("name", ["esam", "fsam", "gsam", "looksam"])
def test_step_chunks_is_refused_where_the_step_is_not_a_plain_perturbation(name):
    from bench.minimizers import MINIMIZERS
    net = small_net()
    opt = create_minimizer(name, torch.optim.SGD(net.parameters(), lr=0.1), net)
    assert not MINIMIZERS[name].supports_chunks
    with pytest.raises(NotImplementedError, match=f"{name} has no m-sharpness chunks"):
        opt.step_chunks([])
