"""SAMPa against a float64 transcription of the official training loop (LIONS-EPFL/SAMPa train.py: the two ranks'
passes, the all-reduced mix, SGD with momentum and weight decay), its relations to SGD and to optimistic
gradient descent, its pass counts, option ranges, checkpoint round trip and fp16 skips."""
import copy
import math

import pytest
import torch
from tiny import LoggedBatch, X, Y, closure_for, data, mlp, train_with_frozen_and_unused, weights
from torch import nn
from torch.nn import functional as F

from bench.minimizers import MINIMIZERS, LossScaler, Minimizer, Switches, create_minimizer
from bench.minimizers.sampa import SAMPa
from bench.train.batch import Cost

pytestmark = pytest.mark.usefixtures("one_thread")


BATCHES = [data(seed) for seed in (11, 12, 13, 14, 15)]


def ref_loss(ws, x=X, y=Y):
    w1, b1, w2, b2 = ws
    return F.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)


def ref_grad(ws, x=X, y=Y):
    """The MLP's gradient written out by hand at ws = [W1, b1, W2, b2]."""
    ws = [w.detach().clone().requires_grad_(True) for w in ws]
    return [g.detach() for g in torch.autograd.grad(ref_loss(ws, x, y), ws)]


def norm(v):
    return math.sqrt(sum(float((t * t).sum()) for t in v))


def assert_same(net, ws):
    for p, w in zip(net.parameters(), ws):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)


def official(ws, batches, lr, momentum, wd, rho, og, previous_batch=True):
    """The official loop (train.py), both ranks in one process, per-parameter lists for its flat vectors. Rank 0
    recovers grad f(y_t) from the last all-reduced sum and takes the perturbed gradient on the previous batch
    (`previous_batch=False`: on the current one, as ours); rank 1 steps to y_{t+1} with its own grad f(y_t) and the
    SGD momentum buffer (none at the first step) and takes the gradient there on the current batch. Returns the
    weights after each step and the losses at y_{t+1}."""
    zeros = [torch.zeros_like(w) for w in ws]
    x, y_grads, pert, agg, buf, data1 = ws, zeros, zeros, zeros, None, None
    xs, y_losses = [], []
    for batch in batches:
        data1 = batch if data1 is None else data1
        # rank 0: x~_t = x_t + rho * grad f(y_t) / (||grad f(y_t)|| + 1e-12)
        gy0 = [(a - p) / (og + 1e-15) for a, p in zip(agg, pert)]
        scale = rho / (norm(gy0) + 1e-12)
        pert = [g * (1 - og) for g in ref_grad([w + scale * g for w, g in zip(x, gy0)],
                                               *(data1 if previous_batch else batch))]
        # rank 1: y_{t+1} = x_t - lr * (grad f(y_t) + wd * x_t + momentum * buf); wd and buf only beside a buffer
        d = y_grads if buf is None else [g + wd * w + momentum * b for g, w, b in zip(y_grads, x, buf)]
        y = [w - lr * di for w, di in zip(x, d)]
        y_losses.append(float(ref_loss(y, *batch)))
        y_grads = ref_grad(y, *batch)
        agg = [p + og * g for p, g in zip(pert, y_grads)]
        # optimizer.step(): torch SGD with momentum and weight decay on the mixed gradient
        d = [a + wd * w for a, w in zip(agg, x)]
        buf = d if buf is None else [momentum * b + di for b, di in zip(buf, d)]
        x = [w - lr * b for w, b in zip(x, buf)]
        xs.append(x)
        data1 = batch
    return xs, y_losses


def sgd(net, lr=0.1, momentum=0.9, wd=5e-4):
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=wd)


def run(opt, net, batches):
    out = []
    for x, y in batches:
        out.append(float(opt.step(closure_for(net, x, y))))
        yield weights(net), out[-1]


# ---------------------------------------------------------------- against the official loop

@pytest.mark.parametrize("og", [0.2, 0.7])
def test_matches_official_loop_on_a_fixed_batch(og):
    """One batch at every step: the official previous-batch pairing and ours are the same algorithm."""
    rho, lr = 0.3, 0.1
    net = mlp()
    ref, losses = official(weights(net), [(X, Y)] * 5, lr, 0.9, 5e-4, rho, og)
    opt = SAMPa(sgd(net, lr), net, rho=rho, lam=og)
    for (ws, loss), r, r_loss in zip(run(opt, net, [(X, Y)] * 5), ref, losses):
        assert_same(net, r)
        assert loss == pytest.approx(r_loss, rel=1e-10)  # the training metric: the loss at y_{t+1}


def test_varying_batches_perturbed_pass_on_the_current_batch():
    """Batches change: ours is the official loop with grad f(x~_t) on B_t instead of B_{t-1} (the documented
    difference), and differs from the official pairing from the second step on."""
    rho, og, lr = 0.3, 0.2, 0.1
    net = mlp()
    ours_ref, losses = official(weights(net), BATCHES, lr, 0.9, 5e-4, rho, og, previous_batch=False)
    off_ref, _ = official(weights(net), BATCHES, lr, 0.9, 5e-4, rho, og, previous_batch=True)
    opt = SAMPa(sgd(net, lr), net, rho=rho, lam=og)
    for t, ((ws, loss), r, r_loss, o) in enumerate(zip(run(opt, net, BATCHES), ours_ref, losses, off_ref)):
        assert_same(net, r)
        assert loss == pytest.approx(r_loss, rel=1e-10)
        assert (t == 0) == all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(ws, o))


def test_first_step_is_the_base_step():
    ref, ours = mlp(), mlp()
    Minimizer(sgd(ref), ref).step(closure_for(ref))
    SAMPa(sgd(ours), ours, rho=0.5).step(closure_for(ours))
    assert_same(ours, weights(ref))


def test_lookahead_follows_a_scheduled_lr_and_leaves_the_optimizer_state_alone():
    """y_{t+1} uses the lr of the step; the momentum buffers are those of the updates alone."""
    rho, og, lr0, factors = 0.3, 0.2, 0.1, [1.0, 0.5, 0.25, 0.1, 0.05]
    net = mlp()
    opt = SAMPa(sgd(net, lr0), net, rho=rho, lam=og)
    sched = torch.optim.lr_scheduler.LambdaLR(opt.base_optimizer, lambda t: factors[t])
    x = weights(net)
    gy, buf = None, None
    for t in range(4):
        lr = lr0 * factors[t]
        y = x if gy is None else [w - lr * (g + 5e-4 * w + 0.9 * b) for w, g, b in zip(x, gy, buf)]
        pert = x if gy is None else [w + rho / (norm(gy) + 1e-12) * g for w, g in zip(x, gy)]
        gy = ref_grad(y)
        d = [(1 - og) * gp + og * g + 5e-4 * w for gp, g, w in zip(ref_grad(pert), gy, x)]
        buf = d if buf is None else [0.9 * b + di for b, di in zip(buf, d)]
        x = [w - lr * b for w, b in zip(x, buf)]
        opt.step(closure_for(net))
        sched.step()
        assert_same(net, x)
        for p, b in zip(net.parameters(), buf):
            torch.testing.assert_close(opt.base_optimizer.state[p]["momentum_buffer"], b, rtol=1e-10, atol=1e-12)
        for (name, _), g in zip(net.named_parameters(), gy):
            torch.testing.assert_close(opt.extra_state()["gy"][name], g, rtol=1e-10, atol=1e-12)


def test_adam_lookahead_is_a_trial_step_of_the_base_optimizer():
    """With Adam, y_{t+1} is the step a copy of the optimizer would take with grad f(y_t); the real one only sees
    the updates."""
    rho, og = 0.2, 0.3
    net, ref_net = mlp(), mlp()
    opt = SAMPa(torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=1e-3), net, rho=rho, lam=og)
    ref_opt = torch.optim.Adam(ref_net.parameters(), lr=0.01, weight_decay=1e-3)
    params = list(ref_net.parameters())
    gy = None
    for x, y in BATCHES[:4]:
        xt = weights(ref_net)
        if gy is None:
            ys = xt
        else:
            trial = copy.deepcopy((ref_net, ref_opt))
            for p, g in zip(trial[0].parameters(), gy):
                p.grad = g.clone()
            trial[1].step()
            ys = weights(trial[0])
        pert = xt if gy is None else [w + rho / (norm(gy) + 1e-12) * g for w, g in zip(xt, gy)]
        gy = ref_grad(ys, x, y)
        for p, gp, g in zip(params, ref_grad(pert, x, y), gy):
            p.grad = (1 - og) * gp + og * g
        ref_opt.step()
        ref_opt.zero_grad()
        opt.step(closure_for(net, x, y))
        assert_same(net, weights(ref_net))
    for p, q in zip(net.parameters(), ref_net.parameters()):
        assert int(opt.base_optimizer.state[p]["step"]) == 4
        torch.testing.assert_close(opt.base_optimizer.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"],
                                   rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- relations to known methods

def test_rho_0_lam_0_is_the_base_optimizer():
    ref, ours = mlp(), mlp()
    base, sampa = Minimizer(sgd(ref), ref), SAMPa(sgd(ours), ours, rho=0.0, lam=0.0)
    for x, y in BATCHES:
        base.step(closure_for(ref, x, y))
        sampa.step(closure_for(ours, x, y))
        assert_same(ours, weights(ref))


def test_lam_1_is_optimistic_gradient_descent():
    """lambda = 1 (plain SGD): x_{t+1} = x_t - lr g(y_{t+1}) whatever rho, so y follows optimistic gradient descent
    y_{t+1} = y_t - 2 lr g(y_t) + lr g(y_{t-1}) from y_1 = x_0 (g(y_0) = 0), and x_t = y_{t+1} + lr g(y_t)."""
    lr, steps = 0.1, 5
    net = mlp()
    ys, prev = [weights(net)], [torch.zeros_like(w) for w in weights(net)]
    for _ in range(steps):
        g = ref_grad(ys[-1])
        ys.append([y - 2 * lr * gi + lr * pi for y, gi, pi in zip(ys[-1], g, prev)])
        prev = g
    opt = SAMPa(torch.optim.SGD(net.parameters(), lr=lr), net, rho=0.5, lam=1.0)
    for _ in range(steps):
        opt.step(closure_for(net))
    assert_same(net, [y + lr * g for y, g in zip(ys[steps], ref_grad(ys[steps - 1]))])


# ---------------------------------------------------------------- the engine's contract

def test_registered_and_defaults():
    assert MINIMIZERS["sampa"] is SAMPa
    assert SAMPa.passes == 2 and SAMPa.parallel_passes == 1
    assert SAMPa.ascent_sync and not SAMPa.supports_chunks and not SAMPa.schedulable
    assert "arXiv 2410.10683" in SAMPa.Hparams.__doc__ and "LIONS-EPFL/SAMPa" in SAMPa.citation
    net = mlp()
    opt = create_minimizer("sampa", sgd(net), net)
    assert opt.hparams() == {"clip_norm": 0.0, "rho": 0.1, "lam": 0.2, "bn_second_pass": "update",
                             "second_pass_rng": "fresh"}


@pytest.mark.parametrize("bad", [{"rho": -0.1}, {"lam": -0.1}, {"lam": 1.01}, {"lam": float("nan")},
                                 {"rho": float("inf")}, {"k": 2}])
def test_option_ranges_refused(bad):
    net = mlp()
    with pytest.raises(ValueError):
        create_minimizer("sampa", sgd(net), net, **bad)


def test_lam_bounds_accepted():
    net = mlp()
    assert create_minimizer("sampa", sgd(net), net, lam=0).lam == 0.0
    assert create_minimizer("sampa", sgd(net), net, lam=1).lam == 1.0


def tiny():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return net, torch.randn(8, 4), torch.randint(0, 3, (8,))


def test_two_passes_per_step_through_the_engine_batch():
    net, x, y = tiny()
    opt = create_minimizer("sampa", torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net)
    cost, seen = Cost(), []
    for _ in range(3):
        out = opt.step(LoggedBatch(net, net, x, y, F.cross_entropy, cost=cost, kinds=seen))
        assert out.loss.ndim == 0 and out.out.shape == (8, 3)
    assert (cost.fwd_examples, cost.bwd_examples) == (6 * 8, 6 * 8)
    assert (cost.fwd, cost.bwd) == (6, 6) and cost.passes() == 6 == 3 * opt.passes
    assert seen == ["ascent", "descent"] * 3
    assert getattr(opt, "parallel_passes", opt.passes) / opt.passes == 0.5  # the engine's parallel share


@pytest.mark.parametrize("bad_pass", [3, 4])  # the second step's y pass, then its perturbed pass
def test_fp16_overflow_skips_the_step_and_keeps_gy(bad_pass):
    net, x, y = tiny()
    calls = []

    def loss_fn(out, target):
        calls.append(1)
        loss = F.cross_entropy(out, target)
        return loss * float("inf") if len(calls) == bad_pass else loss

    scaler, cost, seen = LossScaler(), Cost(), []
    opt = create_minimizer("sampa", torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net,
                           Switches(scaler=scaler), rho=0.3)
    opt.step(LoggedBatch(net, net, x, y, loss_fn, cost=cost, scaler=scaler, kinds=seen))
    assert scaler.skipped == 0
    before, gy, base = weights(net), copy.deepcopy(opt.extra_state()), copy.deepcopy(opt.base_optimizer.state_dict())
    opt.step(LoggedBatch(net, net, x, y, loss_fn, cost=cost, scaler=scaler, kinds=seen))
    assert scaler.skipped == 1 and scaler.scale == 2.0 ** 15
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), before))
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(opt.extra_state()["gy"].values(), gy["gy"].values()))
    after = opt.base_optimizer.state_dict()["state"]
    assert all(torch.equal(after[i]["momentum_buffer"], s["momentum_buffer"]) for i, s in base["state"].items())
    opt.step(LoggedBatch(net, net, x, y, loss_fn, cost=cost, scaler=scaler, kinds=seen))
    assert scaler.skipped == 1 and scaler.good_steps == 1  # reset by the overflow
    assert not all(torch.equal(p, w) for p, w in zip(net.parameters(), before))
    assert seen == ["ascent", "descent"] * 3
    assert all(torch.isfinite(v).all() for v in opt.extra_state()["gy"].values())


def test_state_dict_round_trip():
    def make(net, lr=0.1, **opts):
        return create_minimizer("sampa", sgd(net, lr), net, **opts)

    net = mlp()
    opt = make(net, rho=0.3, lam=0.4)
    for x, y in BATCHES[:2]:
        opt.step(closure_for(net, x, y))
    state = copy.deepcopy(opt.state_dict())           # as if saved: nothing shared with `opt`
    assert set(state["extra"]["gy"]) == {n for n, _ in net.named_parameters()}
    net2, net3 = copy.deepcopy(net), copy.deepcopy(net)
    opt2, opt3 = make(net2, lr=0.5, rho=1.0, lam=0.0), make(net3, lr=0.5, rho=1.0, lam=0.0)
    opt2.load_state_dict(state)
    opt3.load_state_dict({**copy.deepcopy(state), "extra": {}})  # without the carried grad f(y_t)
    assert (opt2.rho, opt2.lam) == (0.3, 0.4)
    for x, y in BATCHES[2:4]:
        for n, o in ((net, opt), (net2, opt2), (net3, opt3)):
            o.step(closure_for(n, x, y))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), net2.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), net3.parameters()))


def test_frozen_and_unused_parameters_untouched():
    opt = train_with_frozen_and_unused("sampa", 3)
    net = opt.model
    assert set(opt.extra_state()["gy"]) == {"0.bias", "2.weight", "2.bias"}
    assert set(opt.base_optimizer.state) == {net[0].bias, net[2].weight, net[2].bias}


# ---------------------------------------------------------------- through the engine's training loop

def engine_job():
    from bench.data import TensorLoader
    from bench.task import Job
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    return Job(net, TensorLoader(x[:48], y[:48], batch_size=8, shuffle=True, seed=0),
               TensorLoader(x[48:], y[48:], batch_size=16, shuffle=False), F.cross_entropy, num_train=48)


def test_engine_rows_and_an_exact_resume(tmp_path):
    """The engine's rows: 2 passes per step spent, 1 on the critical path; a run interrupted after its first epoch
    and resumed from the checkpoint (gy in it) ends where the straight run does."""
    from bench.config import RunConfig
    from bench.train.control import Interrupted, StopFlag
    from bench.train.loop import train
    cfg = RunConfig.of(task="tiny", model="mlp", minimizer="sampa", mopts={"rho": 0.2, "lam": 0.3}, epochs=2,
                       batch_size=8, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="constant", device="cpu",
                       workers=0)
    straight = engine_job()
    summary = train(cfg, straight, torch.device("cpu"), checkpoint=tmp_path / "a.pt")
    assert summary["passes_per_step"] == 2 and summary["parallel_passes_per_step"] == 1
    stop = StopFlag()
    stop.set = True
    with pytest.raises(Interrupted):
        train(cfg, engine_job(), torch.device("cpu"), checkpoint=tmp_path / "b.pt", stop=stop)
    resumed = engine_job()
    train(cfg, resumed, torch.device("cpu"), checkpoint=tmp_path / "b.pt")
    assert all(torch.equal(a, b) for a, b in zip(straight.model.parameters(), resumed.model.parameters()))
