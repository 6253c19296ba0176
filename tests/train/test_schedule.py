"""--sam-from and --sam-every (bench.train.schedule): the engine's run against a hand-written loop that switches at the
same steps, exact resumes across the switch, passes counted, the combinations with --accumulate, --m and DDP, and
the refusals."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from typer.testing import CliRunner

from bench.cli.main import app
from bench.config import RunConfig, sam_start_epoch
from bench.data import TensorLoader
from bench.task import Job
from bench.train.control import Interrupted, StopFlag
from bench.train.loop import train

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_of(**kw) -> RunConfig:
    values = dict(task="tiny", model="mlp", minimizer="sam", rho=0.1, epochs=4, batch_size=8, lr=0.05,
                  momentum=0.9, weight_decay=5e-4, schedule="constant", device="cpu", workers=0)
    return RunConfig.of(**{**values, **kw})


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def job():
    x, y = data()
    return Job(model(), TensorLoader(x[:48], y[:48], batch_size=8, shuffle=True, seed=0),
               TensorLoader(x[48:], y[48:], batch_size=16, shuffle=False), F.cross_entropy, num_train=48)


def hand_loop(epochs, start, every, rho=0.1, lr=0.05, wd=5e-4, fresh=True):
    """SGD, then SAM from epoch `start` with a new SGD (the late-phase script's two optimizers); SAM at every
    `every`-th step of the run (Composer's (t + 1) % interval == 0)."""
    x, y = data()
    net, loader = model(), TensorLoader(x[:48], y[:48], batch_size=8, shuffle=True, seed=0)
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    t = 0
    for epoch in range(epochs):
        if fresh and start and epoch == start:
            opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
        loader.epoch = epoch
        for xb, yb in loader:
            g = torch.autograd.grad(F.cross_entropy(net(xb), yb), params)
            if epoch >= start and (t + 1) % every == 0:
                norm = torch.sqrt(sum((gi * gi).sum() for gi in g))
                with torch.no_grad():
                    e = [rho * gi / (norm + 1e-16) for gi in g]
                    saved = [p.clone() for p in params]
                    for p, ei in zip(params, e):
                        p.add_(ei)
                g = torch.autograd.grad(F.cross_entropy(net(xb), yb), params)
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
            for p, gi in zip(params, g):
                p.grad = gi
            opt.step()
            t += 1
    return [p.detach() for p in params]


@pytest.mark.parametrize("sam_from, sam_every, start", [(2, 1, 2), (0.75, 1, 3), (0, 3, 0), (0.5, 2, 2)])
def test_engine_matches_a_hand_written_loop_switching_at_the_same_steps(sam_from, sam_every, start):
    cfg = cfg_of(sam_from=sam_from, sam_every=sam_every)
    assert sam_start_epoch(cfg.sam_from, cfg.epochs) == start
    j = job()
    summary = train(cfg, j, CPU)
    for ours, ref in zip(j.model.parameters(), hand_loop(4, start, sam_every)):
        torch.testing.assert_close(ours.detach(), ref, rtol=1e-5, atol=1e-6)
    steps = 4 * 6
    sam_steps = sum(1 for t in range(steps) if t // 6 >= start and (t + 1) % sam_every == 0)
    assert summary["passes_per_step"] == pytest.approx((steps + sam_steps) / steps)
    assert summary["parallel_passes_per_step"] == summary["passes_per_step"]


def test_without_the_fresh_optimizer_the_reference_differs():
    """The switch's fresh base optimizer matters: a loop keeping SGD's momentum across it ends elsewhere."""
    j = job()
    train(cfg_of(sam_from=2), j, CPU)
    kept = hand_loop(4, 2, 1, fresh=False)
    assert not all(torch.allclose(a.detach(), b) for a, b in zip(j.model.parameters(), kept))


@pytest.mark.parametrize("stop_after", [1, 2, 3])
def test_a_resume_across_the_switch_is_exact(tmp_path, stop_after):
    cfg = cfg_of(sam_from=2, sam_every=2)
    straight = job()
    train(cfg, straight, CPU, checkpoint=tmp_path / "a.pt")
    for _ in range(stop_after):
        stop = StopFlag()
        stop.set = True
        with pytest.raises(Interrupted):
            train(cfg, job(), CPU, checkpoint=tmp_path / "b.pt", stop=stop)
    resumed = job()
    train(cfg, resumed, CPU, checkpoint=tmp_path / "b.pt")
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_accumulate_and_m_combine_with_the_schedule():
    base = job()
    train(cfg_of(sam_every=2, sam_from=1), base, CPU)
    acc = job()
    train(cfg_of(sam_every=2, sam_from=1, accumulate=2), acc, CPU)  # no BatchNorm: the same gradients
    for a, b in zip(base.model.parameters(), acc.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    chunked = job()
    summary = train(cfg_of(sam_every=2, sam_from=1, m=4), chunked, CPU)
    assert summary["passes_per_step"] == pytest.approx((24 + 9) / 24)  # epochs 1-3: every 2nd of 18 steps


def _ddp_worker(rank, world, rdv, out):
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        j = job()
        summary = train(cfg_of(sam_from=2, sam_every=2, world_size=world), j, CPU)
        torch.save({"params": [p.detach() for p in j.model.parameters()], "passes": summary["passes_per_step"]},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_replicas_switch_together_and_stay_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, tmp_path / "rdv", tmp_path / "out"), nprocs=2)
    a, b = (torch.load(f"{tmp_path / 'out'}.{r}") for r in (0, 1))
    assert a["passes"] == b["passes"] == pytest.approx((12 + 3) / 12)  # 3 steps per epoch per rank; SAM at 7, 9, 11
    assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))


@pytest.mark.parametrize("args, says", [
    (["--minimizer", "sgd", "--sam-every", "2"], "not the base optimizer alone"),
    (["--minimizer", "looksam", "--sam-from", "2"], "not looksam"),
    (["--minimizer", "sam", "--sam-from", "4"], "--sam-from must be in (0, 4)"),
    (["--minimizer", "sam", "--sam-from", "-1"], "--sam-from must be in (0, 4)"),
    (["--minimizer", "sam", "--sam-from", "2.5"], "pass an integer"),
    (["--minimizer", "sam", "--sam-from", "0.05"], "starts at epoch 0"),
    (["--minimizer", "sam", "--sam-every", "0"], "--sam-every must be an integer >= 1"),
])
def test_bad_schedules_are_refused_in_one_line(tmp_path, args, says):
    result = CliRunner().invoke(app, ["run", "digits-noise", "--epochs", "4", "--results-dir", str(tmp_path), *args])
    assert result.exit_code == 2 and says in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_the_schedule_is_in_the_run_id_only_when_set():
    plain, late, every = cfg_of(), cfg_of(sam_from=2), cfg_of(sam_every=5)
    assert "sam_from" not in plain.identity() and "sam_every" not in plain.identity()
    assert late.identity()["sam_from"] == 2 and every.identity()["sam_every"] == 5
    assert len({plain.run_id, late.run_id, every.run_id}) == 3
    row = late.to_row()
    assert (row["sam_from"], row["sam_every"]) == (2, 1)
