"""bench/engine.py driven directly on tiny jobs: checkpoints that refuse to run code, whole-state resume under
data parallelism (2 gloo processes), BatchNorm statistics averaged across ranks before evaluation."""
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bench.config import RunConfig
from bench.data import TensorLoader
from bench.train.control import Interrupted, StopFlag
from bench.train.loop import train
from bench.errors import UserError
from bench.task import Job

CPU = torch.device("cpu")
TIMING = ("epoch_time_s", "data_time_s", "loader_items_per_s", "wall_s")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one torch thread."""


def tiny_cfg(world: int = 1, **kw) -> RunConfig:
    values = dict(task="tiny", model="mlp", minimizer="sam", rho=0.05, epochs=3, batch_size=8, lr=0.05,
                  weight_decay=0.0, schedule="cosine", world_size=world, device="cpu", workers=0)
    return RunConfig.of(**{**values, **kw})


def tiny_job(bn: bool = False) -> Job:
    """A small MLP with dropout (or BatchNorm) on a fixed 3-class problem; the same initialisation each call."""
    torch.manual_seed(0)
    middle = [nn.BatchNorm1d(16)] if bn else [nn.Dropout(0.5)]
    model = nn.Sequential(nn.Linear(6, 16), *middle, nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    train_loader = TensorLoader(x[:96], y[:96], batch_size=8, shuffle=True, seed=0)
    test_loader = TensorLoader(x[96:], y[96:], batch_size=16, shuffle=False)
    return Job(model, train_loader, test_loader, nn.functional.cross_entropy, num_train=96)


def fresh_process_job(cfg: RunConfig, rank: int) -> Job:
    """What bench.train.runner.execute does in a new process: build the job, then a per-rank RNG stream."""
    job = tiny_job()
    torch.manual_seed(cfg.seed + 1_000_003 * rank)
    return job


def _init(rank, world, rdv):
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ checkpoints

def _plant(path):
    Path(path).write_text("the checkpoint ran code")


class Planted:
    """Unpickling this calls _plant: what a malicious checkpoint in a shared results folder would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return _plant, (self.path,)


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path):
    cfg = tiny_cfg()
    ckpt, marker = tmp_path / "checkpoint.pt", tmp_path / "pwned"
    torch.save({"version": 2, "run_id": cfg.run_id, "epoch": 1, "extra": Planted(marker)}, ckpt)
    with pytest.raises(UserError) as e:
        train(cfg, tiny_job(), CPU, checkpoint=ckpt)
    msg = str(e.value)
    assert "\n" not in msg and str(ckpt) in msg and "delete it" in msg and "--restart" in msg
    assert "test_engine._plant" in msg and not marker.exists()


def test_rng_streams_survive_a_weights_only_round_trip(tmp_path):
    import random
    import numpy as np
    from bench.train import checkpoint as ckpt
    np.random.seed(3), random.seed(4), torch.manual_seed(5)
    np.random.randn()  # a cached Gaussian is part of numpy's state
    ckpt.save(tmp_path / "c.pt", {"version": ckpt.VERSION, "run_id": "r", "epoch": 1, "rng": ckpt.rng_state()})
    expected = (np.random.randn(3).tolist(), random.random(), torch.rand(2).tolist())
    np.random.seed(0), random.seed(0), torch.manual_seed(0)
    ckpt.set_rng_state(ckpt.load(tmp_path / "c.pt", "r")["rng"])
    assert (np.random.randn(3).tolist(), random.random(), torch.rand(2).tolist()) == expected
    with pytest.raises(TypeError, match=r"checkpoint\['x'\] is a numpy.float64"):
        ckpt.save(tmp_path / "d.pt", {"x": np.float64(1.0)})  # would be refused at resume: refused now


def test_single_process_resume_counts_resumptions_and_matches(tmp_path):
    cfg = tiny_cfg(epochs=3)
    straight_job = fresh_process_job(cfg, 0)
    straight = train(cfg, straight_job, CPU, checkpoint=tmp_path / "a.pt")
    for stop_after in (1, 2):
        with pytest.raises(Interrupted, match=f"after epoch {stop_after} of 3"):
            stop = StopFlag()
            stop.set = True
            train(cfg, fresh_process_job(cfg, 0), CPU, checkpoint=tmp_path / "b.pt", stop=stop)
    torch.manual_seed(999)  # a new process starts from some other RNG state: the checkpoint's must win
    job = fresh_process_job(cfg, 0)
    resumed = train(cfg, job, CPU, checkpoint=tmp_path / "b.pt")
    assert (straight["resumptions"], resumed["resumptions"], resumed["resumed_from"]) == (0, 2, 2)
    assert _metrics(straight) == _metrics(resumed)
    assert _same_weights(straight_job.model.state_dict(), job.model.state_dict())


def _metrics(summary):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in summary["epochs"]]


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ data parallel

def _resume_worker(rank, world, rdv, out):
    _init(rank, world, rdv)
    cfg = tiny_cfg(world)
    results = {}
    job = fresh_process_job(cfg, rank)
    results["straight"] = (train(cfg, job, CPU, checkpoint=Path(out) / "straight.pt"), job.model.state_dict())
    stop = StopFlag()
    stop.set = True
    for _ in range(2):  # interrupted after epoch 1, then after epoch 2, each time in a "new process"
        try:
            train(cfg, fresh_process_job(cfg, rank), CPU, checkpoint=Path(out) / "resumed.pt", stop=stop)
        except Interrupted:
            pass
        dist.barrier()
    job = fresh_process_job(cfg, rank)
    results["resumed"] = (train(cfg, job, CPU, checkpoint=Path(out) / "resumed.pt"), job.model.state_dict())
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_process_run_resumed_twice_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    # Dropout draws from each rank's own RNG stream: restoring rank 0's stream on rank 1 changes rank 1's
    # masks, hence the averaged gradients and the weights of both ranks.
    mp.start_processes(_resume_worker, args=(2, str(tmp_path / "rdv"), str(tmp_path)), nprocs=2,
                       start_method="fork")
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        (straight, w_straight), (resumed, w_resumed) = r["straight"], r["resumed"]
        assert (straight["resumptions"], resumed["resumptions"], resumed["resumed_from"]) == (0, 2, 2)
        assert _metrics(straight) == _metrics(resumed) and len(resumed["epochs"]) == 3
        assert _same_weights(w_straight, w_resumed), f"rank {rank}"
        assert all(math.isfinite(h["train_loss"]) for h in resumed["epochs"])


def _bn_worker(rank, world, rdv, out):
    _init(rank, world, rdv)
    cfg = tiny_cfg(world, epochs=1, minimizer="sgd")
    job = tiny_job(bn=True)
    bn = job.model[1]
    seen = {}

    def after_forward(module, inputs, output):  # the rank's own statistics after each training batch
        if module.training:
            seen["trained"] = (module.running_mean.clone(), module.running_var.clone())

    def evaluate(model):
        seen["evaluated"] = (bn.running_mean.clone(), bn.running_var.clone())
        return {}

    bn.register_forward_hook(after_forward)
    job.evaluate, job.track = evaluate, ()
    train(cfg, job, CPU)
    torch.save(seen, Path(out) / f"bn{rank}.pt")
    dist.destroy_process_group()


def test_batchnorm_statistics_are_averaged_across_ranks_before_evaluation(tmp_path):
    mp.start_processes(_bn_worker, args=(2, str(tmp_path / "rdv"), str(tmp_path)), nprocs=2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"bn{r}.pt") for r in range(2))
    for i in range(2):  # running_mean, running_var
        assert not torch.equal(r0["trained"][i], r1["trained"][i])  # each rank saw its own batches
        assert torch.equal(r0["evaluated"][i], r1["evaluated"][i])
        assert torch.allclose(r0["evaluated"][i], (r0["trained"][i] + r1["trained"][i]) / 2, rtol=0, atol=1e-7)
