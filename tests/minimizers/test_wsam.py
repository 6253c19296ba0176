"""WSAM against a hand-written float64 reference (the paper's update in the official code's order of operations,
decoupled and coupled, with and without clipping), against pytorch-optimizer's WSAM step for step, its pass
counts through the engine's Batch, fp16 overflow, option ranges, checkpoints, frozen parameters, and its data-
parallel semantics (local perturbation, averaged g) with two gloo ranks."""
import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import LoggedBatch, X, Y, closure_for, mlp, train_with_frozen_and_unused, weights
from torch import nn
from torch.nn import functional as F

from bench.minimizers import MINIMIZERS, SAM, LossScaler, Switches, create_minimizer
from bench.minimizers import wsam as wsam_module
from bench.minimizers.wsam import WSAM
from bench.train.batch import Batch, Cost

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- a tiny float64 model and the reference maths



def ref_grad(ws, x=X, y=Y, act=torch.tanh):
    """The gradient of the MLP written out by hand at weights ws = [W1, b1, W2, b2]."""
    ws = [w.detach().clone().requires_grad_(True) for w in ws]
    w1, b1, w2, b2 = ws
    loss = F.cross_entropy(act(x @ w1.T + b1) @ w2.T + b2, y)
    return [g.detach() for g in torch.autograd.grad(loss, ws)]


def norm(v):
    return math.sqrt(sum(float((t * t).sum()) for t in v))


def clipped(v, max_norm):
    """torch's clip_grad_norm_ (which the official code calls): scale by min(1, max_norm / (norm + 1e-6))."""
    if not max_norm:
        return v
    c = min(1.0, max_norm / (norm(v) + 1e-6))
    return [t * c for t in v]


def sgd(ws, grads, bufs, lrs, mu, wd):
    """torch.optim.SGD (dampening 0, not nesterov) by hand; returns (weights, momentum buffers)."""
    out, new = [], []
    for w, g, b, lr in zip(ws, grads, bufs, lrs):
        d = g + wd * w
        b = d.clone() if b is None else mu * b + d
        out.append(w - lr * b)
        new.append(b)
    return out, new


def wsam_ref(ws, bufs, lrs, *, rho, gamma, decouple, mu, wd, clip=0.0):
    """One WSAM step from the paper's equation in the official code's order: e from g, g all-reduced (one
    device: nothing) then clipped, g_s clipped, then base step on g and the lr-scaled sharpness term
    (decoupled), or base step on alpha g_s + (1 - alpha) g (coupled)."""
    alpha = gamma / (1 - gamma)
    g = ref_grad(ws)
    ng = norm(g)
    gs = ref_grad([w + rho * gi / (ng + 1e-12) for w, gi in zip(ws, g)])
    g, gs = clipped(g, clip), clipped(gs, clip)
    if decouple:
        ws, bufs = sgd(ws, g, bufs, lrs, mu, wd)
        return [w - lr * alpha * (si - gi) for w, si, gi, lr in zip(ws, gs, g, lrs)], bufs
    return sgd(ws, [alpha * si + (1 - alpha) * gi for si, gi in zip(gs, g)], bufs, lrs, mu, wd)


def assert_same(net, ws, rtol=1e-10, atol=1e-12):
    for p, w in zip(net.parameters(), ws):
        torch.testing.assert_close(p.detach(), w, rtol=rtol, atol=atol)


def two_groups(net, lrs=(0.1, 0.05), mu=0.9, wd=5e-4):
    """SGD with momentum and weight decay, the two layers in parameter groups of their own lr."""
    return torch.optim.SGD([{"params": net[0].parameters(), "lr": lrs[0]},
                            {"params": net[2].parameters(), "lr": lrs[1]}], lr=lrs[0], momentum=mu, weight_decay=wd)


# ---------------------------------------------------------------- the update against the reference

@pytest.mark.parametrize("decouple", [True, False])
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_matches_reference(decouple, clip):
    rho, gamma, mu, wd = 0.3, 0.8, 0.9, 5e-4
    net = mlp()
    ws, bufs = weights(net), [None] * 4
    opt = WSAM(two_groups(net, mu=mu, wd=wd), net, Switches(clip_norm=clip), rho=rho, gamma=gamma, decouple=decouple)
    factors = [1.0, 0.5, 0.3, 0.2, 0.1]
    sched = torch.optim.lr_scheduler.LambdaLR(opt.base_optimizer, lambda t: factors[t])
    if clip:  # the clipping is active on both gradients: the test would not see it otherwise
        g = ref_grad(ws)
        assert norm(g) > clip and norm(ref_grad([w + rho * gi / norm(g) for w, gi in zip(ws, g)])) > clip
    for t in range(4):
        lrs = [0.1 * factors[t]] * 2 + [0.05 * factors[t]] * 2
        ws, bufs = wsam_ref(ws, bufs, lrs, rho=rho, gamma=gamma, decouple=decouple, mu=mu, wd=wd, clip=clip)
        opt.step(closure_for(net))
        sched.step()
        assert_same(net, ws)
        assert all(p.grad is None for p in net.parameters()) and not opt._clean


def test_decoupled_and_coupled_differ_only_through_the_base_optimizer():
    """Plain SGD (no momentum, no weight decay) is linear in its gradient: both modes give w - lr (g + alpha (g_s - g))."""
    a, b = mlp(), mlp()
    da = WSAM(torch.optim.SGD(a.parameters(), lr=0.1), a, rho=0.3, gamma=0.7, decouple=True)
    db = WSAM(torch.optim.SGD(b.parameters(), lr=0.1), b, rho=0.3, gamma=0.7, decouple=False)
    for _ in range(3):
        da.step(closure_for(a))
        db.step(closure_for(b))
    assert_same(a, weights(b))
    c = mlp()  # with momentum they differ: the sharpness term never enters the momentum when decoupled
    dc = WSAM(torch.optim.SGD(c.parameters(), lr=0.1, momentum=0.9), c, rho=0.3, gamma=0.7, decouple=True)
    d = mlp()
    dd = WSAM(torch.optim.SGD(d.parameters(), lr=0.1, momentum=0.9), d, rho=0.3, gamma=0.7, decouple=False)
    for _ in range(3):
        dc.step(closure_for(c))
        dd.step(closure_for(d))
    assert any(not torch.allclose(p, q, rtol=1e-6, atol=1e-8) for p, q in zip(c.parameters(), d.parameters()))


# ---------------------------------------------------------------- the special values of gamma

def test_gamma_half_coupled_is_sam():
    ref, ours = mlp(), mlp()
    sam = SAM(torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), ref, rho=0.3)
    wsam = WSAM(torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), ours, rho=0.3,
                gamma=0.5, decouple=False)
    assert wsam.alpha == 1.0
    for _ in range(3):
        sam.step(closure_for(ref))
        wsam.step(closure_for(ours))
    assert_same(ours, weights(ref))  # up to the eps (SAM's 1e-16, WSAM's 1e-12)


def test_gamma_half_decoupled_is_sam_for_plain_sgd():
    ref, ours = mlp(), mlp()
    sam = SAM(torch.optim.SGD(ref.parameters(), lr=0.1), ref, rho=0.3)
    wsam = WSAM(torch.optim.SGD(ours.parameters(), lr=0.1), ours, rho=0.3, gamma=0.5)
    for _ in range(3):
        sam.step(closure_for(ref))
        wsam.step(closure_for(ours))
    assert_same(ours, weights(ref))


@pytest.mark.parametrize("decouple", [True, False])
def test_gamma_zero_is_the_base_optimizer(decouple):
    ref, ours = mlp(), mlp()
    base = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    wsam = WSAM(torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), ours, rho=0.3,
                gamma=0.0, decouple=decouple)
    for _ in range(3):
        closure_for(ref)()
        base.step()
        base.zero_grad()
        wsam.step(closure_for(ours))
    assert_same(ours, weights(ref))


# ---------------------------------------------------------------- pytorch-optimizer's WSAM, step for step

def _pair(decouple, max_norm=None):
    popt = pytest.importorskip("pytorch_optimizer")
    a, b = mlp(), mlp()
    ours = WSAM(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), a,
                Switches(clip_norm=max_norm or 0.0), rho=0.3, gamma=0.8, decouple=decouple)
    theirs = popt.WSAM(b, b.parameters(), torch.optim.SGD, rho=0.3, gamma=0.8, decouple=decouple, max_norm=max_norm,
                       lr=0.1, momentum=0.9, weight_decay=5e-4)
    return a, ours, b, theirs


def _run_pair(a, ours, b, theirs, steps=4):
    for _ in range(steps):
        ours.step(closure_for(a))
        theirs.step(closure_for(b))  # both passes through the closure; the second's gradient is left
        theirs.zero_grad()


@pytest.mark.parametrize("decouple", [True, False])
def test_matches_pytorch_optimizer(decouple):
    """pytorch-optimizer accumulates ||g|| in float32 (its get_global_gradient_norm): ~1e-9 apart in float64."""
    a, ours, b, theirs = _pair(decouple)
    _run_pair(a, ours, b, theirs)
    assert_same(a, weights(b), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("decouple", [True, False])
def test_matches_pytorch_optimizer_with_a_float64_norm(decouple, monkeypatch):
    """With its norm computed in float64, to rounding (its coupled mode mixes with lerp_, ours as the official)."""
    sam_module = pytest.importorskip("pytorch_optimizer.optimizer.sam")
    if not hasattr(sam_module, "get_global_gradient_norm"):
        pytest.skip("pytorch-optimizer's layout changed")

    def squared_norm(param_groups, device=None, *, weight_adaptive=False):
        grads = [p.grad for group in param_groups for p in group["params"] if p.grad is not None]
        return torch.stack([(g * g).sum() for g in grads]).sum().reshape(1)

    monkeypatch.setattr(sam_module, "get_global_gradient_norm", squared_norm)
    a, ours, b, theirs = _pair(decouple)
    _run_pair(a, ours, b, theirs)
    assert_same(a, weights(b), rtol=1e-12, atol=1e-14)


def test_pytorch_optimizer_clips_only_the_second_gradient():
    """By design: the official code (and ours) clips g and g_s each; pytorch-optimizer clips only g_s. With a
    max_norm below ||g_s|| only they agree; below ||g|| too they do not."""
    a, ours, b, theirs = _pair(True, max_norm=None)
    g = ref_grad(weights(a))
    gs = ref_grad([w + 0.3 * gi / norm(g) for w, gi in zip(weights(a), g)])
    assert norm(gs) > norm(g)
    between = (norm(g) + norm(gs)) / 2
    a, ours, b, theirs = _pair(True, max_norm=between)
    _run_pair(a, ours, b, theirs, steps=1)
    assert_same(a, weights(b), rtol=1e-6, atol=1e-8)
    a, ours, b, theirs = _pair(True, max_norm=norm(g) / 2)
    _run_pair(a, ours, b, theirs, steps=1)
    assert any(not torch.allclose(p, q, rtol=1e-4, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------- the engine: passes, fp16, options, checkpoints

def small():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return net, torch.randn(8, 4), torch.randint(0, 3, (8,))


def test_registered_and_flags():
    assert MINIMIZERS["wsam"] is WSAM
    assert WSAM.passes == 2 and not WSAM.ascent_sync and not WSAM.supports_chunks and WSAM.schedulable
    assert "arXiv 2305.15817" in WSAM.citation and "arXiv 2305.15817" in WSAM.Hparams.__doc__


def test_pass_counts_through_the_engine_batch():
    net, x, y = small()
    opt = create_minimizer("wsam", torch.optim.SGD(net.parameters(), lr=0.1), net)
    cost, seen = Cost(), []
    for _ in range(3):
        out = opt.step(LoggedBatch(net, net, x, y, F.cross_entropy, cost=cost, kinds=seen))
        assert out.loss.ndim == 0 and out.out.shape == (8, 3)
    assert (cost.fwd_examples, cost.bwd_examples) == (6 * 8, 6 * 8)
    assert (cost.fwd, cost.bwd) == (6, 6) and cost.passes() == 6
    assert seen == ["ascent", "descent"] * 3
    assert opt.passes == 2


@pytest.mark.parametrize("bad_pass", [1, 2])
def test_fp16_overflow_skips_the_step(bad_pass):
    net, x, y = small()
    calls = []

    def loss_fn(out, target):  # the `bad_pass`-th pass overflows
        calls.append(1)
        loss = F.cross_entropy(out, target)
        return loss * float("inf") if len(calls) == bad_pass else loss

    scaler, cost, seen = LossScaler(), Cost(), []
    opt = create_minimizer("wsam", torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net,
                           Switches(scaler=scaler))
    before = weights(net)
    opt.step(LoggedBatch(net, net, x, y, loss_fn, cost=cost, scaler=scaler, kinds=seen))
    assert scaler.skipped == 1 and all(torch.equal(p, w) for p, w in zip(net.parameters(), before))
    assert all(p.grad is None for p in net.parameters()) and not opt._clean and not opt._perturbed
    assert opt.base_optimizer.state == {}  # no momentum was started
    opt.step(LoggedBatch(net, net, x, y, loss_fn, cost=cost, scaler=scaler, kinds=seen))
    assert scaler.skipped == 1 and scaler.good_steps == 1
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert not all(torch.equal(p, w) for p, w in zip(net.parameters(), before))
    assert seen == (["ascent"] if bad_pass == 1 else ["ascent", "descent"]) + ["ascent", "descent"]


@pytest.mark.parametrize("bad", [{"gamma": 1.0}, {"gamma": 1.5}, {"gamma": -0.1}, {"gamma": float("nan")},
                                 {"rho": -0.1}, {"rho": float("inf")}, {"decouple": 1}, {"decouple": "no"},
                                 {"alpha": 1.0}])
def test_option_ranges_refused(bad):
    net = mlp()
    with pytest.raises(ValueError):
        create_minimizer("wsam", torch.optim.SGD(net.parameters(), lr=0.1), net, **bad)


def test_defaults_and_hparams():
    net = mlp()
    opt = create_minimizer("wsam", torch.optim.SGD(net.parameters(), lr=0.1), net)
    assert opt.hparams() == {"clip_norm": 0.0, "rho": 0.05, "gamma": 0.9, "decouple": True,
                             "bn_second_pass": "update", "second_pass_rng": "fresh"}
    assert opt.alpha == pytest.approx(9.0) and opt.eps == 1e-12
    opt = create_minimizer("wsam", torch.optim.SGD(net.parameters(), lr=0.1), net, gamma=0, decouple=False, rho=1)
    assert (opt.gamma, opt.decouple, opt.rho, opt.alpha) == (0.0, False, 1.0, 0.0)


def make(net, lr=0.1, **opts):
    return create_minimizer("wsam", torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4), net,
                            **opts)


def test_state_dict_round_trip():
    opts, other = {"rho": 0.3, "gamma": 0.8, "decouple": True}, {"rho": 1.0, "gamma": 0.2, "decouple": False}
    net = mlp()
    opt = make(net, **opts)
    for _ in range(2):
        opt.step(closure_for(net))
    state = copy.deepcopy(opt.state_dict())            # as if saved: nothing shared with `opt`
    assert state["extra"] == {}                         # nothing is carried across steps but the base's momentum
    net2 = copy.deepcopy(net)
    opt2 = make(net2, lr=0.5, **other)
    opt2.load_state_dict(state)
    assert {k: getattr(opt2, k) for k in opts} == opts and opt2.alpha == pytest.approx(4.0)
    for _ in range(2):
        opt.step(closure_for(net))
        opt2.step(closure_for(net2))
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)


def test_frozen_and_unused_parameters_untouched():
    train_with_frozen_and_unused("wsam", 3)


# ---------------------------------------------------------------- data parallel: two gloo ranks

def _ddp_net():
    torch.manual_seed(0)  # identical initialisation on every rank
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()


def _rank_batch(rank):
    g = torch.Generator().manual_seed(200 + rank)  # each replica its own data
    return torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)


def _ddp_worker(rank, world, rdv, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x, y = _rank_batch(rank)
    out, reduces = {}, []
    real = wsam_module.D.all_reduce_sum
    wsam_module.D.all_reduce_sum = lambda t: reduces.append(t.numel()) or real(t)  # the minimizer's own
    for sync in (False, True):
        model = _ddp_net()
        net = nn.parallel.DistributedDataParallel(model)
        opt = WSAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.5, gamma=0.8)
        for _ in range(2):
            opt.step(Batch(net, model, x, y, F.cross_entropy, cost=Cost(), no_sync=net.no_sync,
                           local_ascent=not sync))  # the engine's: the ascent stays local unless synced
        out[sync] = [p.detach().clone() for p in model.parameters()]
        out[f"reduces{sync}"], reduces = reduces, []
    wsam_module.D.all_reduce_sum = real
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _ddp_reference(sync, steps=2, rho=0.5, gamma=0.8, lr=0.1, mu=0.9):
    """Decoupled WSAM over two replicas by hand: e from each replica's own g (or, synced, the mean g), the
    update from the mean g and the mean g_s (each replica's g_s at its own w + e)."""
    ws, bufs, alpha = weights(_ddp_net()), [None] * 4, gamma / (1 - gamma)
    batches = [_rank_batch(r) for r in range(2)]
    for _ in range(steps):
        grads = [ref_grad(ws, x, y, act=torch.relu) for x, y in batches]
        mean = [(a + b) / 2 for a, b in zip(*grads)]
        pert = [mean, mean] if sync else grads
        gss = [ref_grad([w + rho * gi / (norm(g) + 1e-12) for w, gi in zip(ws, g)], x, y, act=torch.relu)
               for g, (x, y) in zip(pert, batches)]
        gs = [(a + b) / 2 for a, b in zip(*gss)]
        ws, bufs = sgd(ws, mean, bufs, [lr] * 4, mu, 0.0)
        ws = [w - lr * alpha * (si - gi) for w, si, gi in zip(ws, gs, mean)]
    return ws


def test_ddp_local_perturbation_and_averaged_gradients(tmp_path):
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "rdv"), str(tmp_path)), nprocs=2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for sync in (False, True):
        assert all(torch.equal(p, q) for p, q in zip(r0[sync], r1[sync]))  # replicas stay identical
        for p, w in zip(r0[sync], _ddp_reference(sync)):
            torch.testing.assert_close(p, w, rtol=1e-10, atol=1e-12)
    assert not all(torch.allclose(p, q, rtol=1e-6) for p, q in zip(r0[False], r0[True]))  # m matters
    n = sum(p.numel() for p in _ddp_net().parameters())
    assert r0["reducesFalse"] == [n, n] and r0["reducesTrue"] == []  # g: one all-reduce a step, none if synced
