"""The SAM code's recipe as settings: m-sharpness chunks, weight decay in the loss, per-step cosine,
true_gradient for shake models, global batches with linear lr scaling; each against a hand-written
reference."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench.config import RunConfig
from bench.train.batch import Cost
from bench.train.runtime import make_base_optimizer, make_scheduler
from bench.train.step import train_step
from bench.errors import UserError
from bench.minimizers import SAM
from bench.recipes import make_config

RHO, LR, WD = 0.1, 0.5, 0.01


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def data(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def engine_step(cfg, model, x, y):
    base = make_base_optimizer(cfg, model)
    st = SimpleNamespace(cfg=cfg, job=SimpleNamespace(loss_fn=nn.functional.cross_entropy, loss_per_sample=None), model=model,
                         net=model, shakes=None, cost=Cost(),
                         minimizer=SAM(base, model, rho=cfg.rho))
    loss, out = train_step(st, x, y, lambda: torch.autocast("cpu", enabled=False))
    return loss, out


def grads(model, loss):
    return torch.autograd.grad(loss, list(model.parameters()))


def reference_step(model, x, y, m, wd_in_loss=0.0):
    """By hand: every chunk's own perturbation from its own gradient, second gradients averaged (by share)."""
    w0 = [p.detach().clone() for p in model.parameters()]
    total = [torch.zeros_like(p) for p in w0]

    def loss_at(ws, xc, yc):
        out = torch.func.functional_call(model, {n: w for (n, _), w in zip(model.named_parameters(), ws)}, (xc,))
        l2 = 0.5 * wd_in_loss * sum((w ** 2).sum() for w in ws)
        return nn.functional.cross_entropy(out, yc) + l2

    for xc, yc in zip(x.split(m), y.split(m)):
        ws = [w.clone().requires_grad_() for w in w0]
        g = torch.autograd.grad(loss_at(ws, xc, yc), ws)
        norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        pert = [(w + RHO / (norm + 1e-12) * gi).detach().requires_grad_() for w, gi in zip(w0, g)]
        g2 = torch.autograd.grad(loss_at(pert, xc, yc), pert)
        for t, gi in zip(total, g2):
            t += gi * (len(yc) / len(y))
    return [w - LR * t for w, t in zip(w0, total)]


@pytest.mark.parametrize("m", [2, 4, 8])
def test_m_sharpness_equals_a_chunk_by_chunk_loop(m):
    x, y = data()
    expect = reference_step(tiny(), x, y, m)
    model = tiny()
    cfg = RunConfig.of(task="t", model="m", minimizer="sam", rho=RHO, lr=LR, momentum=0.0, weight_decay=0.0,
                    batch_size=8, m=m)
    loss, out = engine_step(cfg, model, x, y)
    for p, e in zip(model.parameters(), expect):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    assert out.shape == (8, 3)
    whole = nn.functional.cross_entropy(tiny()(x), y)
    torch.testing.assert_close(loss, whole.detach(), rtol=1e-5, atol=1e-6)  # first-pass loss over the batch


def test_m_sharpness_differs_from_whole_batch_sam():
    x, y = data()
    a, b = tiny(), tiny()
    base = dict(task="t", model="m", minimizer="sam", rho=RHO, lr=LR, momentum=0.0, weight_decay=0.0, batch_size=8)
    engine_step(RunConfig.of(**base, m=2), a, x, y)
    engine_step(RunConfig.of(**base), b, x, y)
    assert not torch.allclose(a[0].weight, b[0].weight)


def test_weight_decay_in_the_loss_enters_the_ascent():
    x, y = data()
    expect = reference_step(tiny(), x, y, m=8, wd_in_loss=WD)
    model = tiny()
    cfg = RunConfig.of(task="t", model="m", minimizer="sam", rho=RHO, lr=LR, momentum=0.0, weight_decay=WD,
                    weight_decay_style="loss", batch_size=8)
    engine_step(cfg, model, x, y)
    for p, e in zip(model.parameters(), expect):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    assert make_base_optimizer(cfg, tiny()).param_groups[0]["weight_decay"] == 0.0  # not twice


def test_cosine_step_schedule():
    cfg = RunConfig.of(task="t", model="m", minimizer="sgd", lr=0.2, epochs=3, schedule="cosine-step")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched, unit = make_scheduler(cfg, opt, steps_per_epoch=4)
    assert unit == "step"
    for t in range(13):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * min(t, 12) / 12)))
        opt.step()
        sched.step()


class Shake(nn.Module):
    """Records the true_gradient flag it sees at each forward (as Shake-Shake/ShakeDrop read it)."""

    def __init__(self):
        super().__init__()
        self.true_gradient, self.seen = False, []

    def forward(self, x):
        self.seen.append(self.true_gradient)
        return x


@pytest.mark.parametrize("minimizer, flag, seen", [("sam", True, [True, False]), ("sam", False, [False, False]),
                                                    ("sgd", True, [False])])
def test_true_gradient_in_the_first_sam_pass_only(minimizer, flag, seen):
    x, y = data()
    shake = Shake()
    model = nn.Sequential(nn.Linear(5, 3), shake)
    cfg = RunConfig.of(task="t", model="m", minimizer=minimizer, rho=RHO, true_gradient=flag, batch_size=8)
    base = make_base_optimizer(cfg, model)
    from bench.minimizers import create_minimizer
    st = SimpleNamespace(cfg=cfg, job=SimpleNamespace(loss_fn=nn.functional.cross_entropy, loss_per_sample=None), model=model,
                         net=model, shakes=None, cost=Cost(),
                         minimizer=create_minimizer(minimizer, base, model, **cfg.mopts))
    import contextlib
    train_step(st, x, y, contextlib.nullcontext)
    assert shake.seen == seen


def test_global_batch_scales_lr_and_is_checked():
    cfg = make_config("cifar10", minimizer="sgd", batch_size=256)
    assert (cfg.lr, cfg.lr_recipe, cfg.per_replica_batch) == (0.2, 0.1, 256)
    assert make_config("cifar10", minimizer="sgd", batch_size=256, lr=0.05).lr == 0.05  # an lr given wins
    assert make_config("cifar10", minimizer="sgd").lr == 0.1
    assert make_config("cifar10", minimizer="sgd", batch_size=256, world_size=4).per_replica_batch == 64
    with pytest.raises(UserError, match="--batch-size 128 is the global batch and must divide by the 3 replicas"):
        make_config("cifar10", minimizer="sgd", world_size=3)
    with pytest.raises(UserError, match="--m 48 must divide the per-replica batch 128"):
        make_config("cifar10", minimizer="sam", m=48)


def test_new_settings_leave_old_run_ids_alone_and_fixed_m_frees_world_size():
    cfg = RunConfig.of(task="cifar10", model="resnet20", minimizer="sam", rho=0.05)
    assert not {"augment", "m", "true_gradient", "weight_decay_style", "lr_recipe"} & set(cfg.identity())
    # ids of results written before these settings existed are unchanged (recorded with the old code) ...
    assert make_config("cifar10", model="vgg19_bn", minimizer="sam").run_id == "cifar10-vgg19_bn-sam-s0-8de4e7ef17"
    assert make_config("digits-noise", minimizer="asam", noise=0.4).run_id == "digits-noise-mlp-asam-s0-f9c5b83f4a"
    # ... except where the network under a name changed: then the model's revision joins the id
    assert make_config("cifar10", minimizer="sam").run_id != "cifar10-resnet20-sam-s0-e192eacbd7"  # option A's id
    assert make_config("cifar10", minimizer="sam").model_rev == "homura-2021.3.1"
    assert make_config("cifar10", model="resnet20_a", minimizer="sam").model_rev == ""
    a = RunConfig.of(task="cifar10", model="resnet20", minimizer="sam", m=32, batch_size=256, world_size=1)
    b = RunConfig.of(task="cifar10", model="resnet20", minimizer="sam", m=32, batch_size=256, world_size=8)
    assert a.run_id == b.run_id
    assert RunConfig.of(task="cifar10", model="resnet20", minimizer="sam", augment="cutout").run_id != cfg.run_id
