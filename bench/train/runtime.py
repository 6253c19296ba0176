"""What a run is set up with, before its loop: the device, the seeds, the base optimizer and its schedule, the
backends' flags (cudnn.benchmark, TF32), the forward's autocast. Plain functions of the RunConfig."""
from __future__ import annotations

import contextlib
import math
import os
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from bench import distributed as D
from bench import gpu
from bench.config import RunConfig
from bench.errors import UserError
from bench.gpu import compile_can_be_deterministic, inductor_config


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The run's device, with an index for CUDA (its own GPU: LOCAL_RANK's under torchrun). `auto` is CUDA where
    torch can use it, else the CPU, except where an NVIDIA GPU is present but unusable (an old driver for the
    wheel's CUDA): that is one line saying what to install, never a silent run on the CPU."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: " + (gpu.cuda_problem() or "CUDA is not available on this machine (no "
                                                 "NVIDIA GPU or driver); use --device cpu"))
    if name == "auto":
        problem = None if torch.cuda.is_available() else gpu.cuda_problem()
        if problem:
            raise UserError(f"--device auto: {problem}")
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", D.cuda_index() if D.is_distributed() else torch.cuda.current_device())
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this process sees {torch.cuda.device_count()} GPU(s) (cuda:0 to "
                        f"cuda:{torch.cuda.device_count() - 1}); name one of those")
    return device


def sweep_device(device: str, *, slurm: bool = False, gpus_per_run: int = 1, gpus: str | None = None) -> str:
    """The device every run of a sweep gets. `auto` is decided once, here: a sweep started on GPUs (CUDA usable
    here, local --gpus, or SLURM with GPUs per run) gives its runs `cuda`, so that a run whose process then
    finds no usable GPU fails in one line instead of training on the CPU; `cpu` on a machine without a GPU."""
    if device != "auto":
        return device
    if slurm:
        return "cuda" if gpus_per_run >= 1 else "cpu"
    if gpus or torch.cuda.is_available():
        return "cuda"
    problem = gpu.cuda_problem()
    if problem:
        raise UserError(f"--device auto: {problem}")
    return "cpu"


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
    arithmetic up to rounding) unless --deterministic (see `deterministic_mode`); --fast also allows TF32 matmuls.
    The row records the flags (`numerics_flags`)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
    if cfg.fast:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs to be deterministic (CUDA >= 10.2); read when cuBLAS starts


@contextlib.contextmanager
def deterministic_mode(on: bool):
    """--deterministic, inside the block: deterministic algorithms (torch raises on an op that has none: that
    becomes one line), cuDNN's deterministic convolutions without benchmarking, cuBLAS's fixed workspace and
    torch.compile's deterministic mode; the previous settings are restored after (callers in one process, tests).
    Entered before anything runs on the GPU: cuBLAS reads its variable when it starts."""
    if not on:
        yield
        return
    import os
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    inductor = inductor_config() if compile_can_be_deterministic() else None
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             inductor.deterministic if inductor else None)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if inductor:
        inductor.deterministic = True
    try:
        yield
    except RuntimeError as e:
        if "deterministic" not in str(e):
            raise
        raise UserError(f"--deterministic: {' '.join(str(e).split())[:200]}; run without --deterministic (a resume is "
                        "then equal up to rounding: docs/reliability.md, 'Determinism')") from None
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        if inductor:
            inductor.deterministic = saved[4]


@contextlib.contextmanager
def training_flags(device: torch.device):
    """Inside the block, the backend flags `bench run` trains with on `device` (its defaults: cudnn.benchmark on
    CUDA), for timings that should match training; the previous flags are restored after."""
    from types import SimpleNamespace
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    set_backend_flags(SimpleNamespace(fast=False, deterministic=False), device)
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved


@contextlib.contextmanager
def exact_fp32():
    """fp32 arithmetic as written inside the block: no TF32 in matmuls or cuDNN convolutions (torch allows it
    in convolutions by default, and --fast in matmuls too: on Ampere and later that is a 10-bit mantissa);
    the flags are restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def numerics_flags() -> dict[str, Any]:
    """What the backends were allowed to do, for the row: TF32 in matmuls and in cuDNN convolutions (torch's
    defaults: off and on), cudnn.benchmark, deterministic algorithms."""
    return {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


def precision_note(precision: str, device: torch.device) -> str:
    """A line for a precision that runs slower than expected on this device ('' otherwise): bf16 on a GPU that
    only emulates it (before Ampere) is slower than fp32."""
    if precision == "bf16" and device.type == "cuda" and not gpu.native_bf16(device):
        return (f"note: --precision bf16 on {torch.cuda.get_device_name(device)} (compute capability "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}) is emulated, slower than fp32: "
                "bf16 needs compute capability 8.0 (Ampere) or later; use --precision fp16 or fp32 here")
    return ""


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


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)
