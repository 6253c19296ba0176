"""One claim per run id: whoever holds it trains the run; everyone else leaves it alone.

A claim is `runs/<run_id>/claim.json` (host, pid, the process's start time, when the claim was taken, a
heartbeat, a random token). Taking, refreshing, taking over and releasing a claim each happen inside a
short critical section under `claim.json.lock` (filelock, an OS file lock that dies with its process), so
two processes on one machine or on several nodes sharing the filesystem never both hold one run. The
claim file itself outlives the process that wrote it on purpose: `--status` reads it, and a claim whose
owner died is recognised as stale (pid gone on the same host, or no heartbeat for `stale_after` seconds)
and taken over; the new owner resumes the run from its checkpoint.
"""
from __future__ import annotations

import _thread
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock

from bench.errors import UserError
from bench.store.files import atomic_write
from bench.store.records import run_folder

CLAIM = "claim.json"
HEARTBEAT_EVERY = 30.0   # seconds between heartbeats of a held claim
STALE_AFTER = 600.0      # a claim with no heartbeat for this long is taken over (any host)
ENV = "SAMBENCH_CLAIM"   # "<run_id> <token>": a child process runs under its parent's claim


class ClaimHeld(UserError):
    """Another live process holds the run (not a failure of the run)."""


@dataclass(frozen=True)
class Claim:
    run_id: str
    host: str
    pid: int
    pid_start: str     # the process's start time (Linux /proc), so a reused pid is not mistaken for it
    since: str         # ISO time the claim was taken
    heartbeat: float   # time.time() of the last heartbeat
    token: str
    job: str = ""      # the SLURM job (array task) that holds it: its requeued self may take it back

    def where(self) -> str:
        return f"{self.host} pid {self.pid}"


def process_start(pid: int) -> str:
    """The start time of a process in clock ticks since boot ('' where /proc is not there)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def slurm_job() -> str:
    """This process's SLURM job as `<job>_<array task>` ('' outside SLURM)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID", "")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if job and task else job


def alive_here(pid: int, pid_start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    return not pid_start or process_start(pid) in ("", pid_start)


class Claims:
    """Claims of one results folder."""

    def __init__(self, results_dir: str | Path, stale_after: float = STALE_AFTER):
        self.results_dir = Path(results_dir)
        self.stale_after = stale_after
        self.host = socket.gethostname()

    def path(self, run_id: str) -> Path:
        return run_folder(self.results_dir, run_id) / CLAIM

    def _lock(self, run_id: str) -> FileLock:
        path = self.path(run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path) + ".lock", timeout=60)

    def read(self, run_id: str) -> Claim | None:
        """The claim on a run id, or None. A claim file that is not ours to read is one line, exit 2."""
        path = self.path(run_id)
        try:
            with open(path) as f:
                return Claim(**json.load(f))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"claim file {path} is corrupt ({type(e).__name__}); if no process is training "
                            f"run {run_id}, delete it") from None

    def stale(self, claim: Claim) -> str:
        """Why the claim's owner is gone ('' while it lives)."""
        if claim.host == self.host and not alive_here(claim.pid, claim.pid_start):
            return f"pid {claim.pid} is gone"
        if claim.job and claim.job == slurm_job():
            return f"an earlier attempt of SLURM job {claim.job} (requeued)"
        age = time.time() - claim.heartbeat
        if age > self.stale_after:
            return f"no heartbeat for {age:.0f} s"
        return ""

    def acquire(self, run_id: str) -> tuple[Claim | None, Claim | None, str]:
        """(our claim or None, the claim we found, why it was stale). We get the claim when there is none
        or the one there is stale; else the live owner's claim comes back as the second element."""
        with self._lock(run_id):
            found = self.read(run_id)
            why = self.stale(found) if found else ""
            if found is not None and not why:
                return None, found, ""
            pid = os.getpid()
            mine = Claim(run_id=run_id, host=self.host, pid=pid, pid_start=process_start(pid),
                         since=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         heartbeat=time.time(), token=uuid.uuid4().hex, job=slurm_job())
            self._write(mine)
            return mine, found, why

    def _write(self, claim: Claim) -> None:
        atomic_write(self.path(claim.run_id), json.dumps(asdict(claim)) + "\n")

    def beat(self, claim: Claim) -> bool:
        """Refresh the heartbeat; False when the claim is no longer ours (taken over after a stall)."""
        with self._lock(claim.run_id):
            found = self.read(claim.run_id)
            if found is None or found.token != claim.token:
                return False
            self._write(Claim(**{**asdict(found), "heartbeat": time.time()}))
            return True

    def holds(self, run_id: str, token: str) -> bool:
        found = self.read(run_id)
        return found is not None and found.token == token

    def release(self, claim: Claim) -> None:
        with self._lock(claim.run_id):
            found = self.read(claim.run_id)
            if found is not None and found.token == claim.token:
                self.path(claim.run_id).unlink()


class Heartbeat:
    """A daemon thread that refreshes a claim every `every` seconds and calls `on_lost` if it is lost."""

    def __init__(self, claims: Claims, claim: Claim, on_lost, every: float = HEARTBEAT_EVERY):
        self.claims, self.claim, self.on_lost, self.every = claims, claim, on_lost, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat {claim.run_id}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                ok = self.claims.beat(self.claim)
            except (OSError, UserError, TimeoutError):  # a passing filesystem hiccup: try again next beat
                continue
            if not ok:
                self.on_lost()
                return


@contextlib.contextmanager
def claimed_by_me(results_dir: str | Path, run_id: str, log=lambda msg: None, main: bool = True,
                  share: Callable[[str], str] = lambda refusal: refusal) -> Iterator[None]:
    """Hold the claim on `run_id` while the block runs. Under torchrun the `main` rank holds it for all, and
    `share` hands its verdict to every rank (the runner passes the rank and its broadcast: the store knows no
    process group). A process a sweeper started for this run (ENV names the run and the sweeper's token) runs
    under the sweeper's claim. A run that a live process holds is refused with one line."""
    claims = Claims(results_dir)
    inherited = os.environ.get(ENV, "").split()
    claim, refusal = None, ""
    if main:
        if inherited[:1] == [run_id] and len(inherited) == 2:
            if not claims.holds(run_id, inherited[1]):
                refusal = f"the sweeper's claim on run {run_id} is gone (taken over); not training it twice"
        else:
            claim, found, why = claims.acquire(run_id)
            if claim is None:
                refusal = (f"held: run {run_id} is being trained by {found.where()} since {found.since} (claim file "
                           f"{claims.path(run_id)}); wait for it, or delete that file if the process is gone")
            elif found is not None:
                log(f"taking over run {run_id} from {found.where()} ({why}); it resumes from its checkpoint")
    refusal = share(refusal)
    if refusal:
        raise ClaimHeld(refusal.removeprefix("held: "))
    if claim is None:
        yield
        return
    try:
        with Heartbeat(claims, claim, on_lost=_thread.interrupt_main):
            yield
    finally:
        claims.release(claim)
