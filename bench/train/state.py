"""What a run trains on (`TrainState`) and its life across processes: `setup` builds it from the RunConfig and
the task's Job, `save` writes the per-epoch checkpoint (rank 0, off the training thread), `resume` restores it.

A checkpoint holds everything a resumed run needs to continue exactly: the model, the minimizer with its base
optimizer and fp16 scaler, the scheduler, every rank's RNG streams (bench.train.checkpoint), the metrics so far
and whatever the task keeps between epochs (`Job.state_dict`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import distributed as D
from bench.config import RunConfig
from bench.minimizers import LossScaler, Minimizer, Switches, create_minimizer
from bench.task import Job
from bench.train import checkpoint as ckpt
from bench.train.batch import Cost
from bench.train.runtime import check_fp16, make_base_optimizer, make_scheduler, set_backend_flags


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
    switches = Switches(bn_second_pass=cfg.bn_second_pass, second_pass_rng=cfg.second_pass_rng,
                        clip_norm=cfg.clip_norm, scaler=LossScaler() if cfg.precision == "fp16" else None)
    minimizer = create_minimizer(cfg.minimizer, base, model, switches, **cfg.mopts)
    scheduler, sched_unit = make_scheduler(cfg, base, loader_len(job.train_loader))
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


def checkpoint_due(st: TrainState) -> bool:
    return st.epoch % st.cfg.checkpoint_every == 0 or st.epoch == st.cfg.epochs or st.status != "ok"


def loader_len(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
