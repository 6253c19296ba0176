"""What this machine's NVIDIA GPUs and driver are, and whether this torch can use them.

pip picks the newest torch, a build for the newest CUDA, which needs a recent NVIDIA driver and drops the
oldest GPUs; on such a node `torch.cuda.is_available()` is simply False. Silently training on the CPU there
would waste a sweep, so `cuda_problem()` says, in one line, that a GPU is present but unusable, with the driver,
the wheel's CUDA version and the torch to install (docs/clusters.md: "Choosing a torch wheel for a cluster's driver").
No CUDA call here may fail: every probe is a file read or a short subprocess. `bench doctor` reports the same.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

from bench.config import RunConfig
from bench.errors import UserError

DRIVER_FILE = "/proc/driver/nvidia/version"
DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0")
# The newest CUDA of PyTorch's wheels that a driver runs (minor-version compatibility within a major CUDA
# version): (lowest driver major, wheel tag). NVIDIA's release notes: CUDA 13.x needs >= 580, 12.x >= 525,
# 11.8 >= 450 (Linux).
WHEELS = ((580, "cu130"), (525, "cu126"), (450, "cu118"))
INDEX = "https://download.pytorch.org/whl/"


def nvidia_smi(query: str) -> list[str]:
    """`nvidia-smi --query-gpu=QUERY` lines, [] where it is missing or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [ln.strip() for ln in out.stdout.splitlines() if ln.strip()] if out.returncode == 0 else []


def driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version ("550.54.15"), or None where there is none."""
    try:
        text = Path(DRIVER_FILE).read_text()
        found = re.search(r"Kernel Module(?: for [\w-]+)?\s+([\d.]+)", text) or re.search(r"\s(\d{3,}\.[\d.]+)\s", text)
        if found:
            return found.group(1)
    except OSError:
        pass
    lines = nvidia_smi("driver_version")
    return lines[0] if lines else None


def gpu_present() -> bool:
    """An NVIDIA driver is loaded or its device files exist: this machine has a GPU torch should see."""
    return driver_version() is not None or any(Path(f).exists() for f in DEVICE_FILES)


def wheel_for_driver(driver: str | None) -> str | None:
    """PyTorch's wheel tag (cu130, cu126, cu118) for the newest CUDA this driver runs; None if too old/unknown."""
    try:
        major = int(str(driver).split(".")[0])
    except ValueError:
        return None
    return next((tag for low, tag in WHEELS if major >= low), None)


def torch_build() -> str:
    """'torch 2.14.1, a CUDA 13.0 build' or '..., a CPU-only build'."""
    cuda = torch.version.cuda
    return f"torch {torch.__version__}, " + (f"a CUDA {cuda} build" if cuda else "a CPU-only build")


def why_unavailable() -> str:
    """torch's own reason why CUDA is unusable (the warning `torch.cuda.is_available()` raises), '' if none."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.is_available()
    text = " ".join(str(w.message) for w in caught if "cuda" in str(w.message).lower())
    return " ".join(text.split())[:240]


def cuda_problem() -> str | None:
    """One line when an NVIDIA GPU is here but this torch cannot use it (None when CUDA works, or when the
    machine has no NVIDIA GPU at all: a CUDA build on a CPU machine is a CPU machine)."""
    if torch.cuda.is_available() or not gpu_present():
        return None
    driver = driver_version()
    reason = why_unavailable()
    tag = wheel_for_driver(driver)
    fix = (f"pip install torch torchvision --index-url {INDEX}{tag} (the newest CUDA driver {driver} runs)"
           if tag else "update the NVIDIA driver, then install a matching torch")
    if not torch.version.cuda:
        fix = f"this torch has no CUDA at all: {fix}"
    return (f"an NVIDIA GPU is here (driver {driver or 'version unknown'}) but {torch_build()} cannot use it"
            f"{f' ({reason})' if reason else ''}; {fix}; see docs/clusters.md, 'Choosing a torch wheel for a cluster's "
            "driver', or pass --device cpu to train on the CPU anyway")


def native_bf16(device: torch.device) -> bool:
    """Whether this GPU computes bf16 natively (compute capability 8.0, Ampere, and later); older ones emulate it,
    slower than fp32."""
    with torch.cuda.device(device):  # is_bf16_supported asks the current device
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # a torch without the keyword
            return torch.cuda.get_device_capability(device) >= (8, 0)


def inductor_config():
    import torch._inductor.config as inductor
    return inductor


def compile_can_be_deterministic() -> bool:
    """Whether this torch's compiler has a deterministic mode (torch._inductor.config.deterministic: no
    benchmarking that changes numerics); older ones pick kernels by timing them."""
    try:
        return hasattr(inductor_config(), "deterministic")
    except ImportError:
        return False


def check_deterministic(cfg: RunConfig) -> None:
    """--deterministic with --compile where this torch cannot compile deterministically: one line."""
    if cfg.deterministic and cfg.compile and not compile_can_be_deterministic():
        raise UserError(f"--deterministic with --compile: torch {torch.__version__} has no deterministic mode for "
                        "torch.compile (it picks kernels by timing them); drop --compile (or --fast), or upgrade torch")
