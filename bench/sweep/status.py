"""`bench reproduce --status`: per table, what is done, running (where, since when), failed, to do."""
from __future__ import annotations

import time
from pathlib import Path

from bench.errors import UserError
from bench.store.claims import Claims
from bench.store.records import FINISHED, read_record, results_csvs
from bench.tables.plan import TablePlan
from bench.train.runner import completed_run_ids, results_csv_problem


def check_results_folder(results_dir: str | Path, must_exist: bool) -> None:
    """Refuse a path that is not a sambench results folder (nothing is touched)."""
    folder = Path(results_dir)
    if not folder.exists():
        if must_exist:
            raise UserError(f"no results folder {folder}; start a sweep with `bench reproduce` or pass the "
                            "--results-dir it used")
        return
    if not folder.is_dir():
        raise UserError(f"{folder} is a file, not a results folder; pass --results-dir FOLDER")
    if (folder / "runs").exists() and not (folder / "runs").is_dir():
        raise UserError(f"{folder} is not a sambench results folder (its runs is not a folder); pass another "
                        "--results-dir")
    for path in results_csvs(folder):  # not perf.csv (timings) nor sharpness.csv (measures)
        reason = results_csv_problem(path)
        if reason:
            raise UserError(f"{folder} is not a sambench results folder ({path.name}: {reason}); pass another "
                            "--results-dir")


def status_lines(plans: list[TablePlan], results_dir: str | Path, stale_after: float) -> list[str]:
    claims = Claims(results_dir, stale_after)
    legacy = completed_run_ids(results_dir)
    lines: list[str] = []
    totals = dict.fromkeys(("done", "running", "failed", "to do"), 0)
    for tp in plans:
        if tp.skipped:
            lines.append(f"{tp.name}: skipped: {tp.skipped}")
            continue
        detail, counts = [], dict.fromkeys(totals, 0)
        for cfg in tp.runs:
            record, claim = read_record(results_dir, cfg.run_id), claims.read(cfg.run_id)
            status = record.get("status") if record else ("ok" if cfg.run_id in legacy else None)
            if status in FINISHED:
                counts["done"] += 1
            elif claim is not None:
                counts["running"] += 1
                why = claims.stale(claim)
                state = f"STALE ({why}): the next sweeper takes it over" if why else \
                    f"heartbeat {time.time() - claim.heartbeat:.0f} s ago"
                detail.append(f"  running  {cfg.run_id}  on {claim.where()} since {claim.since}; {state}")
            elif status == "failed":
                counts["failed"] += 1
                detail.append(f"  failed   {cfg.run_id}  {(record.get('note') or '').splitlines()[0][:200]}")
            else:
                counts["to do"] += 1
        for k, v in counts.items():
            totals[k] += v
        lines.append(f"{tp.name} ({tp.task}): {len(tp.runs)} runs: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
        lines += detail
    lines.append("total: " + ", ".join(f"{v} {k}" for k, v in totals.items()))
    return lines
