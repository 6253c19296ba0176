"""The sweep loop: pull planned runs, claim each, re-check it against the results, train it in a fresh
process, release it. Any number of sweepers (processes, nodes) may run the same plan at once.

A sweeper passes over the plan until nothing is left that it may run: runs done (an `ok`/`diverged`
record), runs that failed since it started (the next sweep retries them), runs it already tried, and runs
a live process holds. While others still hold runs it waits and passes again, so a run whose owner dies
is taken over and resumed from its checkpoint. With `force`, a record counts as done only when it was
written after the sweeper started.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from bench.config import RunConfig
from bench.errors import UserError
from bench.registry import get_task
from bench.store.claims import ENV, HEARTBEAT_EVERY, STALE_AFTER, Claims, Heartbeat
from bench.store.files import atomic_write
from bench.store.records import FINISHED, read_record, run_folder, sync_csvs
from bench.sweep import forked
from bench.tables.layout import load_tables
from bench.tables.plan import TablePlan, plan
from bench.train.control import handling_sigint
from bench.train.runner import completed_run_ids, record_failure


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep runs, as plain values (picklable: local workers and SLURM tasks rebuild from it)."""
    tables: tuple[str, ...]
    preset: str
    results_dir: str
    seeds: int | None = None
    data_dir: str = "data"
    device: str = "auto"
    workers: int = 2                      # data-loader workers of each run
    force: bool = False
    download: bool = False
    world_size: int = 1                   # GPUs (processes) per run
    log: str = "none"                     # every run's --log
    checkpoint_every: int = 1             # every run's --checkpoint-every
    deterministic: bool = False           # every run's --deterministic
    poll: float = 10.0
    stale_after: float = STALE_AFTER
    heartbeat_every: float = HEARTBEAT_EVERY

    def plans(self) -> list[TablePlan]:
        from bench.registry import tables_file
        return plan(load_tables(tables_file()), list(self.tables), self.preset, seeds=self.seeds,
                    results_dir=self.results_dir, data_dir=self.data_dir, device=self.device,
                    workers=self.workers, force=self.force, download=self.download, world_size=self.world_size,
                    log=self.log, checkpoint_every=self.checkpoint_every, deterministic=self.deterministic)

    def sweeper(self, label: str = "") -> "Sweeper":
        prefix = f"[{label}] " if label else ""
        return Sweeper(self.plans(), self.results_dir, force=self.force, poll=self.poll,
                       stale_after=self.stale_after, heartbeat_every=self.heartbeat_every,
                       say=lambda msg: print(prefix + msg, flush=True))


def record_time(record: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(record["timestamp"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return 0.0


@dataclass
class Sweeper:
    plans: list[TablePlan]
    results_dir: str
    force: bool = False
    poll: float = 10.0                      # seconds between passes while other processes hold runs
    stale_after: float = STALE_AFTER
    heartbeat_every: float = HEARTBEAT_EVERY
    say: Callable[[str], None] = print
    started: float = field(default_factory=lambda: float(int(time.time())))  # records have whole seconds
    stopping: bool = False

    def __post_init__(self):
        self.claims = Claims(self.results_dir, self.stale_after)
        self.done_before = set() if self.force else completed_run_ids(self.results_dir)
        self.tried: set[str] = set()

    def state(self, cfg: RunConfig, tp: TablePlan | None = None) -> str:
        """done | failed (since this sweeper started) | tried (by this sweeper) | todo. A trained run of a
        table that measures sharpness is done once sharpness.csv has its measures."""
        record = read_record(self.results_dir, cfg.run_id)
        fresh = record is not None and record_time(record) >= self.started
        if record is not None and record.get("status") in FINISHED and (fresh or not self.force):
            measured = tp is None or record.get("status") != "ok" or not tp.unmeasured(cfg)
            return "done" if measured else "tried" if cfg.run_id in self.tried else "todo"
        if record is None and cfg.run_id in self.done_before:
            return "done"  # a row from a CSV written before records existed
        if record is not None and record.get("status") == "failed" and fresh:
            return "failed"
        return "tried" if cfg.run_id in self.tried else "todo"

    def run(self) -> Counter:
        """Sweep until nothing is left to do; counts by outcome."""
        counts: Counter = Counter()
        sync_csvs(self.results_dir)  # a CSV a crash left one run behind is whole again before we start
        runs = [(tp, c) for tp in self.plans for c in tp.runs]
        counts["skipped"] = sum(self.state(c, tp) == "done" for tp, c in runs)
        announced: set[str] = set()
        with _sigint_stops(self):
            while not self.stopping:
                waiting = []
                for tp, cfg in runs:
                    if self.stopping:
                        break
                    if self.state(cfg, tp) != "todo":
                        continue
                    outcome = self.attempt(tp, cfg)
                    if outcome == "held":
                        waiting.append((tp, cfg))
                    elif outcome:
                        counts[outcome] += 1
                # a pass that trained runs took a while: count only the runs still held by others now
                waiting = [c.run_id for tp, c in waiting if self.state(c, tp) == "todo"]
                if not waiting:
                    break
                new = sorted(set(waiting) - announced)
                if new:
                    self.say(f"waiting for {len(waiting)} run(s) other processes hold (--status shows where)")
                    announced.update(new)
                time.sleep(self.poll)
        return counts

    def attempt(self, tp: TablePlan, cfg: RunConfig) -> str:
        """Claim and run one run: its outcome, 'held' (a live process has it) or '' (nothing to do)."""
        try:
            claim, found, why = self.claims.acquire(cfg.run_id)
        except UserError as e:  # a corrupt claim file: leave the run alone, say what to do
            self.say(f"skipping {cfg.run_id}: {e}")
            self.tried.add(cfg.run_id)
            return "blocked"
        if claim is None:
            return "held"
        try:
            if self.state(cfg, tp) != "todo":  # finished by someone else between our look and our claim
                return ""
            self.tried.add(cfg.run_id)
            if found is not None:
                self.say(f"taking over {cfg.run_id} from {found.where()} ({why}); it resumes from its checkpoint")
            if tp.synthetic:
                ensure_fake_data(cfg, tp.synthetic)
            self.say(f"start {cfg.run_id} ({cfg.model} {cfg.minimizer} rho={cfg.rho} noise={cfg.noise} "
                     f"seed={cfg.seed})")
            row = self.run_child(cfg, claim, tp.sharpness)
            shown = "".join(f" {k} {float(row[k]):.2f}" for k in ("max_test_acc", "max_test_top5", "max_valid_bleu",
                                                                   "test_bleu") if _is_number(row.get(k)))
            self.say(f"end   {cfg.run_id} -> {row['status']}{shown} {row.get('note') or ''}".rstrip())
            return row["status"]
        finally:
            self.claims.release(claim)

    def run_child(self, cfg: RunConfig, claim, sharpness=None) -> dict[str, Any]:
        """Train `cfg` in a process of its own under our claim (then measure its sharpness, when its table asks);
        its record (a failure one if it left none)."""
        folder = run_folder(self.results_dir, cfg.run_id)
        before = read_record(self.results_dir, cfg.run_id)
        atomic_write(folder / "config.json", json.dumps(asdict(cfg), indent=1) + "\n")
        env = {**os.environ, ENV: f"{cfg.run_id} {claim.token}", "PYTHONUNBUFFERED": "1"}
        argv = [str(folder / "config.json")] + ["--force"] * self.force
        if sharpness is not None:
            atomic_write(folder / "sharpness.json", json.dumps(sharpness.as_dict(), indent=1) + "\n")
            argv += ["--sharpness", str(folder / "sharpness.json")]
        t0 = time.time()
        proc = start(argv, env, folder / "output.log", forked.wanted(cfg))
        with Heartbeat(self.claims, claim, on_lost=proc.terminate, every=self.heartbeat_every):
            rc = _wait(proc)
        record = read_record(self.results_dir, cfg.run_id)
        if rc == 130:
            self.stopping = True
            self.say(f"interrupted {cfg.run_id}: its checkpoint stays; run the same command again to resume")
            return record or {"run_id": cfg.run_id, "status": "interrupted"}
        if record is not None and record_time(record) >= int(t0) and (rc == 0 or record["status"] == "failed"):
            return record
        if record is not None and record == before and record.get("status") in FINISHED:  # trained before
            return record if rc == 0 else {**record, "status": "failed",  # a measurement failed: say, keep the row
                                           "note": f"sharpness not measured (see {folder / 'output.log'})"}
        how = f"was killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
        return record_failure(cfg, f"the run's process {how} without writing a result (an out-of-memory kill "
                                   f"looks like this)", _tail(folder / "output.log"))


def start(argv: list[str], env: dict[str, str], log: Path, fork: bool):
    """`python -m bench.sweep.child ARGV`: forked from the torch-loaded server (bench.sweep.forked) or a fresh
    interpreter, its output appended to `log` either way."""
    if fork:
        return forked.ForkedRun(argv, env, log)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "bench.sweep.child", *argv], stdout=out,
                                stderr=subprocess.STDOUT, env=env, preexec_fn=forked.die_with_parent)


def _wait(proc) -> int:
    """Wait for the child; a Ctrl-C reaches it too (same process group) and it stops at an epoch end."""
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue


def _sigint_stops(sweeper: Sweeper):
    """Ctrl-C: the running child finishes its epoch and checkpoints; the sweeper then starts nothing new."""
    def on_sigint(signum, frame):
        sweeper.stopping = True
    return handling_sigint(on_sigint)


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


def _is_number(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def ensure_fake_data(cfg: RunConfig, options: dict[str, int]) -> None:
    """Write a table's synthetic dataset once, whichever sweeper gets there first."""
    folder = Path(cfg.data_dir)
    folder.parent.mkdir(parents=True, exist_ok=True)
    stamp = folder / f".complete-{'-'.join(f'{k}{v}' for k, v in sorted(options.items()))}"
    with FileLock(str(folder) + ".lock", timeout=600):
        if not stamp.exists():
            get_task(cfg.task).make_fake(str(folder), seed=0, **options)
            stamp.touch()
