"""The training loop. It knows no task: it gets a RunConfig and a Job (model, loaders, loss, evaluate).

One step = `minimizer.step(batch)`, where `batch` (bench.train.batch.Batch) runs the passes the minimizer asks
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
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import distributed as D
from bench.config import RunConfig
from bench.data import set_epoch, to_device
from bench.task import Job
from bench.train.batch import forward
from bench.train.control import Interrupted, StopFlag, stop_asked
from bench.train.runtime import autocast_for
from bench.train.schedule import switches_now
from bench.train.state import TrainState, checkpoint_due, flush, loader_len, resume, save, setup
from bench.train.step import compute_spent, loop_step, sync


class Reporter:
    """Progress callbacks; the CLI passes a rich implementation, tests and sweeps the silent one."""

    def start_epoch(self, epoch: int, epochs: int, batches: int | None) -> None: ...
    def advance(self) -> None: ...
    def end_epoch(self, metrics: dict[str, Any]) -> None: ...


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


def run_epoch(st: TrainState, epoch: int, reporter: Reporter) -> tuple[dict[str, Any], dict[str, float]]:
    """Train one epoch; return its training metrics (loss, accuracy if it classifies, and for a two-pass
    minimizer `surrogate_gap`: the mean over the steps that measured it of L(w + e) - L(w)) and its timings."""
    cfg, job, device = st.cfg, st.job, st.device
    count = job.count or (lambda y: y.shape[0])
    autocast = autocast_for(cfg.precision, device)
    st.net.train()
    if switches_now(cfg, epoch - 1):  # late-phase SAM starts with a fresh base optimizer (bench.train.schedule)
        st.base.state.clear()
    set_epoch(job.train_loader, epoch - 1)
    reporter.start_epoch(epoch, cfg.epochs, loader_len(job.train_loader))
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
    """The row's cost figures: passes (and forward / backward examples) per step in batches, in all;
    `parallel_passes_per_step`: the passes on a step's critical path were its independent passes run on devices of
    their own (SAMPa's claim: its `parallel_passes`), beside the passes it spent here."""
    c, steps = st.cost, max(st.cost.steps, 1)
    mz = st.minimizer
    share = getattr(mz, "parallel_passes", mz.passes) / mz.passes  # SAMPa: its two passes run side by side
    out = {"passes_per_step": c.passes() / steps, "parallel_passes_per_step": share * c.passes() / steps,
           "fwd_per_step": c.fwd / steps, "bwd_per_step": c.bwd / steps, "passes_total": c.passes(), "steps": c.steps}
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
    try:
        _epochs(st, reporter, checkpoint, on_epoch, stop)
    except BaseException:
        st.writer.settle()  # a crash leaves the last checkpoint whole on disk before anyone looks for it
        raise
    flush(st)
    return summarize(st)


def _epochs(st: TrainState, reporter: Reporter, checkpoint: Path | None, on_epoch, stop: StopFlag | None) -> None:
    """`train`'s epochs, from the state's epoch to the last (or a divergence, or a stop)."""
    cfg, tracker = st.cfg, st.tracker
    while st.status == "ok" and st.epoch < cfg.epochs:
        metrics, timing = run_epoch(st, st.epoch + 1, reporter)
        evaluate_epoch(st, metrics, timing)
        st.epoch += 1
        st.history.append(metrics)
        reporter.end_epoch(metrics)
        if tracker is not None:  # before the checkpoint: a crash in between repeats an epoch's point, never loses it
            tracker.epoch(st.epoch, metrics)
        stopping = stop_asked(stop, st.device) and st.epoch < cfg.epochs and st.status == "ok"
        if checkpoint is not None and (stopping or checkpoint_due(st)):
            t0 = time.perf_counter()
            save(st, checkpoint)
            st.checkpoint_s += time.perf_counter() - t0
        if on_epoch is not None:
            on_epoch(st.history)
        if stopping:
            flush(st)
            raise Interrupted(f"stopped after epoch {st.epoch} of {cfg.epochs}")


