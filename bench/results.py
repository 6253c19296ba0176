"""RunConfig + metrics -> one record per run id; `<task>.csv` derived from the records; provenance.

The store: `runs/<run_id>/result.json` is the one record of a run, written whole through a temporary file
and an atomic rename, so it is the old record or the new one, never half of either, and a run id can hold
only one. `<results-dir>/<task>.csv` (the file users read) is rebuilt from the records after each write,
under an exclusive lock on `<file>.lock`, again atomically: at every instant it holds at most one row per
run id, also after a crash between any two steps (a crash before the rebuild leaves the CSV one run behind;
the next write or `bench reproduce` repairs it). Rows of a CSV written before records existed are kept
(the last row of a run id wins) until a record of the same run id replaces them.

`append_row` remains for logs that are not runs (perf.csv): appends under the same lock.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import socket
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from filelock import FileLock

import bench


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `<path>.lock` (the same filelock the run claims use; it dies with its process)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def _csv_text(header: list[str], rows: Iterable[dict[str, Any]], with_header: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, extrasaction="raise", lineterminator="\n")
    if with_header:
        writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in header})
    return buf.getvalue()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return value


def read_header(path: Path) -> list[str]:
    if not path.exists() or path.stat().st_size == 0:
        return []
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def atomic_write(path: Path, text: str) -> None:
    """Write a whole text file through a temporary file in the same folder and an atomic rename."""
    atomic_replace(path, lambda f: f.write(text.encode()))


def atomic_replace(path: Path, write) -> None:
    """Call `write(binary_file)` on a temporary file beside `path`, fsync it, and rename it over `path`:
    a crash at any point leaves the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def append_row(path: Path | str, row: dict[str, Any]) -> None:
    """Append one row to a results CSV, safe against concurrent appenders and crashes."""
    path = Path(path)
    with locked(path):
        header = read_header(path)
        if not header:
            atomic_write(path, _csv_text(list(row), [row], with_header=True))
            return
        new = [k for k in row if k not in header]
        if new:  # widen the file: rewrite it whole with the union of columns
            with open(path, newline="") as f:
                old = list(csv.DictReader(f))
            header = header + new
            atomic_write(path, _csv_text(header, [*old, row], with_header=True))
            return
        line = _csv_text(header, [row], with_header=False).encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line)  # one write() of one whole line
            os.fsync(fd)
        finally:
            os.close(fd)


def write_csv(path: Path | str, rows: list[dict[str, Any]]) -> None:
    """Write a whole small CSV (e.g. a run's per-epoch log) atomically."""
    header: list[str] = []
    for row in rows:
        header += [k for k in row if k not in header]
    atomic_write(Path(path), _csv_text(header, rows, with_header=True))


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


def _csv_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def rebuild_csv(results_dir: Path | str, task: str) -> Path:
    """`<task>.csv` = its older rows without a record (last one per run id) + the task's records."""
    path = Path(results_dir) / f"{task}.csv"
    with locked(path):
        rows: dict[str, dict[str, Any]] = {r["run_id"]: r for r in _csv_rows(path) if r.get("run_id")}
        rows.update({r["run_id"]: r for r in records(results_dir, task)})
        header = read_header(path)  # keep the column order users know; new columns go to the end
        for row in rows.values():
            header += [k for k in row if k not in header]
        atomic_write(path, _csv_text(header, rows.values(), with_header=True))
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
        rows.update({r["run_id"]: r for r in _csv_rows(path) if r.get("run_id")})
    for record in records(results_dir):
        rows[record["run_id"]] = {k: "" if v is None else str(_cell(v)) for k, v in record.items()}
    yield from rows.values()


def git_commit() -> str:
    """The commit of the sambench checkout, with '+dirty' when tracked files differ from it."""
    root = Path(bench.__file__).resolve().parent.parent
    try:
        proc = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=5)
        sha = proc.stdout.strip()
        if proc.returncode != 0 or not sha:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=root, capture_output=True,
                               timeout=5).returncode != 0
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(device_name: str) -> dict[str, Any]:
    """Everything besides the config needed to re-run or trust a row."""
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device_name": device_name,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "sambench_version": bench.__version__,
        "git_commit": git_commit(),
        "hostname": socket.gethostname(),
    }
