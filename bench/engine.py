"""The training loop. It knows no task: it gets a RunConfig and a Job (model, loaders, loss, evaluate).

One step = `minimizer.step(batch)`, where `batch` (bench.batch.Batch) runs the passes the minimizer asks
for on the step's examples and returns the loss and outputs (training metrics come from the unperturbed
pass, as in the official code). SGD runs one pass, SAM/ASAM two, the variants what they need; the batch
counts every forward and backward (the row's passes per step) and does accumulation and fp16 scaling.

Under torchrun the model is wrapped in DistributedDataParallel. SAM's first pass (forward and backward)
runs inside `no_sync()`, so each replica perturbs its weights with its own local gradient (the SAM
paper's m-sharpness, m = per-replica batch); only the second gradient is averaged. With
`sync_perturbation`, or for a minimizer that needs the same first gradient on every replica
(`ascent_sync`: GSAM, LookSAM, F-SAM), the first gradient is all-reduced too (m = global batch).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import checkpoint as ckpt
from bench import distributed as D
from bench.batch import Cost
from bench.config import RunConfig
from bench.data import set_epoch
from bench.minimizers import LossScaler, Minimizer, create_minimizer
from bench.runtime import (autocast_for, check_fp16, device_name, make_base_optimizer, make_scheduler,  # noqa: F401
                           numerics_flags, resolve_device, seed_everything, set_backend_flags)
from bench.step import compute_spent, l2_term, loop_step, sync, train_step  # noqa: F401  (train_step, l2_term: public)
from bench.task import Job


class Reporter:
    """Progress callbacks; the CLI passes a rich implementation, tests and sweeps the silent one."""

    def start_epoch(self, epoch: int, epochs: int, batches: int | None) -> None: ...
    def advance(self) -> None: ...
    def end_epoch(self, metrics: dict[str, Any]) -> None: ...












def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def forward(model: nn.Module, x):
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


@torch.no_grad()
def evaluate_classification(model: nn.Module, loader, device: torch.device,
                            topk: tuple[int, ...] = (1,), autocast=contextlib.nullcontext) -> dict[str, float]:
    """Test loss (plain cross entropy, no smoothing) and top-k accuracies in percent, summed over ranks. The
    forward runs under `autocast` (the training precision's: a bf16 run is evaluated in bf16, as it trains)."""
    model.eval()
    sums = torch.zeros(2 + len(topk), device=device, dtype=torch.float64)  # loss, count, correct@k...
    for x, y in loader:
        x, y = to_device(x, device), to_device(y, device)
        with autocast():
            out = forward(model, x)
        sums[0] += nn.functional.cross_entropy(out.float(), y, reduction="sum").double()
        sums[1] += y.shape[0]
        top = out.topk(max(topk), dim=1).indices
        for i, k in enumerate(topk):
            sums[2 + i] += (top[:, :k] == y[:, None]).any(1).sum()
    D.all_reduce_sum(sums)
    n = max(sums[1].item(), 1)
    metrics = {"test_loss": sums[0].item() / n}
    for i, k in enumerate(topk):
        metrics["test_acc" if k == 1 else f"test_top{k}"] = 100.0 * sums[2 + i].item() / n
    return metrics


class Interrupted(Exception):
    """SIGINT during training: the run stopped at an epoch boundary after saving its checkpoint."""


class StopFlag:
    """Set by the first SIGINT: the run finishes the current epoch, checkpoints, and stops."""

    def __init__(self):
        self.set = False


@contextlib.contextmanager
def handling_sigint(handler):
    """Call `handler(signum, frame)` on SIGINT inside the block (outside the main thread, e.g. in a test
    runner, no handler can be set and the block runs as it is)."""
    import signal
    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class TrainState:
    """Everything `train` works on: what `setup` builds, what `resume` restores, what `save` writes."""
    cfg: RunConfig
    job: Job
    device: torch.device
    model: nn.Module                  # the task's module: what is checkpointed and evaluated
    net: nn.Module                    # what trains: the model, compiled and/or wrapped in DDP
    base: torch.optim.Optimizer
    minimizer: Minimizer
    scheduler: Any
    sched_unit: str                   # the scheduler steps per "epoch" or per "step"
    history: list[dict[str, Any]] = field(default_factory=list)
    train_time: float = 0.0
    status: str = "ok"                # ok | diverged
    note: str = ""
    epoch: int = 0                    # epochs done
    resumed_from: int = 0             # epochs done when this call resumed (0: started afresh)
    resumptions: int = 0              # times this run was resumed from its checkpoint, this call included
    shakes: list[nn.Module] | None = None  # modules with a true_gradient switch (found on the first step)
    cost: Cost = field(default_factory=Cost)  # examples run forward / backward and steps taken, whole run
    compile_s: float = 0.0            # torch.compile: wall time of the first (compiling) step of this process
    checkpoint_s: float = 0.0         # what the training thread waited for checkpoints, this process
    writer: ckpt.Writer = field(default_factory=ckpt.Writer)  # checkpoints written off the training thread
    tracker: Any = None               # bench.tracking.Tracker (--log), or None






def setup(cfg: RunConfig, job: Job, device: torch.device) -> TrainState:
    set_backend_flags(cfg, device)
    model = job.model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if cfg.compile:  # the minimizer keeps the uncompiled module: same parameters, names without prefixes
        net = torch.compile(model)
    if D.is_distributed():
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    base = make_base_optimizer(cfg, model)
    if cfg.precision == "fp16":
        check_fp16(device)
    minimizer = create_minimizer(cfg.minimizer, base, model, rho=cfg.rho, eta=cfg.eta, **cfg.mopts,
                                 bn_second_pass=cfg.bn_second_pass, second_pass_rng=cfg.second_pass_rng,
                                 clip_norm=cfg.clip_norm, scaler=LossScaler() if cfg.precision == "fp16" else None)
    scheduler, sched_unit = make_scheduler(cfg, base, _len(job.train_loader))
    return TrainState(cfg, job, device, model, net, base, minimizer, scheduler, sched_unit)






def resume(st: TrainState, path: Path) -> None:
    """Restore the state saved after the last finished epoch."""
    state = ckpt.load(path, st.cfg.run_id)
    st.model.load_state_dict(state["model"])
    st.minimizer.load_state_dict(state["minimizer"])
    st.scheduler.load_state_dict(state["scheduler"])
    st.history, st.train_time = state["history"], state["train_time"]
    st.status, st.note = state.get("status", "ok"), state.get("note", "")
    ckpt.restore_rng_state(state["rng"], path, st.device)  # this rank's own streams (see bench.checkpoint)
    if st.job.load_state_dict is not None and state["task"] is not None:
        st.job.load_state_dict(state["task"])
    st.epoch = st.resumed_from = state["epoch"]
    st.resumptions = state["resumptions"] + 1
    st.cost = Cost(**state.get("cost", {}))


def save(st: TrainState, path: Path) -> None:
    """Rank 0 writes the checkpoint, with every rank's RNG state, on its writer thread; all ranks must call it.
    `flush` waits until it is on disk: a rank that stops (Interrupted) and restarts must not find the old one."""
    rngs = ckpt.gather_rng_states(st.device)
    if D.is_main():
        st.writer.submit(path, {
            "version": ckpt.VERSION, "run_id": st.cfg.run_id, "epoch": st.epoch,
            "model": st.model.state_dict(), "minimizer": st.minimizer.state_dict(),
            "scheduler": st.scheduler.state_dict(), "rng": rngs, "history": st.history,
            "train_time": st.train_time, "status": st.status, "note": st.note, "resumptions": st.resumptions,
            "cost": dataclasses.asdict(st.cost), "task": st.job.state_dict() if st.job.state_dict is not None else None})


def flush(st: TrainState) -> None:
    """Every checkpoint submitted is on disk, on every rank's return (before stopping or finishing)."""
    st.writer.wait()
    D.barrier()


def run_epoch(st: TrainState, epoch: int, reporter: Reporter) -> tuple[dict[str, Any], dict[str, float]]:
    """Train one epoch; return its training metrics (loss, accuracy if it classifies, and for a two-pass
    minimizer `surrogate_gap`: the mean over the steps that measured it of L(w + e) - L(w)) and its timings."""
    cfg, job, device = st.cfg, st.job, st.device
    count = job.count or (lambda y: y.shape[0])
    autocast = autocast_for(cfg.precision, device)
    st.net.train()
    set_epoch(job.train_loader, epoch - 1)
    reporter.start_epoch(epoch, cfg.epochs, _len(job.train_loader))
    lr = st.base.param_groups[0]["lr"]
    sums = torch.zeros(5, device=device, dtype=torch.float64)  # loss * n, correct, n, gap sum, steps with a gap
    data_time, classifies = 0.0, False
    sync(device)
    t0 = t_data = time.perf_counter()
    for x, y in job.train_loader:
        x, y = to_device(x, device), to_device(y, device)
        data_time += time.perf_counter() - t_data

        classifies = loop_step(st, x, y, autocast, sums, count)
        reporter.advance()
        t_data = time.perf_counter()
    sync(device)
    epoch_time = time.perf_counter() - t0
    st.train_time += epoch_time
    if st.sched_unit == "epoch":
        st.scheduler.step()
    D.all_reduce_sum(sums)
    seen = max(sums[2].item(), 1)
    metrics: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": sums[0].item() / seen}
    if classifies:
        metrics["train_acc"] = 100.0 * sums[1].item() / seen
    if sums[4].item() > 0:  # a one-pass minimizer (or an epoch of LookSAM reuse steps only) has none
        metrics["surrogate_gap"] = sums[3].item() / sums[4].item()
    metrics.update(compute_spent(st))
    # data_time: time this process waited for batches; loader_items_per_s: what the loader delivered while it
    # was being waited on. A data_time close to epoch_time means the GPU starves.
    timing = {"epoch_time_s": epoch_time, "data_time_s": data_time,
              "loader_items_per_s": seen / D.world_size() / data_time if data_time > 0 else float("inf")}
    return metrics, timing














def evaluate_epoch(st: TrainState, metrics: dict[str, Any], timing: dict[str, float]) -> None:
    """Add the task's evaluation and the timings to an epoch's metrics, or mark the run diverged (then the
    epoch reports its time only)."""
    if not math.isfinite(metrics["train_loss"]):
        st.status, st.note = "diverged", f"non-finite training loss at epoch {metrics['epoch']}"
        metrics["epoch_time_s"] = timing["epoch_time_s"]
        return
    job = st.job
    autocast = autocast_for(st.cfg.precision, st.device)
    evaluate = job.evaluate or (lambda m: evaluate_classification(m, job.test_loader, st.device, job.topk, autocast))
    if D.is_distributed():
        average_norm_statistics(st.model)
    metrics.update(evaluate(st.model))
    metrics.update(timing)


def average_norm_statistics(model: nn.Module) -> None:
    """Under DDP each rank's BatchNorm running statistics come from its own batches: evaluate every rank
    with their mean (num_batches_tracked is equal anyway). DDP then broadcasts rank 0's, now the mean, at
    the next training forward, as it always does."""
    D.average_([b for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                for b in (m.running_mean, m.running_var) if b is not None])


def summarize(st: TrainState) -> dict[str, Any]:
    history, job = st.history, st.job
    summary: dict[str, Any] = {"status": st.status, "note": st.note, "epochs": history,
                               "resumed_from": st.resumed_from, "resumptions": st.resumptions,
                               "epochs_done": len(history),
                               "train_time_s": st.train_time,
                               # compile_s: the first step's wall time of a compiled run (it compiles), left out
                               # of images_per_s (it is in train_time_s)
                               "compile_s": st.compile_s, "checkpoint_s": st.checkpoint_s,
                               "images_per_s": job.num_train * len(history) / (st.train_time - st.compile_s)
                               if st.train_time > st.compile_s else 0.0,
                               "final_train_loss": history[-1]["train_loss"] if history else float("nan"),
                               **final_gap(history), **per_step(st)}
    for key in job.track:
        values = [h[key] for h in history if key in h]
        summary[f"max_{key}"] = max(values) if values else float("nan")
        summary[f"final_{key}"] = values[-1] if values else float("nan")
    if job.finalize is not None and st.status == "ok":
        summary.update(job.finalize(st.model))
    return summary


def final_gap(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The row's `surrogate_gap`: the last epoch's (none for a one-pass run, or a last epoch that measured none)."""
    if history and history[-1].get("surrogate_gap") is not None:
        return {"surrogate_gap": history[-1]["surrogate_gap"]}
    return {}


def per_step(st: TrainState) -> dict[str, Any]:
    """The row's cost figures: passes (and forward / backward examples) per step in batches, in all."""
    c, steps = st.cost, max(st.cost.steps, 1)
    out = {"passes_per_step": c.passes() / steps, "fwd_per_step": c.fwd / steps, "bwd_per_step": c.bwd / steps,
           "passes_total": c.passes(), "steps": c.steps}
    if st.minimizer.scaler is not None:
        out["skipped_steps"] = st.minimizer.scaler.skipped
    return out


def train(cfg: RunConfig, job: Job, device: torch.device, reporter: Reporter | None = None,
          checkpoint: Path | None = None, on_epoch=None, stop: StopFlag | None = None,
          tracker=None) -> dict[str, Any]:
    """Train for cfg.epochs; return {"status", "epochs": [per-epoch metrics], summary metrics...}.

    With `checkpoint`, the state after every epoch (model, minimizer and base optimizer, scheduler, epoch,
    every rank's RNG states, metrics so far, the task's `Job.state_dict()`) is saved there atomically, and
    an existing checkpoint is resumed from: the batches of an epoch depend only on (seed, epoch), so a
    resumed run is bit-identical to an uninterrupted one; the summary's `resumptions` counts the resumes,
    across processes. `on_epoch(history)` is called after every epoch (the runner logs epochs.csv).

    Checkpoints are written every `cfg.checkpoint_every` epochs, after the last, after a divergence and when
    stopped, by a background thread (the row's `checkpoint_s`: what this process's training thread waited for
    them, the copies of the state, in all); a crash loses at most the epochs since the last one, which a resume trains again to
    the very same result. `tracker` (bench.tracking) gets every step's loss and every epoch's metrics."""
    reporter = reporter or Reporter()
    st = setup(cfg, job, device)
    st.tracker = tracker
    if checkpoint is not None and checkpoint.exists():
        resume(st, checkpoint)
    while st.status == "ok" and st.epoch < cfg.epochs:
        metrics, timing = run_epoch(st, st.epoch + 1, reporter)
        evaluate_epoch(st, metrics, timing)
        st.epoch += 1
        st.history.append(metrics)
        reporter.end_epoch(metrics)
        if tracker is not None:  # before the checkpoint: a crash in between repeats an epoch's point, never loses it
            tracker.epoch(st.epoch, metrics)
        stopping = stop_asked(st, stop) and st.epoch < cfg.epochs and st.status == "ok"
        if checkpoint is not None and (stopping or checkpoint_due(st)):
            t0 = time.perf_counter()
            save(st, checkpoint)
            st.checkpoint_s += time.perf_counter() - t0
        if on_epoch is not None:
            on_epoch(st.history)
        if stopping:
            flush(st)
            raise Interrupted(f"stopped after epoch {st.epoch} of {cfg.epochs}")
    flush(st)
    return summarize(st)


def stop_asked(st: TrainState, stop: StopFlag | None) -> bool:
    """Whether a Ctrl-C asked the run to stop, on any rank. Each rank has its own flag (a signal may reach one
    rank, or reach them at different steps of the epoch); were each to decide alone, one would stop at its
    checkpoint's collectives while the others trained on, waiting for each other for ever. One all-reduce of one
    number per epoch under DDP."""
    asked = stop is not None and stop.set
    if not D.is_distributed():
        return asked
    flag = torch.tensor([1.0 if asked else 0.0], device=st.device)
    return D.all_reduce_sum(flag).item() > 0


def checkpoint_due(st: TrainState) -> bool:
    return st.epoch % st.cfg.checkpoint_every == 0 or st.epoch == st.cfg.epochs or st.status != "ok"


def _len(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)
