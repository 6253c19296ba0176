"""Data parallelism on CPU with the gloo backend and 2 processes: torchrun end to end, and SAM's
per-replica (m-sharpness) versus synchronised perturbation."""
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bench.train.batch import Batch, Cost
from bench.minimizers import ASAM, SAM


def _net():
    torch.manual_seed(0)  # identical initialisation on every rank
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _local_batch(rank):
    g = torch.Generator().manual_seed(100 + rank)  # each replica its own data
    return torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)


def _worker(rank, world, rdv, out_dir, cls_name, sync):
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cls = {"sam": SAM, "asam": ASAM}[cls_name]
    model = _net()
    net = nn.parallel.DistributedDataParallel(model)
    opt = cls(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.5)
    x, y = _local_batch(rank)
    records = {}
    for step in range(2):
        before = [p.detach().clone() for p in model.parameters()]
        batch = Batch(net, model, x, y, nn.functional.cross_entropy, cost=Cost(), no_sync=net.no_sync,
                      local_ascent=not sync)  # the engine's: the ascent stays local unless synced
        batch("ascent")
        opt.ascent_step()
        records[f"eps{step}"] = [p.detach() - b for p, b in zip(model.parameters(), before)]
        batch("descent")
        opt.descent_step()
        records[f"weights{step}"] = [p.detach().clone() for p in model.parameters()]
    torch.save(records, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _alone(rank, cls_name, grads_from=None):
    """What replica `rank` computes by itself: the perturbation from its own batch (step 0)."""
    cls = {"sam": SAM, "asam": ASAM}[cls_name]
    model = _net()
    opt = cls(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    ranks = grads_from or [rank]
    for r in ranks:  # averaged gradient of several replicas' batches (equal batch sizes)
        x, y = _local_batch(r)
        (nn.functional.cross_entropy(model(x), y) / len(ranks)).backward()
    opt.ascent_step()
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def _run(tmp_path, cls_name, sync):
    mp.start_processes(_worker, args=(2, str(tmp_path / "rdv"), str(tmp_path), cls_name, sync), nprocs=2,
                       start_method="fork")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def _close(a, b):
    return all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))


@pytest.mark.parametrize("cls_name", ["sam", "asam"])
def test_default_perturbation_is_per_replica(tmp_path, cls_name):
    r0, r1 = _run(tmp_path, cls_name, sync=False)
    assert _close(r0["eps0"], _alone(0, cls_name)) and _close(r1["eps0"], _alone(1, cls_name))
    assert not _close(r0["eps0"], r1["eps0"])
    for step in range(2):  # only the second gradient is averaged: replicas stay identical
        assert all(torch.equal(a, b) for a, b in zip(r0[f"weights{step}"], r1[f"weights{step}"]))


def test_sync_perturbation_is_identical_across_replicas(tmp_path):
    r0, r1 = _run(tmp_path, "sam", sync=True)
    assert _close(r0["eps0"], r1["eps0"])
    assert _close(r0["eps0"], _alone(0, "sam", grads_from=[0, 1]))
    for step in range(2):
        assert all(torch.equal(a, b) for a, b in zip(r0[f"weights{step}"], r1[f"weights{step}"]))


def test_torchrun_two_processes_write_one_row(fake_cifar10, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "bench", "run", "cifar10", "--minimizer", "asam", "--epochs", "1", "--batch-size", "16",
           "--workers", "0", "--device", "cpu", "--data-dir", str(fake_cifar10), "--results-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    df = pd.read_csv(tmp_path / "cifar10.csv")
    assert len(df) == 1
    row = df.iloc[0]
    assert (row.world_size, row.per_replica_batch, row.global_batch) == (2, 8, 16)  # the batch is global
    assert row.status == "ok" and not row.sync_perturbation
    epochs = pd.read_csv(tmp_path / "runs" / row.run_id / "epochs.csv")
    assert list(epochs.epoch) == [1]
    assert proc.stdout.count("epoch   1") == 1  # only rank 0 reports
