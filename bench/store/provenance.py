"""What a row records besides its run's settings: when, where, and with which code it ran."""
from __future__ import annotations

import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import bench


def git_commit() -> str:
    """The commit of the sambench checkout, with '+dirty' when tracked files differ from it."""
    root = Path(bench.__file__).resolve().parent.parent
    try:
        proc = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=5)
        sha = proc.stdout.strip()
        if proc.returncode != 0 or not sha:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=root, capture_output=True,
                               timeout=5).returncode != 0
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(device_name: str) -> dict[str, Any]:
    """Everything besides the config needed to re-run or trust a row."""
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device_name": device_name,
        "torch_version": torch_version(),
        "python_version": platform.python_version(),
        "sambench_version": bench.__version__,
        "git_commit": git_commit(),
        "hostname": socket.gethostname(),
    }


def torch_version() -> str:
    """torch's own version string ("2.14.1+cu130") where torch is loaded (every process that trains), else the
    installed distribution's: the store imports no torch."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.__version__
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "not installed"
