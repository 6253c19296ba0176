"""ESAM, SAM-ON and the adaptive-on-everything SAM against hand-written references, their option ranges, the
ESAM cost accounting, and the per-example losses the image tasks give ESAM."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import UserError
from bench.minimizers import ASAM, Switches, create_minimizer
from bench.minimizers.esam import ESAM, selection_size, sharpest, swp_mask
from bench.minimizers.sam_adaptive_all import SAMAdaptiveAll
from bench.minimizers.samon import SAMON, norm_parameters
from bench.train.batch import Batch, Cost

LR, MOMENTUM, WD = 0.1, 0.9, 5e-4
TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one thread (see conftest)."""


# -- the hand references' building blocks: plain tensors, one per parameter ---------------------------------

def data(n=8, d=5, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=g))


def mlp():
    """Linear -> tanh -> Linear, with biases, in float64; its parameters are [W1, b1, W2, b2]."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def mlp_forward(w, x):
    return F.linear(torch.tanh(F.linear(x, w[0], w[1])), w[2], w[3])


def norm_net():
    """Linear -> BatchNorm1d -> ReLU -> Linear -> LayerNorm -> tanh -> Linear (float64), the norm layers' affine
    parameters moved off their 1/0 initialisation. Parameters: W0 b0 [bn_w bn_b] W1 b1 [ln_w ln_b] W2 b2."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 6), nn.LayerNorm(6),
                        nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for m in (net[1], net[4]):
            m.weight.copy_(1 + 0.3 * torch.randn(6, dtype=torch.float64))
            m.bias.copy_(0.2 * torch.randn(6, dtype=torch.float64))
    return net


def norm_forward(w, x):
    h = F.relu(F.batch_norm(F.linear(x, w[0], w[1]), None, None, w[2], w[3], training=True, eps=1e-5))
    h = torch.tanh(F.layer_norm(F.linear(h, w[4], w[5]), (6,), w[6], w[7], eps=1e-5))
    return F.linear(h, w[8], w[9])


NORM_IDX, NORM_WEIGHT_IDX = (2, 3, 6, 7), (2, 6)


def grads_at(forward, w, x, y, reduction="mean"):
    """(loss, gradient of each parameter) at the parameter values w."""
    wg = [t.detach().clone().requires_grad_() for t in w]
    loss = F.cross_entropy(forward(wg, x), y)
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, wg)]


def sgd(w, g, bufs):
    """torch.optim.SGD(lr, momentum, weight_decay), one step, written out."""
    out = []
    for i, (wi, gi) in enumerate(zip(w, g)):
        d = gi + WD * wi
        bufs[i] = d.clone() if bufs[i] is None else MOMENTUM * bufs[i] + d
        out.append(wi - LR * bufs[i])
    return out


def params_of(net):
    return [p.detach().clone() for p in net.parameters()]


def base(net):
    return torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)


def closure_for(net, x, y):
    def closure():
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss.detach()
    return closure


# -- ESAM -----------------------------------------------------------------------------------------------------

def esam_reference(w, x, y, rho, beta, gamma, steps, seed):
    """Du et al.'s step from the equations: per-tensor Bernoulli(beta) mask from torch's seeded global RNG,
    e = rho / (beta (||m g|| + 1e-7)) m g, the int(n gamma) examples whose loss rose most at w + e, the
    second gradient on them (mean loss), SGD. Returns (weights, masks drawn, selections made)."""
    torch.manual_seed(seed)
    bufs, masks, picks = [None] * len(w), [], []
    n = y.shape[0]
    for _ in range(steps):
        wg = [t.clone().requires_grad_() for t in w]
        before = F.cross_entropy(mlp_forward(wg, x), y, reduction="none")
        g = torch.autograd.grad(before.mean(), wg)
        keep = [bool(u < beta) for u in torch.rand(len(w))]
        masks.append(keep)
        norm = math.sqrt(sum(float((gi ** 2).sum()) for gi, k in zip(g, keep) if k))
        we = [wi + (rho / (norm + 1e-7) / beta) * gi if k else wi for wi, gi, k in zip(w, g, keep)]
        with torch.no_grad():
            after = F.cross_entropy(mlp_forward(we, x), y, reduction="none")
        rise = (after - before.detach()).tolist()
        k = int(n * gamma)
        sel = sorted(sorted(range(n), key=lambda i: -rise[i])[:k])
        picks.append(sel)
        _, g2 = grads_at(mlp_forward, we, x[sel], y[sel])
        w = sgd(w, g2, bufs)
    return w, masks, picks


def test_esam_matches_hand_reference_and_counts_its_examples():
    rho, beta, gamma, steps, seed = 0.5, 0.6, 0.5, 2, 3
    net = mlp()
    x, y = data()
    want, masks, picks = esam_reference(params_of(net), x, y, rho, beta, gamma, steps, seed)
    # the case exercises both strategies: a tensor dropped and one kept, a selection that is not the first half
    assert any(not all(m) and any(m) for m in masks) and all(p != [0, 1, 2, 3] for p in picks)
    opt = create_minimizer("esam", base(net), net, rho=rho, beta=beta, gamma=gamma)
    assert type(opt) is ESAM and opt.passes == pytest.approx(1 + 1 / 3 + gamma)
    cost = Cost()
    torch.manual_seed(seed)
    for step in range(1, steps + 1):
        first = opt.step(Batch(net, net, x, y, F.cross_entropy, cost=cost))
        assert (cost.fwd_examples, cost.bwd_examples) == (step * (8 + 8 + 4), step * (8 + 4))
        assert (cost.fwd, cost.bwd) == (step * 2.5, step * 1.5)
        assert first.per_sample.shape == (8,)
    assert cost.passes() == pytest.approx(steps * opt.passes)
    for p, q in zip(want, net.parameters()):
        torch.testing.assert_close(q.detach(), p, **TOL)


def test_esam_under_the_loss_scaler_is_the_same_step():
    """fp16's path (loss scaled, gradients unscaled after each pass, overflow checked): powers of two are exact."""
    from bench.minimizers import LossScaler
    x, y = data()
    nets = [mlp(), mlp()]
    for net, scaler in zip(nets, (None, LossScaler(init_scale=2.0 ** 12))):
        opt = create_minimizer("esam", base(net), net, rho=0.5, switches=Switches(scaler=scaler))
        torch.manual_seed(3)
        for _ in range(2):
            opt.step(Batch(net, net, x, y, F.cross_entropy, cost=Cost(), scaler=scaler))
    assert scaler.skipped == 0 and scaler.good_steps == 2
    for p, q in zip(*(params_of(n) for n in nets)):
        torch.testing.assert_close(q, p, **TOL)


def test_esam_full_selection_skips_the_probe_and_beta_one_draws_nothing():
    net = mlp()
    x, y = data()
    opt = ESAM(base(net), net, rho=0.5, beta=1.0, gamma=1.0)
    cost = Cost()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    opt.step(Batch(net, net, x, y, F.cross_entropy, cost=cost))
    assert (cost.fwd_examples, cost.bwd_examples) == (16, 16)  # no probe: nothing to select
    assert torch.equal(torch.get_rng_state(), state)        # beta = 1: every tensor kept, no number drawn
    # and then the step is SAM's with ESAM's 1e-7
    ref = mlp()
    w = params_of(ref)
    _, g = grads_at(mlp_forward, w, x, y)
    norm = math.sqrt(sum(float((gi ** 2).sum()) for gi in g))
    _, g2 = grads_at(mlp_forward, [wi + 0.5 / (norm + 1e-7) * gi for wi, gi in zip(w, g)], x, y)
    for p, q in zip(sgd(w, g2, [None] * 4), net.parameters()):
        torch.testing.assert_close(q.detach(), p, **TOL)


def test_swp_mask_is_per_tensor_bernoulli_from_the_global_rng():
    torch.manual_seed(5)
    a = swp_mask(20000, 0.6)
    torch.manual_seed(5)
    assert swp_mask(20000, 0.6) == a                        # seeded by torch's global RNG
    assert len(a) == 20000 and abs(sum(a) / len(a) - 0.6) < 0.02
    torch.manual_seed(5)
    assert a == (torch.rand(20000) < 0.6).tolist()


def test_sds_selection():
    assert [selection_size(8, g) for g in (0.5, 0.01, 0.99, 1.0)] == [4, 1, 7, 8]
    assert selection_size(128, 0.3) == 38                   # int(38.4): rounded down, as the official code
    before = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    after = torch.tensor([1.5, 0.5, 3.0, 1.1, 2.0])
    assert sharpest(before, after, 2).tolist() == [2, 4]     # batch order, not rank order
    assert sharpest(before, after, 3).tolist() == [0, 2, 4]


def test_esam_probe_in_train_mode_and_bn_freeze():
    x, y = data()
    for mode, tracked in (("update", 3), ("freeze", 1)):    # first pass, probe, second pass
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).double()
        ESAM(base(net), net, switches=Switches(bn_second_pass=mode)).step(Batch(net, net, x, y, F.cross_entropy, cost=Cost()))
        assert net[1].num_batches_tracked.item() == tracked


def test_esam_refuses_what_it_cannot_do():
    net = mlp()
    x, y = data()
    with pytest.raises(ValueError, match="reuse"):
        create_minimizer("esam", base(net), net, switches=Switches(second_pass_rng="reuse"))
    with pytest.raises(TypeError, match="engine's batch"):  # a plain closure has no per-example losses
        ESAM(base(net), net).step(closure_for(net, x, y))
    assert not ESAM.supports_chunks


# -- SAM-ON ---------------------------------------------------------------------------------------------------

def samon_reference(w, x, y, rho, adaptive, eta, normalize_bias, steps):
    """SAM-ON / ASAM-ON from the equations: e only on the norm layers' parameters, norm over them alone."""
    bufs = [None] * len(w)
    for _ in range(steps):
        _, g = grads_at(norm_forward, w, x, y)
        t = {}
        for i in NORM_IDX:
            scaled = adaptive and (normalize_bias or i in NORM_WEIGHT_IDX)
            t[i] = w[i].abs() + eta if scaled else torch.ones_like(w[i])
        norm = math.sqrt(sum(float(((t[i] * g[i]) ** 2).sum()) for i in NORM_IDX))
        we = [wi + rho * t[i] ** 2 * g[i] / (norm + 1e-16) if i in NORM_IDX else wi for i, wi in enumerate(w)]
        _, g2 = grads_at(norm_forward, we, x, y)
        w = sgd(w, g2, bufs)
    return w


@pytest.mark.parametrize("kw", [dict(adaptive=True, eta=0.0, normalize_bias=True, rho=2.0),
                                dict(adaptive=True, eta=0.05, normalize_bias=False, rho=1.0),
                                dict(adaptive=False, rho=0.3)])
def test_samon_matches_hand_reference(kw):
    x, y = data(n=16)
    full = {"eta": 0.0, "normalize_bias": True, **kw}
    net = norm_net()
    want = samon_reference(params_of(net), x, y, full["rho"], full["adaptive"], full["eta"],
                           full["normalize_bias"], steps=2)
    opt = create_minimizer("samon", base(net), net, **kw)
    assert type(opt) is SAMON and opt.supports_chunks
    for _ in range(2):
        opt.step(closure_for(net, x, y))
    for p, q in zip(want, net.parameters()):
        torch.testing.assert_close(q.detach(), p, **TOL)


def test_samon_perturbs_only_norm_layers_found_by_type():
    net = norm_net()
    names = [n for n, _ in net.named_parameters()]
    assert not any("norm" in n or "bn" in n for n in names)  # the official name test would find nothing here
    found, weights = norm_parameters(net)
    assert found == {net[1].weight, net[1].bias, net[4].weight, net[4].bias}
    assert weights == {net[1].weight, net[4].weight}
    x, y = data(n=16)
    opt = SAMON(base(net), net, rho=1.0)
    before = params_of(net)
    F.cross_entropy(net(x), y).backward()
    opt.ascent_step()
    moved = [i for i, (b, p) in enumerate(zip(before, net.parameters())) if not torch.equal(b, p)]
    assert moved == list(NORM_IDX)
    assert all(p.grad is None for p in net.parameters())   # the other first gradients are discarded too


def test_samon_refuses_a_model_without_norm_layers():
    net = mlp()
    with pytest.raises(UserError, match="normalisation"):
        create_minimizer("samon", base(net), net)


# -- sam_adaptive_all -----------------------------------------------------------------------------------------

def adaptive_all_reference(w, x, y, rho, steps):
    """davda54's adaptive=True from the equations: e = rho w^2 g / (|| |w| g || + 1e-12) on every parameter."""
    bufs = [None] * len(w)
    for _ in range(steps):
        _, g = grads_at(mlp_forward, w, x, y)
        norm = math.sqrt(sum(float(((wi.abs() * gi) ** 2).sum()) for wi, gi in zip(w, g)))
        we = [wi + rho * wi ** 2 * gi / (norm + 1e-12) for wi, gi in zip(w, g)]
        _, g2 = grads_at(mlp_forward, we, x, y)
        w = sgd(w, g2, bufs)
    return w


def test_sam_adaptive_all_matches_hand_reference_and_is_not_asam():
    x, y = data()
    net, asam_net = mlp(), mlp()
    want = adaptive_all_reference(params_of(net), x, y, rho=2.0, steps=2)
    opt = create_minimizer("sam_adaptive_all", base(net), net)  # the default rho, 2.0
    assert type(opt) is SAMAdaptiveAll and opt.rho == 2.0
    asam = ASAM(base(asam_net), asam_net, rho=2.0, eta=0.0)   # even with eta = 0: T = 1 on the biases
    for _ in range(2):
        opt.step(closure_for(net, x, y))
        asam.step(closure_for(asam_net, x, y))
    for p, q in zip(want, net.parameters()):
        torch.testing.assert_close(q.detach(), p, **TOL)
    diff = [float((p - q).abs().max()) for p, q in zip(params_of(net), params_of(asam_net))]
    assert min(diff[1], diff[3]) > 1e-6                     # the biases: |b| here, 1 in ASAM


# -- options --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kw", [
    ("esam", {"beta": 0.0}), ("esam", {"beta": 1.01}), ("esam", {"gamma": 0.0}), ("esam", {"gamma": 1.5}),
    ("esam", {"beta": float("nan")}), ("esam", {"rho": -0.1}), ("samon", {"rho": -0.1}), ("samon", {"eta": -1e-3}),
    ("samon", {"adaptive": 1}), ("samon", {"normalize_bias": "yes"}), ("sam_adaptive_all", {"rho": -0.1}),
    ("sam_adaptive_all", {"rho": float("inf")})])
def test_option_ranges_refused(name, kw):
    net = norm_net()
    with pytest.raises(ValueError):
        create_minimizer(name, base(net), net, **kw)


@pytest.mark.parametrize("name", ["esam", "samon", "sam_adaptive_all"])
def test_engine_arguments_reach_the_minimizer(name):
    """The SAM switches, clipping and the fp16 scaler reach every minimizer as one Switches value."""
    from bench.minimizers import LossScaler
    net, scaler = norm_net(), LossScaler()
    switches = Switches(bn_second_pass="freeze", clip_norm=1.5, scaler=scaler)
    opt = create_minimizer(name, base(net), net, switches, rho=0.2)
    assert (opt.bn_second_pass, opt.clip_norm, opt.scaler, opt.rho) == ("freeze", 1.5, scaler, 0.2)


def test_defaults_and_edges_accepted():
    net = norm_net()
    e = create_minimizer("esam", base(net), net, beta=1.0, gamma=1.0)
    assert (e.beta, e.gamma) == (1.0, 1.0)
    assert (ESAM.Hparams().rho, ESAM.Hparams().beta, ESAM.Hparams().gamma) == (0.05, 0.6, 0.5)
    s = SAMON.Hparams()
    assert (s.rho, s.adaptive, s.eta, s.normalize_bias) == (10.0, True, 0.0, True)
    assert SAMAdaptiveAll.Hparams().rho == 2.0


# -- the per-example losses the tasks hand ESAM -----------------------------------------------------------------

@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_image_task_per_example_loss_is_the_training_loss(fake_cifar10, smoothing):
    from bench.recipes import make_config
    from bench.registry import get_task
    cfg = make_config("cifar10", minimizer="esam", data_dir=str(fake_cifar10), workers=0,
                      label_smoothing=smoothing)
    job = get_task("cifar10").build(cfg, torch.device("cpu"))
    if smoothing:
        from timm.loss import LabelSmoothingCrossEntropy
        assert isinstance(job.loss_fn, LabelSmoothingCrossEntropy)
    g = torch.Generator().manual_seed(0)
    out, y = 3 * torch.randn(32, 10, generator=g), torch.randint(0, 10, (32,), generator=g)
    per = job.loss_per_sample(out, y)
    assert per.shape == (32,)
    torch.testing.assert_close(per.mean(), job.loss_fn(out, y), rtol=1e-6, atol=1e-7)
    for i in (0, 7):                                        # and example by example
        torch.testing.assert_close(per[i], job.loss_fn(out[i:i + 1], y[i:i + 1]), rtol=1e-6, atol=1e-7)


def test_digits_per_example_loss_is_the_training_loss():
    from bench.recipes import make_config
    from bench.registry import get_task
    cfg = make_config("digits-noise", minimizer="esam", label_smoothing=0.1)
    job = get_task("digits-noise").build(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    out, y = torch.randn(16, 10, generator=g), torch.randint(0, 10, (16,), generator=g)
    torch.testing.assert_close(job.loss_per_sample(out, y).mean(), job.loss_fn(out, y), rtol=1e-6, atol=1e-7)


def test_imagenet_per_example_loss_is_the_training_loss(tmp_path):
    from bench.recipes import make_config
    from bench.registry import get_task
    from tasks.imagenet import write_fake_imagenet
    write_fake_imagenet(str(tmp_path), 2, 2, 0)
    cfg = make_config("imagenet", minimizer="esam", model="resnet10t", data_dir=str(tmp_path), workers=0,
                      label_smoothing=0.1)
    job = get_task("imagenet").build(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    out, y = 3 * torch.randn(16, 2, generator=g), torch.randint(0, 2, (16,), generator=g)
    torch.testing.assert_close(job.loss_per_sample(out, y).mean(), job.loss_fn(out, y), rtol=1e-6, atol=1e-7)


def test_esam_trains_through_the_engine(tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from bench.cli.main import app
    args = ["run", "digits-noise", "--minimizer", "esam", "--epochs", "1", "--batch-size", "100",
            "--results-dir", str(tmp_path), "--quiet", "--device", "cpu"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    row = pd.read_csv(tmp_path / "digits-noise.csv").iloc[0]
    assert row.status == "ok"
    r = CliRunner().invoke(app, [*args[:3], "samon", *args[4:]])  # an MLP has no normalisation layer
    assert r.exit_code != 0 and "normalisation" in r.output
