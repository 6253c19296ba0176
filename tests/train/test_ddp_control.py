"""Multi-process control: a Ctrl-C that reaches one torchrun rank stops every rank at the same epoch end.

Two gloo ranks train the digits demo; only rank 1's stop flag is set, in the middle of epoch 1. Both must stop
after epoch 1 (Interrupted), with one checkpoint written, instead of rank 1 stopping alone at the checkpoint's
collectives while rank 0 trains on (before the fix: a collective timed out)."""
import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.train import loop
from bench.train.control import Interrupted, StopFlag
from bench.registry import get_task
from bench.recipes import make_config


class StopOnRank1(loop.Reporter):
    """Sets rank 1's stop flag at the 5th step of epoch 1, as a signal delivered to that rank alone would."""

    def __init__(self, rank, stop):
        self.rank, self.stop, self.steps = rank, stop, 0

    def advance(self):
        self.steps += 1
        if self.rank == 1 and self.steps == 5:
            self.stop.set = True


def _worker(rank, world, rdv, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    torch.set_num_threads(1)
    cfg = make_config("digits-noise", minimizer="sam", epochs=3, batch_size=64, device="cpu", workers=0,
                      world_size=2, results_dir=out_dir)
    torch.manual_seed(0)
    job = get_task(cfg.task).build(cfg, torch.device("cpu"))
    stop = StopFlag()
    outcome = "finished"
    try:
        loop.train(cfg, job, torch.device("cpu"), StopOnRank1(rank, stop), checkpoint=Path(out_dir) / "ckpt.pt",
                     stop=stop)
    except Interrupted as e:
        outcome = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)
    dist.destroy_process_group()


def test_a_stop_on_one_rank_stops_every_rank_at_the_same_epoch_end(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path / "rdv"), str(tmp_path)), nprocs=2, start_method="fork")
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert outcomes == ["stopped after epoch 1 of 3"] * 2
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["epoch"] == 1
