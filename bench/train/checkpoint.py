"""The per-epoch checkpoint: writing it atomically, reading it without running code, and the RNG streams.

A checkpoint is a dict of tensors and plain Python values (numbers, strings, lists, tuples, dicts) only, so
it is read with `torch.load(weights_only=True)`: a file planted in a shared results folder cannot run code
in whoever resumes it. Nothing needs allow-listing: numpy's RNG state is stored as a tensor, not an array.

RNG streams under data parallelism: every rank's state is gathered into rank 0's checkpoint and each rank
restores its own on resume (rather than re-deriving per-rank streams from (seed, rank, epoch) at every
epoch start), so an uninterrupted run draws exactly the numbers it drew before resuming was made exact.
"""
from __future__ import annotations

import pickle
import random
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from bench import distributed as D
from bench.errors import UserError
from bench.store.files import atomic_replace

VERSION = 2  # 2: plain values only (weights_only loading), every rank's RNG state, resumptions, task state
PLAIN = (int, float, str, bool, bytes, type(None))


def cuda_index(device: torch.device | None) -> int | None:
    """The index of the run's CUDA device (None on the CPU)."""
    if device is None or device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG streams (python, numpy, torch CPU, and the CUDA generator of the run's own device) as
    tensors and plain values. One CUDA generator, not every visible GPU's: a run draws from its own device
    only, and a checkpoint must resume where another number of GPUs is visible (an 8-GPU node's run taken over
    by a worker that sees one)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    index = cuda_index(device) if torch.cuda.is_initialized() else None  # CUDA never used: nothing drawn
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   cached),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(index) if index is not None else None}


def own_cuda_state(saved: Any, index: int) -> torch.Tensor:
    """The saved CUDA generator state to restore on device `index`. Format-2 checkpoints written before this
    fix hold every visible GPU's state (a list, by position): the run used its own device's, which was the
    one at its index, else (fewer states than that) the first one."""
    if isinstance(saved, (list, tuple)):
        return saved[index] if index < len(saved) else saved[0]
    return saved


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    index = cuda_index(device)
    if state["cuda"] is not None and index is not None:
        torch.cuda.set_rng_state(own_cuda_state(state["cuda"], index), index)


def gather_rng_states(device: torch.device | None = None) -> list[dict[str, Any]] | None:
    """Every rank's RNG state, in rank order, on rank 0 (None on the others). All ranks must call it."""
    mine = rng_state(device)
    if not D.is_distributed():
        return [mine]
    states: list | None = [None] * D.world_size() if D.is_main() else None
    dist.gather_object(mine, states, dst=0)
    return states


def restore_rng_state(states: list[dict[str, Any]], path: Path, device: torch.device | None = None) -> None:
    """Restore this rank's own stream from a checkpoint's per-rank states (CUDA: onto the run's own device)."""
    if len(states) != D.world_size():
        raise UserError(f"checkpoint {path} holds the RNG states of {len(states)} processes but "
                        f"{D.world_size()} run; resume with as many, or delete it or pass --restart")
    set_rng_state(states[D.rank()], device)


def check_plain(value: Any, where: str = "checkpoint") -> None:
    """Refuse (as a bug, at save time) what weights_only loading would refuse at resume time. Types are
    compared exactly: numpy.float64 is a float subclass, but it pickles as a numpy object."""
    if isinstance(value, (torch.Tensor, torch.Size)) or type(value) in PLAIN:
        return
    if type(value) in (dict, OrderedDict):
        for key, v in value.items():
            check_plain(key, where)
            check_plain(v, f"{where}[{key!r}]")
    elif type(value) in (list, tuple):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
    else:
        raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}: a checkpoint holds "
                        "tensors and plain Python values only (it is loaded with weights_only=True)")


def save(path: Path, state: dict[str, Any]) -> None:
    """torch.save through a temporary file and an atomic rename: a kill leaves the old file or the new."""
    check_plain(state)
    atomic_replace(path, lambda f: torch.save(state, f))


def load(path: Path, run_id: str) -> dict[str, Any]:
    """The checkpoint of `run_id` at `path`, read without running code; a one-line UserError otherwise."""
    fix = "delete it or pass --restart to start this run over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():  # a damaged pickle, not a refused one
            raise UserError(f"checkpoint {path} is unreadable (UnpicklingError); {fix}") from None
        found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e)))) or ["an unknown object"]
        raise UserError(f"checkpoint {path} holds {', '.join(found)}, which no sambench checkpoint holds; "
                        f"it was not loaded (loading it could run code): {fix}") from None
    except Exception as e:  # truncated, corrupt, or not a torch file
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); {fix}") from None
    if not isinstance(state, dict) or "epoch" not in state:
        raise UserError(f"checkpoint {path} is unreadable (not a sambench checkpoint); {fix}")
    if state.get("version") != VERSION:
        raise UserError(f"checkpoint {path} is in format {state.get('version')}, this sambench reads format "
                        f"{VERSION}; {fix}")
    if state.get("run_id") != run_id:
        raise UserError(f"checkpoint {path} belongs to run {state.get('run_id')}, not {run_id}; {fix}")
    return state


def snapshot(value: Any, into: Any = None) -> Any:
    """A copy of a checkpoint's state whose tensors are detached CPU copies: training may go on changing the
    live ones (weights, momentum) while a background thread writes the copy. `into`, an earlier snapshot of
    the same structure that nothing reads any more, lends its tensors (copied into in place: a fresh
    allocation of a few hundred MB costs several times the copy)."""
    if isinstance(value, torch.Tensor):
        if (isinstance(into, torch.Tensor) and into.shape == value.shape and into.dtype == value.dtype
                and into.device.type == "cpu"):
            return into.copy_(value.detach())
        return value.detach().to("cpu", copy=True)
    if type(value) in (dict, OrderedDict):
        old = into if type(into) is type(value) else {}
        return type(value)((k, snapshot(v, old.get(k))) for k, v in value.items())
    if type(value) in (list, tuple):
        old = into if type(into) is type(value) and len(into) == len(value) else [None] * len(value)
        return type(value)(snapshot(v, o) for v, o in zip(value, old))
    return value


class Writer:
    """Writes checkpoints off the training thread: `submit` copies the state (the only part the training
    thread waits for, besides a previous write still under way) and a background thread saves it through
    `save`'s atomic rename, so the file on disk is always a whole checkpoint, the last one or the one
    before. At most one write is in flight. `wait()` blocks until it is on disk and re-raises its error.
    The thread is not a daemon: a process that is stopping still finishes the write it started."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._last: Any = None  # the last snapshot, written: its buffers serve the next one

    def submit(self, path: Path, state: dict[str, Any]) -> None:
        self.wait()
        check_plain(state)  # a bug shows here, on the training thread, not later in the writer
        copy = self._last = snapshot(state, self._last)
        self._thread = threading.Thread(target=self._write, args=(path, copy), name="checkpoint-writer")
        self._thread.start()

    def _write(self, path: Path, state: dict[str, Any]) -> None:
        try:
            save(path, state)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread at its next wait()
            self._error = e

    def settle(self) -> BaseException | None:
        """Block until the write under way is on disk and hand back its error instead of raising it: for a
        training thread that is already failing, whose own error is the one to report. Without this, a caller
        that catches the failure (a retry, a sweep) could look for the checkpoint while it is still being
        written and find the one before it, or none."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        return error

    def wait(self) -> None:
        error = self.settle()
        if error is not None:
            raise error
