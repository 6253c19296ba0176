"""Stopping a run: Ctrl-C once asks it to finish the epoch, checkpoint and stop (`StopFlag`, `graceful_sigint`),
twice stops it at once; under torchrun every rank stops at the same epoch end (`stop_asked`)."""
from __future__ import annotations

import contextlib
import sys

import torch

from bench import distributed as D


class Interrupted(Exception):
    """SIGINT during training: the run stopped at an epoch boundary after saving its checkpoint."""


class StopFlag:
    """Set by the first SIGINT: the run finishes the current epoch, checkpoints, and stops."""

    def __init__(self):
        self.set = False


@contextlib.contextmanager
def handling_sigint(handler):
    """Call `handler(signum, frame)` on SIGINT inside the block (outside the main thread, e.g. in a test
    runner, no handler can be set and the block runs as it is)."""
    import signal
    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_asked(stop: StopFlag | None, device: torch.device) -> bool:
    """Whether a Ctrl-C asked the run to stop, on any rank. Each rank has its own flag (a signal may reach one
    rank, or reach them at different steps of the epoch); were each to decide alone, one would stop at its
    checkpoint's collectives while the others trained on, waiting for each other for ever. One all-reduce of one
    number per epoch under DDP."""
    asked = stop is not None and stop.set
    if not D.is_distributed():
        return asked
    flag = torch.tensor([1.0 if asked else 0.0], device=device)
    return D.all_reduce_sum(flag).item() > 0


@contextlib.contextmanager
def graceful_sigint(stop):
    """First Ctrl-C: ask the run to stop at the end of the epoch (after its checkpoint). Second: stop now."""
    def handler(signum, frame):
        if stop.set:
            raise KeyboardInterrupt
        stop.set = True
        print("Ctrl-C: finishing this epoch, then saving and stopping (Ctrl-C again: stop now)", file=sys.stderr,
              flush=True)

    with handling_sigint(handler):
        yield
