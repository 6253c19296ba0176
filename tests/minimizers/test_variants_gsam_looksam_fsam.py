"""GSAM, LookSAM and F-SAM against hand-written per-parameter references (from the papers' equations, in the
order of the official code where there is one), their pass counts, option ranges and checkpoint round trips."""
import copy
import math

import pytest
import torch
from tiny import LoggedBatch, X, Y, closure_for, mlp, train_with_frozen_and_unused, weights
from torch import nn
from torch.nn import functional as F

from bench.minimizers import MINIMIZERS, SAM, LossScaler, Switches, create_minimizer
from bench.minimizers.fsam import FSAM
from bench.minimizers.gsam import GSAM
from bench.minimizers.looksam import LookSAM
from bench.train.batch import Cost

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- a tiny float64 model and its reference maths



def ref_grad(ws, x=X, y=Y):
    """The gradient of the same MLP written out by hand at weights ws = [W1, b1, W2, b2]."""
    ws = [w.detach().clone().requires_grad_(True) for w in ws]
    w1, b1, w2, b2 = ws
    loss = F.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)
    return [g.detach() for g in torch.autograd.grad(loss, ws)]


def norm(v):
    return math.sqrt(sum(float((t * t).sum()) for t in v))


def inner(a, b):
    return sum(float((s * t).sum()) for s, t in zip(a, b))


def assert_same(net, ws):
    for p, w in zip(net.parameters(), ws):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- GSAM

def test_gsam_matches_reference_with_scheduled_rho():
    rho, rho_min, alpha, lr_min, lr0, factors = 0.3, 0.05, 0.4, 0.01, 0.1, [1.0, 0.5, 0.2, 0.1]
    net = mlp()
    ws = weights(net)
    opt = GSAM(torch.optim.SGD(net.parameters(), lr=lr0), net, rho=rho, rho_min=rho_min, alpha=alpha, lr_min=lr_min)
    sched = torch.optim.lr_scheduler.LambdaLR(opt.base_optimizer, lambda t: factors[t])
    for t in range(3):
        # reference: Algorithm 1 with the official code's eps placement (perturb_eps = 1e-12)
        lr = lr0 * factors[t]
        rho_t = rho_min + (rho - rho_min) * (lr - lr_min) / (lr0 - lr_min)
        assert opt.radius() == pytest.approx(rho_t, rel=1e-12)
        g = ref_grad(ws)
        ng = norm(g)
        gs = ref_grad([w + rho_t * gi / (ng + 1e-12) for w, gi in zip(ws, g)])
        ns = norm(gs)
        cosine = inner(g, gs) / (ns * ng + 1e-12)
        g_perp = [gi - cosine * ng * si / (ns + 1e-12) for gi, si in zip(g, gs)]  # g's part orthogonal to g_s
        assert abs(inner(g_perp, gs)) < 1e-10 * ng * ns
        ws = [w - lr * (si - alpha * vi) for w, si, vi in zip(ws, gs, g_perp)]
        opt.step(closure_for(net))
        sched.step()
        assert_same(net, ws)


def test_gsam_rho_schedule_edges():
    net = mlp()
    flat = GSAM(torch.optim.SGD(net.parameters(), lr=0.1), net, rho=0.2, rho_min=0.1, lr_min=0.1)
    assert flat.radius() == 0.2                     # lr_max == lr_min: rho
    opt = GSAM(torch.optim.SGD(net.parameters(), lr=0.1), net, rho=0.2, rho_min=0.1, lr_min=0.0)
    assert opt.radius() == pytest.approx(0.2)       # at the peak lr: rho
    opt.base_optimizer.param_groups[0]["lr"] = 0.0
    assert opt.radius() == pytest.approx(0.1)       # at lr_min: rho_min
    opt.base_optimizer.param_groups[0]["lr"] = 0.05
    opt.base_optimizer.param_groups[0]["initial_lr"] = 0.2  # a scheduler's initial_lr is lr_max
    assert opt.radius() == pytest.approx(0.125)


def test_gsam_without_schedule_and_alpha_is_sam():
    ref, ours = mlp(), mlp()
    sam = SAM(torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), ref, rho=0.3)
    gsam = GSAM(torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9), ours, rho=0.3, rho_min=0.3, alpha=0.0)
    for _ in range(3):
        sam.step(closure_for(ref))
        gsam.step(closure_for(ours))
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)  # the eps differs: 1e-16 vs 1e-12


# ---------------------------------------------------------------- LookSAM

def test_looksam_matches_reference_both_step_kinds():
    rho, k, alpha, lr = 0.3, 2, 0.7, 0.1
    net = mlp()
    ws = weights(net)
    opt = LookSAM(torch.optim.SGD(net.parameters(), lr=lr), net, rho=rho, k=k, alpha=alpha)
    calls = []
    gv = None
    for t in range(5):
        g = ref_grad(ws)
        ng = norm(g)
        if t % k == 0:   # SAM step; keep g_v = g_s - (<g, g_s> / ||g||^2) g
            gs = ref_grad([w + rho * gi / (ng + 1e-16) for w, gi in zip(ws, g)])
            c = inner(g, gs) / ng ** 2
            gv = [si - c * gi for si, gi in zip(gs, g)]
            assert abs(inner(gv, g)) < 1e-10 * ng * norm(gs)
            update = gs
        else:            # one pass: g + alpha ||g|| / ||g_v|| g_v, with the g_v of the last SAM step
            update = [gi + alpha * ng / norm(gv) * vi for gi, vi in zip(g, gv)]
        ws = [w - lr * u for w, u in zip(ws, update)]
        closure = closure_for(net)
        opt.step(lambda: calls.append(t) or closure())
        assert_same(net, ws)
    assert calls == [0, 0, 1, 2, 2, 3, 4, 4]  # 2 passes on SAM steps, 1 on the others


def test_looksam_nominal_passes():
    net = mlp()
    assert LookSAM.passes == pytest.approx(1.2)  # the default k = 5, for listings
    opt = LookSAM(torch.optim.SGD(net.parameters(), lr=0.1), net, k=2)
    assert opt.passes == 1.5
    opt.load_state_dict({**opt.state_dict(), "hparams": {**opt.hparams(), "k": 4}})
    assert opt.passes == 1.25


# ---------------------------------------------------------------- F-SAM

def test_fsam_matches_reference_official_order():
    rho, sigma, lmbda, lr = 0.3, 0.8, 0.6, 0.1
    net = mlp()
    ws = weights(net)
    opt = FSAM(torch.optim.SGD(net.parameters(), lr=lr), net, rho=rho, sigma=sigma, lmbda=lmbda)
    m = None
    for _ in range(3):
        g = ref_grad(ws)
        if m is None:    # the official first step: d = g, m = g
            d, m = g, [gi.clone() for gi in g]
        else:            # d from the momentum before this step's gradient enters it, then the EMA
            d = [gi - sigma * mi for gi, mi in zip(g, m)]
            m = [lmbda * mi + (1 - lmbda) * gi for mi, gi in zip(m, g)]
        nd = norm(d)
        gs = ref_grad([w + rho * di / (nd + 1e-12) for w, di in zip(ws, d)])
        ws = [w - lr * si for w, si in zip(ws, gs)]
        opt.step(closure_for(net))
        assert_same(net, ws)
    for (name, p), mi in zip(net.named_parameters(), m):
        torch.testing.assert_close(opt.extra_state()["m"][name], mi, rtol=1e-10, atol=1e-12)


def test_fsam_first_step_is_sam():
    ref, ours = mlp(), mlp()
    SAM(torch.optim.SGD(ref.parameters(), lr=0.1), ref, rho=0.3).step(closure_for(ref))
    FSAM(torch.optim.SGD(ours.parameters(), lr=0.1), ours, rho=0.3).step(closure_for(ours))
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- all three

def test_registered():
    assert {"gsam", "looksam", "fsam"} <= set(MINIMIZERS)
    for name in ("gsam", "looksam", "fsam"):
        cls = MINIMIZERS[name]
        assert cls.ascent_sync and not cls.supports_chunks
        assert "arXiv" in cls.Hparams.__doc__ and "rho" in cls.Hparams.__dataclass_fields__


@pytest.mark.parametrize("name,opts,steps,passes,kinds", [
    ("gsam", {}, 2, 4, ["ascent", "descent"] * 2),
    ("looksam", {"k": 2}, 4, 6, ["ascent", "descent", "plain"] * 2),
    ("fsam", {}, 3, 6, ["ascent", "descent"] * 3),
])
def test_pass_counts_through_the_engine_batch(name, opts, steps, passes, kinds):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = create_minimizer(name, torch.optim.SGD(net.parameters(), lr=0.1), net, **opts)
    cost, seen = Cost(), []
    for _ in range(steps):
        out = opt.step(LoggedBatch(net, net, x, y, F.cross_entropy, cost=cost, kinds=seen))
        assert out.loss.ndim == 0 and out.out.shape == (8, 3)
    assert (cost.fwd_examples, cost.bwd_examples) == (passes * 8, passes * 8)
    assert (cost.fwd, cost.bwd) == (passes, passes)
    assert cost.passes() == passes
    assert passes / steps == opt.passes
    assert seen == kinds


@pytest.mark.parametrize("name,bad_pass,kinds", [
    ("gsam", 2, ["ascent", "descent"] * 2),
    ("looksam", 2, ["ascent", "descent"] * 2),  # no g_v after the skipped step: the next is a SAM step too
    ("fsam", 1, ["ascent"] + ["ascent", "descent"]),
])
def test_fp16_overflow_skips_the_step_and_keeps_no_inf(name, bad_pass, kinds):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    calls = []

    def loss_fn(out, target):  # the `bad_pass`-th pass overflows
        calls.append(1)
        loss = F.cross_entropy(out, target)
        return loss * float("inf") if len(calls) == bad_pass else loss

    scaler, cost, seen = LossScaler(), Cost(), []
    opt = create_minimizer(name, torch.optim.SGD(net.parameters(), lr=0.1), net, Switches(scaler=scaler),
                           **({"k": 3} if name == "looksam" else {}))
    before = weights(net)
    opt.step(LoggedBatch(net, net, x, y, loss_fn, cost=cost, scaler=scaler, kinds=seen))
    assert scaler.skipped == 1 and all(torch.equal(p, w) for p, w in zip(net.parameters(), before))
    assert all(p.grad is None for p in net.parameters())
    opt.step(LoggedBatch(net, net, x, y, loss_fn, cost=cost, scaler=scaler, kinds=seen))
    assert scaler.skipped == 1 and not all(torch.equal(p, w) for p, w in zip(net.parameters(), before))
    assert seen == kinds
    state = [v for d in opt.extra_state().values() if isinstance(d, dict) for v in d.values()]
    assert all(torch.isfinite(v).all() for v in state) and (name == "gsam" or state)


@pytest.mark.parametrize("name,bad", [
    ("gsam", {"alpha": -0.1}), ("gsam", {"rho": -0.1}), ("gsam", {"rho_min": -0.01}),
    ("gsam", {"lr_min": -1e-3}), ("gsam", {"rho": 0.05, "rho_min": 0.1}), ("gsam", {"alpha": float("nan")}),
    ("looksam", {"k": 0}), ("looksam", {"k": 1.5}), ("looksam", {"alpha": -0.1}), ("looksam", {"rho": -0.1}),
    ("fsam", {"rho": -0.1}), ("fsam", {"sigma": -1.0}), ("fsam", {"lmbda": 1.0}), ("fsam", {"lmbda": -0.1}),
])
def test_option_ranges_refused(name, bad):
    net = mlp()
    with pytest.raises(ValueError):
        create_minimizer(name, torch.optim.SGD(net.parameters(), lr=0.1), net, **bad)


def test_gsam_lr_min_above_lr_refused():
    net = mlp()
    with pytest.raises(ValueError):
        create_minimizer("gsam", torch.optim.SGD(net.parameters(), lr=0.1), net, lr_min=0.2)


def test_defaults_and_names():
    net = mlp()
    base = torch.optim.SGD(net.parameters(), lr=0.1)
    assert create_minimizer("gsam", base, net).hparams() == {
        "clip_norm": 0.0, "rho": 0.04, "rho_min": 0.02, "alpha": 0.01, "lr_min": 0.0,
        "bn_second_pass": "update", "second_pass_rng": "fresh"}
    g = create_minimizer("gsam", base, net, rho=0.1)
    assert (type(g), g.rho, g.rho_min, g.alpha, g.lr_min) == (GSAM, 0.1, 0.02, 0.01, 0.0)
    ls = create_minimizer("looksam", base, net)
    assert (type(ls), ls.rho, ls.k, ls.alpha) == (LookSAM, 0.05, 5, 0.7)
    fs = create_minimizer("fsam", base, net)
    assert (type(fs), fs.rho, fs.sigma, fs.lmbda) == (FSAM, 0.2, 1.0, 0.6)


def make(name, net, lr=0.1, **opts):
    base = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    return create_minimizer(name, base, net, **opts)


@pytest.mark.parametrize("name,opts,other", [
    ("gsam", {"rho": 0.3, "rho_min": 0.1, "alpha": 0.4}, {"rho": 1.0, "rho_min": 0.0, "alpha": 0.0}),
    ("looksam", {"rho": 0.3, "k": 3, "alpha": 0.5}, {"rho": 1.0, "k": 2, "alpha": 0.1}),
    ("fsam", {"rho": 0.3, "sigma": 0.8, "lmbda": 0.6}, {"rho": 1.0, "sigma": 0.0, "lmbda": 0.1}),
])
def test_state_dict_round_trip(name, opts, other):
    net = mlp()
    opt = make(name, net, **opts)
    opt.base_optimizer.param_groups[0]["lr"] = 0.05  # GSAM: below lr_max = the lr at construction (kept)
    for _ in range(2):
        opt.step(closure_for(net))
    state = copy.deepcopy(opt.state_dict())           # as if saved: nothing shared with `opt`
    net2, net3 = copy.deepcopy(net), copy.deepcopy(net)
    opt2 = make(name, net2, lr=0.5, **other)
    opt2.load_state_dict(state)
    opt3 = make(name, net3, lr=0.5, **other)           # the same, without the minimizer's own state
    opt3.load_state_dict({**copy.deepcopy(state), "extra": {}})  # (torch's load shares the momentum tensors)
    assert {k: getattr(opt2, k) for k in opts} == opts
    for _ in range(2):
        for n, o in ((net, opt), (net2, opt2), (net3, opt3)):
            o.step(closure_for(n))
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), net3.parameters()))


@pytest.mark.parametrize("name", ["gsam", "looksam", "fsam"])
def test_frozen_and_unused_parameters_untouched(name):
    train_with_frozen_and_unused(name, 4, **({"k": 2} if name == "looksam" else {}))