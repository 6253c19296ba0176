"""One optimizer step of the training loop, as `bench.train.loop.run_epoch` runs it: the step's `Batch` (the passes
the minimizer asks for), m-sharpness chunks, the surrogate gap, the compute spent, the compiled model's first
step timed apart and the last partial batch run uncompiled. The engine's state (`TrainState`) is passed in."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bench import distributed as D
from bench.train.batch import Batch
from bench.train.schedule import two_pass

if TYPE_CHECKING:
    from bench.train.state import TrainState


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_step(st: TrainState, x, y, autocast, sums: torch.Tensor, count) -> bool:
    """One step of the epoch loop: the step (a compiled model's first one timed apart: it compiles), the
    per-step scheduler, the epoch's sums on the device (no host sync), the tracker. Whether it classifies."""
    timed = st.cfg.compile and not st.compile_s
    if timed:
        sync(st.device)
        t0 = time.perf_counter()
    loss, out = train_step(st, x, y, autocast, gap=sums[3:])
    if timed:
        sync(st.device)
        st.compile_s = time.perf_counter() - t0
    if st.sched_unit == "step":
        st.scheduler.step()
    n = count(y)
    sums[0] += loss.double() * n
    classifies = out.dim() == 2 and y.dim() == 1
    if classifies:
        sums[1] += (out.argmax(1) == y).sum()
    sums[2] += n
    if st.tracker is not None:
        st.tracker.step(st.cost.steps, loss, st.base.param_groups[0]["lr"])
    return classifies


def step_net(st: TrainState, n: int) -> nn.Module:
    """What runs a step of n examples: the compiled model, except for a batch shorter than the loader's
    (an epoch's last), which runs the uncompiled module (the same parameters) so that torch.compile compiles
    one static graph rather than a second, dynamic one; under DDP, or for a task whose batches vary in size
    (Job.fixed_batch False: token-bucketed translation), the compiled wrapper always."""
    if (st.cfg.compile and st.job.fixed_batch and n != st.cfg.per_replica_batch
            and not isinstance(st.net, nn.parallel.DistributedDataParallel)):
        return st.model
    return st.net


def train_step(st: TrainState, x, y, autocast, gap: torch.Tensor | None = None):
    """One optimizer step on a batch; (first-pass loss, outputs). With m-sharpness (cfg.m smaller than the
    batch) a minimizer that supports it perturbs every chunk of m examples on its own and averages the
    chunks' second gradients (SAM paper, section 4.1). `gap`, a (2,) float64 tensor on the device, gets the
    step's surrogate gap and 1 added when the step measured one (`add_gap`)."""
    cfg, job, mz = st.cfg, st.job, st.minimizer
    gap = gap if mz.reports_gap else None
    if st.shakes is None:  # once per run, not per step: a walk over every module of the model
        st.shakes = [m for m in st.model.modules() if hasattr(m, "true_gradient")] if cfg.true_gradient else []
    ddp = isinstance(st.net, nn.parallel.DistributedDataParallel)
    batch = Batch(step_net(st, y.shape[0]), st.model, x, y, job.loss_fn, cost=st.cost, per_sample_fn=job.loss_per_sample,
                  autocast=autocast, scaler=mz.scaler, micro=cfg.accumulate, no_sync=st.net.no_sync if ddp else None,
                  weight=global_count_weight(job.count, y) if ddp else 1.0,
                  local_ascent=not (cfg.sync_perturbation or mz.ascent_sync), shakes=tuple(st.shakes),
                  extra_loss=(lambda: l2_term(st.model, cfg.weight_decay)) if cfg.weight_decay_style == "loss" else None)
    step = st.cost.steps
    st.cost.steps += 1
    if cfg.scheduled and not two_pass(cfg, st.epoch, step):  # the base optimizer's plain step
        out = mz.plain_step(batch)
        return out.loss, out.out
    if not (mz.supports_chunks and cfg.m and cfg.m < batch.n):
        out = mz.step(batch)
        add_gap(gap, [(1.0, batch)])
        return out.loss, out.out
    chunks = batch.chunks(cfg.m)
    outs = mz.step_chunks(chunks)
    add_gap(gap, [(c.n / batch.n, c) for c in chunks])
    loss = sum(o.loss * (c.n / batch.n) for o, c in zip(outs, chunks))
    return loss, torch.cat([o.out for o in outs])


def global_count_weight(count, y) -> torch.Tensor | float:
    """Under DDP, for a task whose loss is a mean over units it counts (`Job.count`: IWSLT's non-pad target
    tokens): this rank's count times the world size over the count summed over the ranks, by which its loss is
    weighted. DDP averages the ranks' gradients, so the step's gradient is then the mean over every rank's
    tokens, as fairseq divides the summed loss by the global token count (rather than a mean of the ranks'
    per-token means, which over-weighs the tokens of a rank with fewer). 1.0 where every example is one unit
    (the ranks' batches are equally large). One all-reduce of one number a step, on the device: no host sync."""
    if count is None:
        return 1.0
    mine = torch.as_tensor(count(y), device=y.device).to(torch.float64)
    total = D.all_reduce_sum(mine.clone())
    return (mine * D.world_size() / total.clamp(min=1)).float()


def add_gap(acc: torch.Tensor | None, weighted: list[tuple[float, Batch]]) -> None:
    """acc += (the step's surrogate gap L(w + e) - L(w), 1), on the device, when the step measured one. The
    batches are the step's (one, or its m-sharpness chunks with their shares of the examples): the gap is the
    share-weighted mean over those that measured it (an fp16 overflow can end a step before its last chunks)."""
    if acc is None:
        return
    gaps = [(w, g) for w, g in ((w, b.surrogate_gap()) for w, b in weighted) if g is not None]
    if not gaps:
        return
    share = sum(w for w, _ in gaps)
    acc[0] += sum(g * (w / share) for w, g in gaps)
    acc[1] += 1


def compute_spent(st: TrainState) -> dict[str, Any]:
    """The compute a run has spent so far, for epoch logs: `passes`, SGD steps of equal compute
    (bench.train.batch.Cost.passes), the examples run forward and backward, steps, wall seconds of training,
    fp16's skipped steps."""
    c = st.cost
    out = {"passes": c.passes(), "fwd_examples": c.fwd_examples, "bwd_examples": c.bwd_examples, "steps": c.steps,
           "wall_s": st.train_time}
    if st.minimizer.scaler is not None:
        out["skipped_steps"] = st.minimizer.scaler.skipped
    return out


def l2_term(model: nn.Module, weight_decay: float) -> torch.Tensor:
    """The SAM code's weight decay: 0.5 * wd * sum ||w||^2 over every parameter, BatchNorm and biases too."""
    params = [p for p in model.parameters() if p.requires_grad]
    return 0.5 * weight_decay * torch.stack([p.float().pow(2).sum() for p in params]).sum()
