"""RunConfig + metrics -> one record per run id; `<task>.csv` derived from the records.

The store: `runs/<run_id>/result.json` is the one record of a run, written whole through a temporary file
and an atomic rename, so it is the old record or the new one, never half of either, and a run id can hold
only one. `<results-dir>/<task>.csv` (the file users read) is rebuilt from the records after each write,
under an exclusive lock on `<file>.lock`, again atomically: at every instant it holds at most one row per
run id, also after a crash between any two steps (a crash before the rebuild leaves the CSV one run behind;
the next write or `bench reproduce` repairs it). Rows of a CSV written before records existed are kept
(the last row of a run id wins) until a record of the same run id replaces them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from bench.store.files import atomic_write, cell, csv_rows, csv_text, locked, read_header

RECORD = "result.json"
NOT_RUNS = ("perf.csv", "sharpness.csv")  # CSVs of a results folder that hold timings and measures, not runs


def results_csvs(results_dir: Path | str) -> list[Path]:
    """The `<task>.csv` files of a results folder (not perf.csv, not sharpness.csv, not subfolders)."""
    return [p for p in sorted(Path(results_dir).glob("*.csv")) if p.name not in NOT_RUNS and p.is_file()]
FINISHED = ("ok", "diverged")  # a run with a record of this status is done; `failed` runs are run again


def run_folder(results_dir: Path | str, run_id: str) -> Path:
    return Path(results_dir) / "runs" / run_id


def read_record(results_dir: Path | str, run_id: str) -> dict[str, Any] | None:
    """The record of a run id, or None. An unreadable record (damaged by hand) counts as none."""
    try:
        with open(run_folder(results_dir, run_id) / RECORD) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def records(results_dir: Path | str, task: str | None = None) -> Iterator[dict[str, Any]]:
    """Every run record of a results folder (of one task), in run-id order."""
    for path in sorted((Path(results_dir) / "runs").glob(f"*/{RECORD}")):
        record = read_record(results_dir, path.parent.name)
        if record is not None and (task is None or record.get("task") == task):
            yield record


def write_record(results_dir: Path | str, row: dict[str, Any]) -> None:
    """Make `row` the one record of its run id (replacing any earlier one), then rebuild its task's CSV."""
    text = json.dumps(row, default=str, indent=1) + "\n"  # NaN and inf are kept (json writes NaN, Infinity)
    atomic_write(run_folder(results_dir, row["run_id"]) / RECORD, text)
    rebuild_csv(results_dir, row["task"])


def rebuild_csv(results_dir: Path | str, task: str) -> Path:
    """`<task>.csv` = its older rows without a record (last one per run id) + the task's records."""
    path = Path(results_dir) / f"{task}.csv"
    with locked(path):
        rows: dict[str, dict[str, Any]] = {r["run_id"]: r for r in csv_rows(path) if r.get("run_id")}
        rows.update({r["run_id"]: r for r in records(results_dir, task)})
        header = read_header(path)  # keep the column order users know; new columns go to the end
        for row in rows.values():
            header += [k for k in row if k not in header]
        atomic_write(path, csv_text(header, rows.values(), with_header=True))
    return path


def sync_csvs(results_dir: Path | str) -> None:
    """Rebuild every task CSV that has records (repairs a CSV a crash left one run behind)."""
    for task in sorted({r.get("task") for r in records(results_dir)} - {None}):
        rebuild_csv(results_dir, task)


def result_rows(results_dir: Path | str) -> Iterator[dict[str, str]]:
    """One row per run id of a results folder: its record where it has one, else its last CSV row. Values
    are text, as a CSV reader gives them. A file that cannot be read as CSV is skipped here (`bench
    report` is where such a file gets named)."""
    rows: dict[str, dict[str, str]] = {}
    for path in results_csvs(results_dir):
        rows.update({r["run_id"]: r for r in csv_rows(path) if r.get("run_id")})
    for record in records(results_dir):
        rows[record["run_id"]] = {k: "" if v is None else str(cell(v)) for k, v in record.items()}
    yield from rows.values()


def canon(value: Any) -> Any:
    """One spelling per value, whether it comes from a RunConfig or a CSV cell read back as text or as a
    pandas-guessed number: "0.1" == 0.1, "200" == 200.0 == 200, "True" == True. Numbers compare at 12
    significant digits (a float printed and read back is the same setting). A mapping (mopts) and the JSON
    text a CSV cell holds of it get one sorted JSON spelling of such values: {"a": 0.1} == '{"a": 0.10}'."""
    value = value.item() if hasattr(value, "item") else value  # numpy scalars -> Python
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return f"{float(value):.12g}"
    if isinstance(value, (dict, list, tuple)):  # a plan's mopts: the JSON text a row holds, spelled alike
        return json.dumps(_canon_json(value), sort_keys=True)
    text = str(value).strip()
    if text.startswith(("{", "[")):
        try:
            return json.dumps(_canon_json(json.loads(text)), sort_keys=True)
        except ValueError:
            return text
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return f"{float(text):.12g}"
    except ValueError:
        return text


def _canon_json(value: Any) -> Any:
    """A mapping's (or list's) values in canon's spelling, all the way down."""
    if isinstance(value, dict):
        return {str(k): _canon_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canon_json(v) for v in value]
    return canon(value)
