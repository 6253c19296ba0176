"""fp16 loss scaling done right for two passes, gradient accumulation, and the cost every step records."""
import copy

import pytest
import torch
from torch import nn

from bench.train.batch import Batch, Cost
from bench.minimizers import SAM, LossScaler, Minimizer, create_minimizer, Switches
from bench.recipes import make_config
from bench.train.runner import execute


def mlp(seed=0, dtype=torch.float32, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.Tanh(), nn.Linear(16, 4)]
    return nn.Sequential(*layers).to(dtype)


def data(n=16, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g).to(dtype), torch.randint(0, 4, (n,), generator=g)


def batch_of(model, x, y, cost=None, loss_fn=nn.functional.cross_entropy, **kw):
    return Batch(model, model, x, y, loss_fn, cost=cost or Cost(), **kw)


def blow_up(at: set, counter: list):
    """A loss that overflows in the listed calls (counted over every forward): a planted fp16 overflow."""
    def loss_fn(out, y):
        counter[0] += 1
        loss = nn.functional.cross_entropy(out, y)
        return loss * 1e38 if counter[0] in at else loss
    return loss_fn


# -- the scaler against torch's GradScaler -----------------------------------------------------------------

def test_one_pass_scaling_matches_torch_gradscaler_with_planted_overflows():
    """SGD through our scaler and through torch.amp.GradScaler: the same scale after every step, the same
    skipped steps, bit-identical weights. Growth every 3 good steps, overflows planted at steps 2 and 6."""
    x, y = data()
    ours, ref = mlp(), mlp()
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    gs = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    scaler = LossScaler(init_scale=2.0 ** 10, interval=3)
    mz = Minimizer(torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9), ours, switches=Switches(scaler=scaler))
    overflow = {2, 6}
    calls = [0]
    for step in range(1, 10):
        mz.step(batch_of(ours, x, y, loss_fn=blow_up(overflow, calls), scaler=scaler))
        loss = nn.functional.cross_entropy(ref(x), y) * (1e38 if step in overflow else 1.0)
        gs.scale(loss).backward()
        gs.step(opt_ref)
        gs.update()
        opt_ref.zero_grad()
        assert scaler.scale == gs.get_scale(), step
        for a, b in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(a, b), step
    assert scaler.skipped == 2


# -- two passes -------------------------------------------------------------------------------------------

def sam_steps(model, x, y, scaler=None, steps=3, loss_fn=nn.functional.cross_entropy, **kw):
    mz = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.1, switches=Switches(scaler=scaler))
    for _ in range(steps):
        mz.step(batch_of(model, x, y, scaler=scaler, loss_fn=loss_fn, **kw))
    return mz


def test_scaled_sam_is_bit_identical_to_unscaled_sam_without_overflow():
    """Both passes scaled by a power of two and the gradients unscaled before the perturbation's norm: the
    very same numbers as no scaling at all."""
    x, y = data()
    a, b = mlp(), mlp()
    sam_steps(a, x, y)
    sam_steps(b, x, y, scaler=LossScaler(init_scale=2.0 ** 12))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("which", ["first", "second"])
def test_overflow_in_either_pass_skips_the_step(which):
    """An overflow in the first pass skips the step before the perturbation (no second pass, BatchNorm
    untouched by it); one in the second pass skips it after, with the weights restored to w."""
    x, y = data()
    model = mlp(bn=True)
    before = copy.deepcopy(model.state_dict())
    scaler = LossScaler(init_scale=2.0 ** 8)
    calls = [0]
    cost = Cost()
    mz = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.1, switches=Switches(scaler=scaler))
    mz.step(batch_of(model, x, y, cost=cost, scaler=scaler, loss_fn=blow_up({1 if which == "first" else 2}, calls)))
    assert scaler.skipped == 1 and scaler.scale == 2.0 ** 7
    assert all(p.grad is None for p in model.parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert cost.bwd_examples == (16 if which == "first" else 32)  # the skipped step's passes are still spent
    assert model[1].num_batches_tracked.item() == (1 if which == "first" else 2)
    # the next step runs normally
    mz.step(batch_of(model, x, y, scaler=scaler))
    assert scaler.skipped == 1 and not torch.equal(model[0].weight, before["0.weight"])


def test_fp16_autocast_sam_agrees_with_fp32_on_cpu():
    """fp16 autocast (CPU) + loss scaling vs fp32, SAM over 5 steps: the weights agree to 2e-3."""
    x, y = data(n=32)
    a, b = mlp(), mlp()
    sam_steps(a, x, y, steps=5)
    sam_steps(b, x, y, steps=5, scaler=LossScaler(),
              autocast=lambda: torch.autocast("cpu", dtype=torch.float16))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=2e-3)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # fp16 really ran


def test_fp16_refused_on_a_device_without_it(monkeypatch):
    from bench.train.runtime import check_fp16
    from bench.errors import UserError

    def no_fp16(*a, **k):
        raise RuntimeError("autocast fp16 is not supported here")
    monkeypatch.setattr(torch, "autocast", no_fp16)
    with pytest.raises(UserError, match="--precision fp16: this device .* use --precision bf16 or fp32"):
        check_fp16(torch.device("cpu"))


# -- accumulation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sgd", "sam", "asam"])
@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_equals_the_whole_batch(name, k):
    """K micro-batches, one step: the same update as the whole batch at once (batch-norm-free model,
    float64), one perturbation from the accumulated first gradient."""
    x, y = data(n=16, dtype=torch.float64)
    whole, acc = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    for model, micro in ((whole, 1), (acc, k)):
        mz = create_minimizer(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model,
                              **({} if name == "sgd" else {"rho": 0.2}))
        for _ in range(3):
            mz.step(batch_of(model, x, y, micro=micro))
    for p, q in zip(whole.parameters(), acc.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-13)


def test_accumulation_with_one_perturbation_per_micro_batch_is_m_sharpness():
    """--accumulate K --m n/K: every micro-batch perturbs with its own gradient; the same as a hand loop
    over the micro-batches (SAM paper's m-sharpness), and not the same as one perturbation."""
    x, y = data(n=16, dtype=torch.float64)
    ours, ref, one = (mlp(dtype=torch.float64) for _ in range(3))
    mz = SAM(torch.optim.SGD(ours.parameters(), lr=0.1), ours, rho=0.2)
    mz.step_chunks(batch_of(ours, x, y, micro=4).chunks(4))
    sam_steps(one, x, y, steps=1)
    grads = [torch.zeros_like(p) for p in ref.parameters()]
    for xc, yc in zip(x.split(4), y.split(4)):
        g = torch.autograd.grad(nn.functional.cross_entropy(ref(xc), yc), list(ref.parameters()))
        norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        with torch.no_grad():
            e = [0.2 * gi / (norm + 1e-16) for gi in g]
            for p, ei in zip(ref.parameters(), e):
                p.add_(ei)
        g2 = torch.autograd.grad(nn.functional.cross_entropy(ref(xc), yc) * 0.25, list(ref.parameters()))
        with torch.no_grad():
            for p, ei, acc, gi in zip(ref.parameters(), e, grads, g2):
                p.sub_(ei)
                acc.add_(gi)
    with torch.no_grad():
        for p, g in zip(ref.parameters(), grads):
            p.sub_(0.1 * g)
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-13)
    assert not torch.allclose(one[0].weight, ours[0].weight)


def test_micro_batches_run_under_no_sync_but_the_last():
    """Under DDP only the last micro-batch's backward all-reduces; an ascent that stays local never does."""
    entered = []

    class Recorder:
        def __enter__(self):
            entered.append("no_sync")

        def __exit__(self, *a):
            return False
    x, y = data(n=8)
    model = mlp()
    b = batch_of(model, x, y, micro=4, no_sync=Recorder)
    b("descent")
    assert entered == ["no_sync"] * 3
    entered.clear()
    b("ascent")
    assert entered == ["no_sync"] * 4
    entered.clear()
    batch_of(model, x, y, micro=4, no_sync=Recorder, local_ascent=False)("ascent")
    assert entered == ["no_sync"] * 3


# -- the cost in rows -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,passes", [("sgd", 1.0), ("sam", 2.0), ("asam", 2.0)])
def test_rows_record_passes_per_step(tmp_path, name, passes):
    cfg = make_config("digits-noise", minimizer=name, epochs=2, batch_size=64, accumulate=2, results_dir=str(tmp_path),
                      device="cpu", workers=0)
    row = execute(cfg)
    assert row["status"] == "ok" and row["accumulate"] == 2
    assert row["passes_per_step"] == pytest.approx(passes, rel=1e-12)
    assert row["fwd_per_step"] == pytest.approx(row["bwd_per_step"])
    epochs = __import__("pandas").read_csv(tmp_path / "runs" / cfg.run_id / "epochs.csv")
    assert list(epochs.steps) == [row["steps"] // 2, row["steps"]] and epochs.passes.iloc[-1] == pytest.approx(row["passes_total"])
    assert (epochs.wall_s.diff().dropna() > 0).all()


def test_fp16_run_records_skipped_steps(tmp_path):
    cfg = make_config("digits-noise", minimizer="sam", epochs=1, precision="fp16", results_dir=str(tmp_path),
                      device="cpu", workers=0)
    row = execute(cfg)
    assert row["status"] == "ok" and row["skipped_steps"] >= 0 and row["precision"] == "fp16"
