"""`python -m bench.sweep.child CONFIG.json [--force]`: one run of a sweep, in a fresh process.

A sweeper starts every run this way, so a CUDA error or an out-of-memory in one run cannot poison the
next. The process runs under the sweeper's claim (ENV) and writes the run's record itself: on success the
row, on an exception a `failed` record whose note keeps the first line and whose traceback goes to
runs/<run_id>/error.log. Exit status: 0 done (or already done), 1 failed, 130 interrupted (checkpoint kept).
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from bench import distributed as D
from bench.config import RunConfig


def main(argv: list[str]) -> int:
    sharpness = json.loads(Path(argv[argv.index("--sharpness") + 1]).read_text()) if "--sharpness" in argv else None
    return run_one(RunConfig.of(**json.loads(Path(argv[0]).read_text())), force="--force" in argv, sharpness=sharpness)


def measure(cfg: RunConfig, spec: dict, trained: bool) -> None:
    """The sharpness measures the run's table asks for (rank 0 only): all of them after training it, else
    those sharpness.csv lacks."""
    from bench.sharpness.run import Request, measure_run, missing_pairs
    request = Request.from_dict(spec)
    todo = request.pairs() if trained else missing_pairs(cfg.results_dir, cfg.run_id, request)
    if todo and D.is_main():
        measure_run(cfg.results_dir, cfg.run_id, request, pairs=todo, log=lambda m: print(m, flush=True))


def run_one(cfg: RunConfig, force: bool = False, sharpness: dict | None = None) -> int:
    """Train one run of a sweep in this process (and its torchrun peers), then measure its sharpness when
    `sharpness` (a bench.sharpness.Request.as_dict()) says; the exit status above."""
    from bench.store.claims import ClaimHeld
    from bench.train.control import Interrupted, StopFlag, graceful_sigint
    from bench.train.runner import AlreadyDone, execute, record_failure

    stop = StopFlag()
    try:
        D.init_from_env(cfg.device)  # inside: a process that cannot take its GPU leaves a failed record, one line
        with graceful_sigint(stop):
            trained = True
            try:
                row = execute(cfg, force=force, stop=stop, log=print)
                print(f"{cfg.run_id}: {row['status']}", flush=True)
            except AlreadyDone as done:
                row, trained = done.row, False
                print(f"{cfg.run_id}: already done", flush=True)
            if sharpness is not None and row.get("status") == "ok":
                measure(cfg, sharpness, trained)
        return 0
    except ClaimHeld as e:  # someone else trains it: not a failure of the run
        print(f"{cfg.run_id}: {e}", flush=True)
        return 0
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"{cfg.run_id}: interrupted ({e}); the checkpoint stays", flush=True)
        return 130
    except Exception as e:  # noqa: BLE001 - any failure becomes the run's record
        text = traceback.format_exc()
        print(text, file=sys.stderr, flush=True)
        if D.is_main():
            record_failure(cfg, e, text)
        return 1
    finally:
        D.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
