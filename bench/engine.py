"""The training loop. It knows no task: it gets a RunConfig and a Job (model, loaders, loss, evaluate).

One step = `minimizer.step(closure)`, where the closure runs forward + backward on the batch and returns
the first pass's loss and outputs (training metrics come from the unperturbed pass, as in the official
code). SGD runs call the closure once, SAM/ASAM twice on the same batch.
"""
from __future__ import annotations

import math
import os
import random
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.config import RunConfig
from bench.errors import UserError
from bench.minimizers import Minimizer, create_minimizer
from bench.task import Job


class Reporter:
    """Progress callbacks; the CLI passes a rich implementation, tests and sweeps the silent one."""

    def start_epoch(self, epoch: int, epochs: int, batches: int | None) -> None: ...
    def advance(self) -> None: ...
    def end_epoch(self, metrics: dict[str, Any]) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine "
                        "(no GPU or a CPU-only torch build); use --device cpu or --device auto")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA too


def make_base_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.momentum, cfg.beta2),
                                weight_decay=cfg.weight_decay)
    raise UserError(f"unknown base optimizer {cfg.optimizer!r}")


def make_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer):
    if cfg.schedule == "cosine":  # stepped once per epoch, T_max = epochs (official CIFAR script)
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@torch.no_grad()
def evaluate_classification(model: nn.Module, loader, device: torch.device) -> dict[str, float]:
    """Test loss (plain cross entropy, no smoothing) and top-1 accuracy in percent."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss_sum += nn.functional.cross_entropy(out, y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
        seen += y.shape[0]
    seen = max(seen, 1)
    return {"test_loss": loss_sum.item() / seen, "test_acc": 100.0 * correct.item() / seen}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(cfg: RunConfig, job: Job, device: torch.device, reporter: Reporter | None = None) -> dict[str, Any]:
    """Train for cfg.epochs; return {"status", "epochs": [per-epoch metrics], summary metrics...}."""
    reporter = reporter or Reporter()
    model = job.model.to(device)
    base = make_base_optimizer(cfg, model)
    minimizer: Minimizer = create_minimizer(cfg.minimizer, base, model, rho=cfg.rho, eta=cfg.eta,
                                            bn_second_pass=cfg.bn_second_pass,
                                            second_pass_rng=cfg.second_pass_rng)
    scheduler = make_scheduler(cfg, base)
    evaluate = job.evaluate or (lambda m: evaluate_classification(m, job.test_loader, device))

    history: list[dict[str, Any]] = []
    train_time = 0.0
    status, note = "ok", ""
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        reporter.start_epoch(epoch, cfg.epochs, _len(job.train_loader))
        lr = base.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        _sync(device)
        t0 = time.perf_counter()
        for x, y in job.train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)

            def closure():
                out = model(x)
                loss = job.loss_fn(out, y)
                loss.backward()
                return loss.detach(), out.detach()

            loss, out = minimizer.step(closure)
            n = y.shape[0]
            loss_sum += loss.double() * n  # accumulate on device: no host sync per step
            if out.dim() == 2 and y.dim() == 1:
                correct += (out.argmax(1) == y).sum()
            seen += n
            reporter.advance()
        _sync(device)
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        scheduler.step()
        train_loss = loss_sum.item() / max(seen, 1)
        metrics: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": train_loss,
                                   "train_acc": 100.0 * correct.item() / max(seen, 1)}
        if not math.isfinite(train_loss):
            status, note = "diverged", f"non-finite training loss at epoch {epoch}"
            metrics["epoch_time_s"] = epoch_time
            history.append(metrics)
            reporter.end_epoch(metrics)
            break
        metrics.update(evaluate(model))
        metrics["epoch_time_s"] = epoch_time
        history.append(metrics)
        reporter.end_epoch(metrics)

    summary: dict[str, Any] = {"status": status, "note": note, "epochs": history,
                               "epochs_done": len(history), "train_time_s": train_time,
                               "images_per_s": job.num_train * len(history) / train_time if train_time else 0.0,
                               "final_train_loss": history[-1]["train_loss"] if history else float("nan")}
    for key in job.track:
        values = [h[key] for h in history if key in h]
        summary[f"max_{key}"] = max(values) if values else float("nan")
        summary[f"final_{key}"] = values[-1] if values else float("nan")
    return summary


def _len(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)
