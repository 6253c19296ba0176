"""A CPU sweep's runs started from a process that has torch imported already: multiprocessing's forkserver.

Every run of a sweep is a process of its own (bench.sweep.child), and a fresh interpreter spends ~3.8 s on 2
cores importing torch, torch._dynamo (pulled in by the first optimizer) and the suite before the first step:
longer than a whole smoke or digits run trains. Here a server process imports them once and forks each run
from itself; the run is still a process of its own (its own memory, its own exit status, killed alone), and
trains bit for bit as a fresh one does (tests/sweep/test_forked.py).

Only for runs on the CPU in one process: the server never touches CUDA, but a CUDA run gains nothing from 4 s
and keeps the plain fresh process (bench.sweep.sweeper). `SAMBENCH_FRESH_PROCESS=1` turns this off.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
from multiprocessing import forkserver
from pathlib import Path

# What the server imports before it forks: torch and what every run imports, and torchvision and timm, which
# the image tasks import when they need them (another 2 s a run; a digits run does not mind them). bench.cli.main:
# multiprocessing re-runs the sweeper's main script in each run, and the `bench` script imports it.
PRELOAD = ["torch", "torch._dynamo", "torch.optim", "torchvision", "timm", "bench.sweep.child", "bench.train.runner",
           "bench.sharpness.run", "bench.registry", "tasks", "bench.cli.main"]
OFF = "SAMBENCH_FRESH_PROCESS"
# Read once, when a library loads (in the server): a run whose environment says otherwise starts fresh.
THREADS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

# multiprocessing's private name for the pipe by which the server sees its clients go (CPython 3.4 on); without
# it a run could outlive its sweeper, so runs start fresh.
ALIVE = "_forkserver_alive_fd"

_context = None
_server_threads: tuple | None = None  # THREADS as the server started with them


def _threads(env) -> tuple:
    return tuple(env.get(k) for k in THREADS)


def wanted(cfg, env=os.environ) -> bool:
    """Whether `cfg` starts from the server: a one-process CPU run, unless the user asked for fresh processes
    or the thread counts changed since the server started."""
    return (cfg.device == "cpu" and cfg.world_size == 1 and env.get(OFF, "") in ("", "0")
            and _server_threads in (None, _threads(env)) and hasattr(forkserver._forkserver, ALIVE))


def context():
    global _context, _server_threads
    if _context is None:
        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
        _server_threads = _threads(os.environ)  # the server starts at the first run, in this environment
    return _context


def die_with_parent() -> None:
    """SIGTERM to this process when its parent dies (Linux), so no orphan trains a run whose claim another
    sweeper is about to take over."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


class ForkedRun:
    """`python -m bench.sweep.child ARGV` forked from the server, in `env` and this process's working directory,
    its output appended to `log`. The two calls the sweeper makes of a subprocess.Popen: wait() and terminate()."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, entry=None):
        args = (entry or _child_main, argv, dict(env), os.getcwd(), str(log))
        self.proc = context().Process(target=_run, args=args, name="run")
        self.proc.start()

    def wait(self) -> int:
        self.proc.join()
        return self.proc.exitcode

    def terminate(self) -> None:
        self.proc.terminate()


def _child_main(argv: list[str]) -> int:
    from bench.sweep.child import main
    return main(argv)


def _run(entry, argv: list[str], env: dict[str, str], cwd: str, log: str) -> None:
    """In the forked process: become what `subprocess.Popen([python, -m, bench.sweep.child, *argv], env=env,
    cwd=cwd, stdout=log, stderr=STDOUT)` would have started, then run `entry(argv)` (the child's main)."""
    # The server exits when its last client closes the "alive" pipe, and multiprocessing hands every forked
    # process a copy: closed here, the server exits when the sweeper does, and this run then gets SIGTERM
    # (die_with_parent), as a fresh process does when its sweeper dies.
    os.close(getattr(forkserver._forkserver, ALIVE))
    setattr(forkserver._forkserver, ALIVE, None)
    server = os.getppid()
    die_with_parent()
    if os.getppid() != server:  # the server died before that took effect
        os._exit(1)
    # The platform's start method, as in a fresh process: a forkserver child's says forkserver, and every
    # data-loader worker would then import torch again (3x slower smoke runs).
    mp.set_start_method(None, force=True)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # line by line, as PYTHONUNBUFFERED gives a fresh process
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.exit(entry(argv))
