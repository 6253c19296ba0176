"""The surrogate gap L(w + e) - L(w) that two-pass minimizers measure on every batch: the epoch mean in
epochs.csv, the last epoch's in the row; SAM against a hand computation, ESAM's full-batch probe (not its
subset pass), LookSAM's SAM steps only, m-sharpness chunks, fp16 steps abandoned before their second pass."""
import math

import pandas as pd
import pytest
import torch
from torch import nn

from bench.train.batch import Batch, Cost
from bench.config import RunConfig
from bench.data import TensorLoader, set_epoch
from bench.train.runtime import make_base_optimizer
from bench.train.loop import train
from bench.minimizers import SAM, LossScaler, Switches
from bench.recipes import make_config
from bench.train.runner import execute
from bench.task import Job

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one torch thread."""


def tiny_cfg(**kw) -> RunConfig:
    values = dict(task="tiny", model="mlp", minimizer="sam", rho=0.2, epochs=1, batch_size=8, lr=0.05,
                  weight_decay=0.0, schedule="cosine", world_size=1, device="cpu", workers=0)
    return RunConfig.of(**{**values, **kw})


def tiny_job(loss_fn=nn.functional.cross_entropy) -> Job:
    """A small BatchNorm- and dropout-free MLP on a fixed 3-class problem (96 training examples, 12 batches of
    8); the same initialisation each call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    train_loader = TensorLoader(x[:96], y[:96], batch_size=8, shuffle=True, seed=0)
    test_loader = TensorLoader(x[96:], y[96:], batch_size=16, shuffle=False)
    return Job(model, train_loader, test_loader, loss_fn, num_train=96)


def recording(log: list):
    """Cross entropy that logs (examples, loss, with grad) of every forward: what each pass computed."""
    def loss_fn(out, y):
        loss = nn.functional.cross_entropy(out, y)
        log.append((y.shape[0], loss.item(), torch.is_grad_enabled()))
        return loss
    return loss_fn


def hand_sam_gaps(cfg: RunConfig) -> list[float]:
    """SAM's first epoch by hand (the README's ascent_step / descent_step API, the losses computed here, not
    by the engine's Batch): L(w + e) - L(w) of every step."""
    job = tiny_job()
    model = job.model
    opt = SAM(make_base_optimizer(cfg, model), model, rho=cfg.rho)
    set_epoch(job.train_loader, 0)
    gaps = []
    for x, y in job.train_loader:
        before = nn.functional.cross_entropy(model(x), y)
        before.backward()
        opt.ascent_step()
        after = nn.functional.cross_entropy(model(x), y)
        after.backward()
        opt.descent_step()
        gaps.append(after.item() - before.item())
    return gaps


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sam_epoch_gap_is_the_mean_of_a_hand_computed_gap(accumulate):
    cfg = tiny_cfg(accumulate=accumulate)
    summary = train(cfg, tiny_job(), CPU)
    gaps = hand_sam_gaps(cfg)
    assert len(gaps) == 12
    epoch = summary["epochs"][0]
    assert epoch["surrogate_gap"] == pytest.approx(sum(gaps) / len(gaps), rel=1e-5, abs=1e-7)
    assert summary["surrogate_gap"] == epoch["surrogate_gap"]
    assert epoch["surrogate_gap"] > 0  # SAM's ascent raises the loss (to first order rho ||g||)


def test_sgd_has_no_gap():
    summary = train(tiny_cfg(minimizer="sgd", rho=0.0, epochs=2), tiny_job(), CPU)
    assert "surrogate_gap" not in summary
    assert all("surrogate_gap" not in h for h in summary["epochs"])


def steps_of(log: list, sizes: list[int]) -> list[list]:
    """The log cut into steps of the given numbers of forwards (cycled)."""
    out, i, s = [], 0, 0
    while i < len(log):
        n = sizes[s % len(sizes)]
        out.append(log[i:i + n])
        i, s = i + n, s + 1
    assert i == len(log)
    return out


def test_esam_gap_uses_its_full_batch_probe_not_the_subset_pass():
    log = []
    summary = train(tiny_cfg(minimizer="esam", mopts={"beta": 1.0, "gamma": 0.5}), tiny_job(recording(log)), CPU)
    steps = steps_of(log, [3])
    assert len(steps) == 12
    assert all([(n, grad) for n, _, grad in s] == [(8, True), (8, False), (4, True)] for s in steps)
    probe = sum(s[1][1] - s[0][1] for s in steps) / 12
    subset = sum(s[2][1] - s[0][1] for s in steps) / 12
    assert summary["epochs"][0]["surrogate_gap"] == pytest.approx(probe, rel=1e-5, abs=1e-7)
    assert abs(probe - subset) > 1e-4  # the test tells the two apart


def test_esam_with_the_whole_batch_uses_its_second_pass():
    """gamma = 1: no probe, the second pass runs the whole batch and is L(w + e)."""
    log = []
    summary = train(tiny_cfg(minimizer="esam", mopts={"beta": 1.0, "gamma": 1.0}), tiny_job(recording(log)), CPU)
    steps = steps_of(log, [2])
    assert all([(n, grad) for n, _, grad in s] == [(8, True), (8, True)] for s in steps)
    expected = sum(s[1][1] - s[0][1] for s in steps) / len(steps)
    assert summary["epochs"][0]["surrogate_gap"] == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_looksam_counts_only_its_sam_steps():
    log = []
    summary = train(tiny_cfg(minimizer="looksam", mopts={"k": 3}), tiny_job(recording(log)), CPU)
    steps = steps_of(log, [2, 1, 1])  # a SAM step every k = 3 steps, a plain pass between
    assert len(steps) == 12
    sam = [s for s in steps if len(s) == 2]
    assert len(sam) == 4
    expected = sum(s[1][1] - s[0][1] for s in sam) / len(sam)
    assert summary["epochs"][0]["surrogate_gap"] == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_m_sharpness_chunks_weigh_their_gaps_by_their_share():
    """--m 3 on batches of 8: chunks of 3, 3 and 2 examples, each perturbed on its own; the step's gap is
    the chunks' gaps weighted by their shares."""
    log = []
    summary = train(tiny_cfg(m=3), tiny_job(recording(log)), CPU)
    steps = steps_of(log, [6])
    assert len(steps) == 12 and [n for n, _, _ in steps[0]] == [3, 3, 3, 3, 2, 2]
    per_step = [sum(s[i + 1][1] - s[i][1] for i in (0, 2)) * 3 / 8 + (s[5][1] - s[4][1]) * 2 / 8 for s in steps]
    assert summary["epochs"][0]["surrogate_gap"] == pytest.approx(sum(per_step) / 12, rel=1e-5, abs=1e-7)


def test_an_fp16_step_abandoned_before_its_second_pass_has_no_gap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    scaler = LossScaler(init_scale=2.0 ** 8)
    mz = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.1, switches=Switches(scaler=scaler))
    calls = [0]

    def blow_up_first(out, y):
        calls[0] += 1
        loss = nn.functional.cross_entropy(out, y)
        return loss * 1e38 if calls[0] == 1 else loss

    skipped = Batch(model, model, x, y, blow_up_first, cost=Cost(), scaler=scaler)
    mz.step(skipped)
    assert scaler.skipped == 1 and skipped.surrogate_gap() is None
    ran = Batch(model, model, x, y, blow_up_first, cost=Cost(), scaler=scaler)
    mz.step(ran)
    gap = ran.surrogate_gap()
    assert gap is not None and math.isfinite(gap.item()) and gap.device == x.device


def test_gap_in_epochs_csv_and_the_row(tmp_path):
    rows = {name: execute(make_config("digits-noise", minimizer=name, epochs=2, results_dir=str(tmp_path),
                                      device="cpu", workers=0)) for name in ("sam", "sgd")}
    sam, sgd = rows["sam"], rows["sgd"]
    assert sam["status"] == sgd["status"] == "ok"
    epochs = pd.read_csv(tmp_path / "runs" / sam["run_id"] / "epochs.csv")
    assert "surrogate_gap" in epochs.columns and epochs.surrogate_gap.notna().all()
    assert (epochs.surrogate_gap > 0).all()
    assert sam["surrogate_gap"] == pytest.approx(epochs.surrogate_gap.iloc[-1])
    assert "surrogate_gap" not in sgd
    assert "surrogate_gap" not in pd.read_csv(tmp_path / "runs" / sgd["run_id"] / "epochs.csv").columns
    table = pd.read_csv(tmp_path / "digits-noise.csv").set_index("run_id")
    assert table.loc[sam["run_id"], "surrogate_gap"] == pytest.approx(sam["surrogate_gap"])
    assert math.isnan(table.loc[sgd["run_id"], "surrogate_gap"])
