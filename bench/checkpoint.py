"""The per-epoch checkpoint: writing it atomically, reading it back, and the RNG streams it carries."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.errors import UserError
from bench.results import atomic_replace

VERSION = 1


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, state: dict[str, Any]) -> None:
    """torch.save through a temporary file and an atomic rename: a kill leaves the old file or the new."""
    atomic_replace(path, lambda f: torch.save(state, f))


def load(path: Path, run_id: str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "epoch" not in state:
            raise ValueError("not a sambench checkpoint")
    except Exception as e:  # truncated, corrupt, or not ours
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it or pass --restart "
                        "to start this run over") from None
    if state.get("run_id") != run_id:
        raise UserError(f"checkpoint {path} belongs to run {state.get('run_id')}, not {run_id}; "
                        "delete it or pass --restart")
    return state
