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
    return run_one(RunConfig(**json.loads(Path(argv[0]).read_text())), force="--force" in argv)


def run_one(cfg: RunConfig, force: bool = False) -> int:
    """Train one run of a sweep in this process (and its torchrun peers); the exit status above."""
    from bench.cli import graceful_sigint
    from bench.engine import Interrupted, StopFlag
    from bench.runner import AlreadyDone, execute, record_failure
    from bench.sweep.claims import ClaimHeld

    D.init_from_env(cfg.device)
    stop = StopFlag()
    try:
        with graceful_sigint(stop):
            row = execute(cfg, force=force, stop=stop, log=print)
        print(f"{cfg.run_id}: {row['status']}", flush=True)
        return 0
    except AlreadyDone:
        print(f"{cfg.run_id}: already done", flush=True)
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
