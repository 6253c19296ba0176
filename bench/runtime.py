"""What a run is set up with, before its loop: the device, the seeds, the base optimizer and its schedule, the
backends' flags (cudnn.benchmark, TF32), the forward's autocast. Plain functions of the RunConfig."""
from __future__ import annotations

import contextlib
import math
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from bench import distributed as D
from bench.config import RunConfig
from bench.errors import UserError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine "
                        "(no GPU or a CPU-only torch build); use --device cpu or --device auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and D.is_distributed():
        return torch.device("cuda", local_rank)
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
    wd = cfg.weight_decay if cfg.weight_decay_style == "optimizer" else 0.0  # "loss": the L2 term is in the loss
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=wd)
    if cfg.optimizer in ("adam", "adamw"):  # fairseq's Adam decays the weights decoupled, as AdamW
        cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=cfg.lr, betas=(cfg.momentum, cfg.beta2), weight_decay=wd)
    raise UserError(f"unknown base optimizer {cfg.optimizer!r}")


def make_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int | None = None):
    """(scheduler, stepped per 'epoch' or per 'step')."""
    if cfg.schedule == "cosine":  # stepped once per epoch, T_max = epochs (official CIFAR script)
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs), "epoch"
    if cfg.schedule == "cosine-step":  # the SAM code: lr * 0.5 (1 + cos(pi t / T)) at step t, no warm-up
        total = max(cfg.epochs * (steps_per_epoch or 1), 1)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total))), "step"
    if cfg.schedule == "inverse_sqrt":  # fairseq's: linear warm-up from 0, then lr * sqrt(warmup / step)
        w = max(cfg.warmup_steps, 1)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: (s + 1) / w if s + 1 < w else math.sqrt(w / (s + 1))), "step"
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), "epoch"


def set_backend_flags(cfg: RunConfig, device: torch.device) -> None:
    """cudnn.benchmark on CUDA (it picks the fastest convolution algorithms for the run's fixed shapes: the same
    arithmetic up to rounding); --fast also allows TF32 matmuls. The row records the flags (`numerics_flags`)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if cfg.fast:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def numerics_flags() -> dict[str, Any]:
    """What the backends were allowed to do, for the row: TF32 in matmuls and in cuDNN convolutions (torch's
    defaults: off and on), cudnn.benchmark."""
    return {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def check_fp16(device: torch.device) -> None:
    """fp16 autocast must run on the device: one line if it does not."""
    try:
        with torch.autocast(device.type, dtype=torch.float16):
            torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"--precision fp16: this device ({device}) has no fp16 autocast "
                        f"({' '.join(str(e).split())[:120]}); use --precision bf16 or fp32") from None


def autocast_for(precision: str, device: torch.device):
    """The forward's autocast context factory: bf16 / fp16 forward and loss, fp32 weights and gradients."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext


FAST = "bf16 autocast, channels_last, torch.compile, TF32 matmuls and convolutions"


def fast_settings(device: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings `--fast` turns on (those that change numerics slightly, for speed): bf16 autocast unless a
    precision was given, channels_last, compile, and TF32 (`set_backend_flags`). CUDA only: on a CPU it says
    which parts would apply."""
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if not dev.startswith("cuda"):
        raise UserError(f"--fast is for CUDA GPUs ({FAST}); on {dev} TF32 does not exist, bf16 autocast is slower "
                        "than fp32 on most CPUs and channels_last rarely helps: pass --compile (and --precision bf16 "
                        "where your CPU has fast bf16) on their own")
    out = {"fast": True, "channels_last": True, "compile": True}
    if settings.get("precision") is None:
        out["precision"] = "bf16"
    return out
