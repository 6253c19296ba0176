"""`--download` without races: one process fetches a dataset, the others wait for it and then read it.

Every torchrun rank and every sweep worker given `--download` used to download and extract into the same folder
at once, clobbering each other's files and reading half-written ones. Now "is the data complete? if not, fetch it"
runs under a file lock beside the dataset folder (`<data-dir>/<folder>.lock`), across processes and nodes: the
first holder fetches, the later ones find the data complete and fetch nothing.

Under torchrun rank 0 takes the lock before a barrier, so it is the rank that downloads; the other ranks pass the
barrier at once and then queue on the lock (a file lock, not a collective: a long download cannot trip the
process group's timeout). Each rank still checks under the lock, so a node with its own local data folder ends with
data too. Every rank calls the barrier exactly once, whatever fails: rank 0 raises its errors after it.
"""
from __future__ import annotations

import os
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

from bench import distributed as D
from bench.errors import UserError

WAIT_S = 3 * 3600.0  # a download can take long (SVHN's extra split alone is 1.3 GB); past this, say which lock


def lock_path(folder: str | Path) -> Path:
    folder = Path(folder)
    return folder.with_name(folder.name + ".lock")


def download_once(folder: str | Path, what: str, is_complete: Callable[[], bool], fetch: Callable[[], object]) -> None:
    """Make the dataset in `folder` complete: `fetch()` unless `is_complete()`, under the folder's lock.
    `what` ("cifar10 into DIR") names it in the one-line UserError a failed fetch becomes."""
    folder, wait_s = Path(folder), WAIT_S  # read here, so that tests can shorten it
    with ExitStack() as stack:
        early = None
        if D.rank() == 0:
            try:
                stack.enter_context(_locked(folder, what, wait_s))
            except Exception as e:  # raised after the barrier, which every rank must reach
                early = e
        D.barrier()
        if early is not None:
            raise early
        if D.rank() != 0:
            stack.enter_context(_locked(folder, what, wait_s))
        if not is_complete():
            _fetch(what, fetch)


def _fetch(what: str, fetch: Callable[[], object]) -> None:
    try:
        fetch()
    except Exception as e:  # network errors come in many types
        raise UserError(f"could not download {what}: {' '.join(str(e).split())}") from None


@contextmanager
def _locked(folder: Path, what: str, wait_s: float) -> Iterator[None]:
    """Hold `folder`'s lock; waiting for it says so (rank 0 only) and gives up after `wait_s` seconds."""
    path = lock_path(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the data folder {path.parent} ({e.strerror}) to download {what}") from None
    if not os.access(path.parent, os.W_OK):  # read-only data: nobody here can be writing it, nothing to guard
        yield
        return
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if D.is_main():
            print(f"waiting for {path}: another process is downloading {what}", file=sys.stderr, flush=True)
        try:
            lock.acquire(timeout=wait_s)
        except Timeout:
            waited = f"{wait_s:g} s" if wait_s < 120 else f"{wait_s / 60:.0f} min"
            raise UserError(f"waited {waited} for the lock {path} held by another process downloading {what}; if "
                            f"none is running any more, delete {path} and try again") from None
    try:
        yield
    finally:
        lock.release()
