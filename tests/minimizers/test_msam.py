"""Momentum-SAM against hand-written float64 references: a transcription of the official SGD class and training
loop (MarlonBecker/MSAM `optimizer/msam.py`, `main.py`: weights held perturbed between steps, moved up before and
back after each epoch), the paper's equations in the unperturbed form (parameter groups, Nesterov, dampening,
Adam), the official AdamW_MSAM; its one pass per step, fp16 overflow, refusals, resume, frozen parameters and
BatchNorm statistics."""
import copy
import math

import pytest
import torch
from tiny import LoggedBatch, mlp, train_with_frozen_and_unused, weights
from torch import nn
from torch.nn import functional as F

from bench.errors import UserError
from bench.minimizers import MINIMIZERS, LossScaler, OptionError, Switches, create_minimizer
from bench.minimizers.msam import MSAM
from bench.train.batch import Batch, Cost

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- a tiny float64 model and its reference maths

def data(t, n=16):
    """Step t's batch: a different one at every step, as in training."""
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def closure_for(net, t, l2=0.0):
    x, y = data(t)

    def closure():
        loss = F.cross_entropy(net(x), y)
        total = loss + 0.5 * l2 * sum((p * p).sum() for p in net.parameters()) if l2 else loss
        total.backward()
        return loss.detach()
    return closure


def ref_grad(ws, t):
    """The loss gradient of the same MLP written out by hand, at weights ws = [W1, b1, W2, b2], on step t's batch."""
    x, y = data(t)
    ws = [w.detach().clone().requires_grad_(True) for w in ws]
    w1, b1, w2, b2 = ws
    loss = F.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)
    return [g.detach() for g in torch.autograd.grad(loss, ws)]


def norm(v):
    return math.sqrt(sum(float((t * t).sum()) for t in v))


def assert_same(net, ws, rtol=1e-10, atol=1e-12):
    for p, w in zip(net.parameters(), ws):
        torch.testing.assert_close(p.detach(), w, rtol=rtol, atol=atol)


def clipped(g, max_norm):
    """torch's clip_grad_norm_: times max_norm / (||g|| + 1e-6), at most 1."""
    if not max_norm:
        return g
    coef = min(1.0, max_norm / (norm(g) + 1e-6))
    return [gi * coef for gi in g]


class OfficialMSAM:
    """MarlonBecker/MSAM `optimizer/msam.py` transcribed on lists of float64 tensors: `p` holds what the official
    parameters hold (perturbed between steps), `buf` starts at zeros, `inv` (inverse_norm_buffer) at 0."""

    def __init__(self, ws, lr, momentum, weight_decay, rho):
        self.p = [w.clone() for w in ws]
        self.buf = [torch.zeros_like(w) for w in ws]
        self.inv, self.lr, self.mu, self.wd, self.rho = 0.0, lr, momentum, weight_decay, rho

    def step(self, grads):
        for i, g in enumerate(grads):
            d = g + self.wd * self.p[i]                       # decay of the parameter as it is: perturbed
            self.p[i] = self.p[i] + self.rho * self.inv * self.buf[i]   # remove the last perturbation
            self.buf[i] = self.mu * self.buf[i] + d
            self.p[i] = self.p[i] - self.lr * self.buf[i]
        self.inv = 1 / (norm(self.buf) + 1e-12)
        self.p = [p - self.rho * self.inv * b for p, b in zip(self.p, self.buf)]  # perturb for the next step

    def move_up_to_momentumAscent(self):
        self.p = [p - self.rho * self.inv * b for p, b in zip(self.p, self.buf)]

    def move_back_from_momentumAscent(self):
        self.p = [p + self.rho * self.inv * b for p, b in zip(self.p, self.buf)]


# ---------------------------------------------------------------- SGD against the official class and loop

@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_sgd_matches_the_official_class_and_training_loop(clip):
    lr0, mu, wd, rho = 0.1, 0.9, 0.05, 0.3
    net = mlp()
    ref = OfficialMSAM(weights(net), lr0, mu, wd, rho)
    opt = MSAM(torch.optim.SGD(net.parameters(), lr=lr0, momentum=mu, weight_decay=wd), net,
               Switches(clip_norm=clip), rho=rho)
    t = 0
    for epoch in range(2):
        ref.move_up_to_momentumAscent()                        # main.py, before the epoch's steps
        for _ in range(3):
            lr = lr0 * (1 - 0.1 * t)                           # a per-step learning-rate schedule
            ref.lr = lr
            opt.base_optimizer.param_groups[0]["lr"] = lr
            ref.step(clipped(ref_grad(ref.p, t), clip))        # the official: the gradient where p stands
            opt.step(closure_for(net, t))
            t += 1
            # between steps ours holds the official's unperturbed point: p + rho v / (||v|| + 1e-12)
            assert_same(net, [p + rho * ref.inv * b for p, b in zip(ref.p, ref.buf)])
            # ... which is exactly rho away from what the official parameters hold then
            gap = [q.detach() - p for q, p in zip(net.parameters(), ref.p)]
            assert norm(gap) == pytest.approx(rho, rel=1e-9)
        ref.move_back_from_momentumAscent()                    # main.py, before testing and saving
        assert_same(net, ref.p)                                # the evaluated / saved weights: ours as they are
    for p, b in zip(net.parameters(), ref.buf):
        torch.testing.assert_close(opt.base_optimizer.state[p]["momentum_buffer"], b, rtol=1e-10, atol=1e-12)


def test_the_reference_sees_decay_at_the_perturbed_weights():
    """The official decays w~, not w: a step that decayed w would differ by more than the tolerance used above."""
    lr, mu, wd, rho = 0.1, 0.9, 0.05, 0.3
    net = mlp()
    opt = MSAM(torch.optim.SGD(net.parameters(), lr=lr, momentum=mu, weight_decay=wd), net, rho=rho)
    ws, v = weights(net), None
    for t in range(3):
        e = [rho * b / (norm(v) + 1e-12) for b in v] if v else [torch.zeros_like(w) for w in ws]
        g = ref_grad([w - ei for w, ei in zip(ws, e)], t)
        d = [gi + wd * w for gi, w in zip(g, ws)]              # decay at w: NOT the official
        v = [di.clone() for di in d] if v is None else [mu * b + di for b, di in zip(v, d)]
        ws = [w - lr * b for w, b in zip(ws, v)]
        opt.step(closure_for(net, t))
    assert max(float((p.detach() - w).abs().max()) for p, w in zip(net.parameters(), ws)) > 1e-6


# ---------------------------------------------------------------- the paper's equations, unperturbed form

def paper_sgd(ws, steps, groups, mu, rho, dampening=0.0, nesterov=False):
    """w~ = w - rho v / (||v|| + 1e-12), d = grad L(w~) + wd w~, torch's SGD buffer and update from d. `groups`:
    (indices into ws, lr, wd). v's norm is over all groups."""
    v = None
    for t in range(steps):
        e = [rho * b / (norm(v) + 1e-12) for b in v] if v else [torch.zeros_like(w) for w in ws]
        wt = [w - ei for w, ei in zip(ws, e)]
        g = ref_grad(wt, t)
        wd_of = {i: wd for idx, _, wd in groups for i in idx}
        lr_of = {i: lr for idx, lr, _ in groups for i in idx}
        d = [g[i] + wd_of[i] * wt[i] for i in range(len(ws))]
        v = [di.clone() for di in d] if v is None else [mu * b + (1 - dampening) * di for b, di in zip(v, d)]
        u = [di + mu * b for di, b in zip(d, v)] if nesterov else v
        ws = [w - lr_of[i] * u[i] for i, w in enumerate(ws)]
    return ws


@pytest.mark.parametrize("dampening,nesterov", [(0.0, False), (0.0, True), (0.3, False)])
def test_sgd_matches_the_papers_equations_with_groups_nesterov_dampening(dampening, nesterov):
    mu, rho = 0.9, 0.5
    groups = [([0, 1], 0.1, 0.05), ([2, 3], 0.03, 0.0)]     # two groups: their own lr and decay, one norm
    net = mlp()
    ps = list(net.parameters())
    base = torch.optim.SGD([{"params": [ps[i] for i in idx], "lr": lr, "weight_decay": wd} for idx, lr, wd in groups],
                           momentum=mu, dampening=dampening, nesterov=nesterov)
    expect = paper_sgd(weights(net), 4, groups, mu, rho, dampening, nesterov)
    opt = MSAM(base, net, rho=rho)
    for t in range(4):
        opt.step(closure_for(net, t))
    assert_same(net, expect)


def test_decay_in_the_loss_is_the_same_update():
    """--weight-decay-style loss (the L2 term in the loss, so at w~) and optimizer (SGD's decay, corrected to w~)
    give the same steps."""
    wd = 0.05
    a, b = mlp(), mlp()
    opt_a = MSAM(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=wd), a, rho=0.3)
    opt_b = MSAM(torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), b, rho=0.3)
    for t in range(4):
        opt_a.step(closure_for(a, t))
        opt_b.step(closure_for(b, t, l2=wd))
    assert_same(a, weights(b))


# ---------------------------------------------------------------- Adam and AdamW (exp_avg)

def adam_msam(ws, steps, lr, betas, eps, wd, rho, decoupled, decay_first):
    """The official AdamW_MSAM in the unperturbed form: e along exp_avg (zeros at start: no perturbation at the first
    step), Adam's update at w. decoupled: w *= 1 - lr wd, after the update as AdamW_MSAM (decay_first False) or
    before it as torch's AdamW; coupled (torch's Adam): wd w~ added to the gradient."""
    b1, b2 = betas
    m = [torch.zeros_like(w) for w in ws]
    v = [torch.zeros_like(w) for w in ws]
    nf = 0.0
    for t in range(steps):
        g = ref_grad([w - nf * mi for w, mi in zip(ws, m)], t)
        if not decoupled:
            g = [gi + wd * (w - nf * mi) for gi, w, mi in zip(g, ws, m)]
        k = t + 1
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        if decoupled and decay_first:
            ws = [w * (1 - lr * wd) for w in ws]
        ws = [w - lr / (1 - b1 ** k) * mi / (vi.sqrt() / math.sqrt(1 - b2 ** k) + eps)
              for w, mi, vi in zip(ws, m, v)]
        if decoupled and not decay_first:
            ws = [w * (1 - lr * wd) for w in ws]
        nf = rho / (norm(m) + 1e-12)
    return ws


@pytest.mark.parametrize("cls,wd", [(torch.optim.AdamW, 0.0), (torch.optim.AdamW, 0.1), (torch.optim.Adam, 0.05)])
def test_adam_follows_exp_avg(cls, wd):
    lr, betas, eps, rho = 0.01, (0.9, 0.999), 1e-8, 0.3
    net = mlp()
    ws = weights(net)
    opt = MSAM(cls(net.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=wd), net, rho=rho)
    for t in range(4):
        opt.step(closure_for(net, t))
    decoupled = cls is torch.optim.AdamW
    assert_same(net, adam_msam(ws, 4, lr, betas, eps, wd, rho, decoupled, decay_first=True))  # torch's order
    official = adam_msam(ws, 4, lr, betas, eps, wd, rho, decoupled, decay_first=False)       # AdamW_MSAM's
    assert_same(net, official, rtol=0, atol=4 * 4 * lr * lr * max(wd, 1e-12) * 10)          # O(lr^2 wd) a step


# ---------------------------------------------------------------- edges of the update

def test_first_step_is_the_base_step_and_rho_0_is_sgd():
    ref, ours, zero = mlp(), mlp(), mlp()
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = create_minimizer("msam", torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), ours)
    off = create_minimizer("msam", torch.optim.SGD(zero.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), zero,
                           rho=0.0)
    for t in range(3):
        sgd.zero_grad()
        closure_for(ref, t)()
        sgd.step()
        off.step(closure_for(zero, t))
        if t == 0:  # no momentum yet: no perturbation, the plain SGD step
            opt.step(closure_for(ours, t))
            assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), ours.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), zero.parameters()))


def test_weights_are_restored_when_the_pass_fails():
    net = mlp()
    opt = MSAM(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net, rho=0.3)
    opt.step(closure_for(net, 0))
    before = weights(net)

    def broken():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        opt.step(broken)
    assert_same(net, before, rtol=0, atol=1e-15)


def test_one_pass_per_step_through_the_engine_batch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = create_minimizer("msam", torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net)
    cost, seen = Cost(), []
    for _ in range(3):
        batch = LoggedBatch(net, net, x, y, F.cross_entropy, cost=cost, kinds=seen)
        out = opt.step(batch)
        assert out.loss.ndim == 0 and out.out.shape == (8, 3)
        assert batch.surrogate_gap() is None
    assert (cost.fwd_examples, cost.bwd_examples) == (3 * 8, 3 * 8)
    assert (cost.fwd, cost.bwd, cost.passes()) == (3, 3, 3)
    assert seen == ["plain"] * 3 and opt.passes == MSAM.passes == 1


def test_fp16_overflow_skips_the_step_and_keeps_the_momentum():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    calls = []

    def loss_fn(out, target):  # the second pass (the first perturbed one) overflows
        calls.append(1)
        loss = F.cross_entropy(out, target)
        return loss * float("inf") if len(calls) == 2 else loss

    scaler, cost = LossScaler(), Cost()
    opt = create_minimizer("msam", torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net,
                           Switches(scaler=scaler))
    opt.step(Batch(net, net, x, y, loss_fn, cost=cost, scaler=scaler))
    before, bufs = weights(net), [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in net.parameters()]
    opt.step(Batch(net, net, x, y, loss_fn, cost=cost, scaler=scaler))
    assert scaler.skipped == 1 and all(p.grad is None for p in net.parameters())
    assert_same(net, before, rtol=0, atol=1e-6)  # back at w (w - e + e: up to float32 rounding)
    assert all(torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], b) for p, b in zip(net.parameters(), bufs))
    opt.step(Batch(net, net, x, y, loss_fn, cost=cost, scaler=scaler))
    assert scaler.skipped == 1 and not all(torch.allclose(p, w) for p, w in zip(net.parameters(), before))
    assert all(torch.isfinite(p).all() for p in net.parameters())


# ---------------------------------------------------------------- options, refusals, resume

@pytest.mark.parametrize("bad", [{"rho": -0.1}, {"rho": float("nan")}, {"rho": float("inf")}, {"eta": 0.1}])
def test_option_ranges_refused(bad):
    net = mlp()
    with pytest.raises(ValueError):
        create_minimizer("msam", torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net, **bad)


@pytest.mark.parametrize("make,words", [
    (lambda ps: torch.optim.SGD(ps, lr=0.1), "momentum is 0"),
    (lambda ps: torch.optim.SGD([{"params": ps[:2]}, {"params": ps[2:], "momentum": 0.0}], lr=0.1, momentum=0.9),
     "momentum is 0"),
    (lambda ps: torch.optim.Adam(ps, betas=(0.0, 0.999)), "beta1"),
    (lambda ps: torch.optim.RMSprop(ps, momentum=0.9), "not RMSprop"),
])
def test_refused_without_momentum(make, words):
    net = mlp()
    with pytest.raises(OptionError, match=words) as info:
        create_minimizer("msam", make(list(net.parameters())), net)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value) and "msam" in str(info.value)


def make(net, lr=0.1, **opts):
    return create_minimizer("msam", torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4), net,
                            **opts)


def test_state_dict_round_trip_resumes_exactly():
    net = mlp()
    opt = make(net, rho=0.7)
    for t in range(3):
        opt.step(closure_for(net, t))
    state = copy.deepcopy(opt.state_dict())               # as if saved: nothing shared with `opt`
    assert state["extra"] == {} and state["hparams"]["rho"] == 0.7
    net2, net3 = copy.deepcopy(net), copy.deepcopy(net)
    opt2 = make(net2, lr=0.5, rho=3.0)
    opt2.load_state_dict(state)
    opt3 = make(net3, lr=0.5, rho=0.7)                     # the weights alone: no momentum, no perturbation
    assert opt2.rho == 0.7 and opt2.base_optimizer.param_groups[0]["lr"] == 0.1
    for t in range(3, 6):
        for n, o in ((net, opt), (net2, opt2), (net3, opt3)):
            o.step(closure_for(n, t))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), net2.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), net3.parameters()))


def test_frozen_and_unused_parameters_untouched():
    train_with_frozen_and_unused("msam", 4, closure=closure_for)


def test_batchnorm_statistics_come_from_the_perturbed_pass():
    """The official's only passes are at w~: the running statistics are updated there (and not recomputed at w)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    rho = 0.5
    opt = MSAM(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net, rho=rho)
    opt.step(closure_for(net, 0))
    probe = copy.deepcopy(net)                              # its BatchNorm buffers as they are now
    bufs = [opt.base_optimizer.state[p]["momentum_buffer"] for p in net.parameters()]
    with torch.no_grad():
        for q, b in zip(probe.parameters(), bufs):
            q.sub_(rho * b / (norm(bufs) + 1e-12))          # w~
        probe(data(1)[0])                                   # train mode: a forward updates the statistics
    opt.step(closure_for(net, 1))
    torch.testing.assert_close(net[1].running_mean, probe[1].running_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(net[1].running_var, probe[1].running_var, rtol=1e-12, atol=1e-14)


def test_registered_with_official_defaults():
    cls = MINIMIZERS["msam"]
    assert cls is MSAM and cls.passes == 1 and not cls.schedulable and not cls.reports_gap
    assert not cls.supports_chunks and not cls.ascent_sync and cls.recalibrate_bn_at_end
    assert "arXiv 2401.12033" in cls.Hparams.__doc__ and "MarlonBecker/MSAM" in cls.citation
    net = mlp()
    opt = create_minimizer("msam", torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net)
    assert opt.hparams() == {"clip_norm": 0.0, "rho": 3.0}
