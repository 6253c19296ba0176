"""fp16 under DDP: an overflow in one replica's local ascent pass is skipped by every replica together.

The ascent pass runs under no_sync (each replica perturbs with its own gradient), so one replica's first
gradient can overflow alone. Two gloo ranks, an overflow planted in rank 1's ascent of step 2: both ranks
must skip that step, halve their loss scale, count one skipped step and end with bit-equal weights (before the
fix rank 1 skipped alone: scales 1024 vs 512, then a collective waited for a partner that never came)."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bench.train.batch import Batch, Cost
from bench.minimizers import LossScaler, create_minimizer, Switches

STEPS, PLANTED_STEP, PLANTED_RANK = 4, 2, 1


def _net():
    torch.manual_seed(0)  # identical initialisation on every rank
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _worker(rank, world, rdv, out_dir, name):
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))  # a desynchronised collective fails, never hangs
    torch.set_num_threads(1)
    model = _net()
    net = nn.parallel.DistributedDataParallel(model)
    scaler = LossScaler(init_scale=1024.0)
    mz = create_minimizer(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.05, switches=Switches(scaler=scaler))
    g = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    state = {"step": 0, "first": True}

    def loss_fn(out, target):  # the step's first forward is its ascent: blow it up on one rank, once
        loss = nn.functional.cross_entropy(out, target)
        planted = state["first"] and state["step"] == PLANTED_STEP and rank == PLANTED_RANK
        state["first"] = False
        return loss * 1e38 if planted else loss

    for step in range(1, STEPS + 1):
        state.update(step=step, first=True)
        mz.step(Batch(net, model, x, y, loss_fn, cost=Cost(), scaler=scaler, no_sync=net.no_sync,
                      local_ascent=not mz.ascent_sync))
    dist.barrier()
    torch.save({"scale": scaler.scale, "skipped": scaler.skipped,
                "params": [p.detach().clone() for p in model.parameters()]}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["sam", "asam", "esam"])
def test_a_local_overflow_is_skipped_by_every_rank(tmp_path, name):
    mp.start_processes(_worker, args=(2, str(tmp_path / "rdv"), str(tmp_path), name), nprocs=2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert (r0["scale"], r0["skipped"]) == (r1["scale"], r1["skipped"]) == (512.0, 1)
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
