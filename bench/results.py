"""RunConfig + metrics -> one CSV row, appended atomically; per-epoch logs; provenance of a run.

Appends take an exclusive lock on `<file>.lock`, so concurrent runs (several processes, a sweep on a
shared disk) never interleave or lose rows. A row with columns the file lacks (a newer sambench added a
setting) rewrites the file under the lock with the union header, through a temporary file and an atomic
rename: a reader sees the old file or the new one, never half of either.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import platform
import socket
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: appends are then only atomic per write()
    fcntl = None

import torch

import bench


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "a") as lock:
        if fcntl:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl:
                fcntl.flock(lock, fcntl.LOCK_UN)


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


def result_rows(results_dir: Path | str) -> Iterator[dict[str, str]]:
    """Every row of every CSV directly in a results folder; a file that cannot be read as CSV is skipped
    here (`bench report` is where such a file gets named)."""
    for path in sorted(Path(results_dir).glob("*.csv")):
        try:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, csv.Error, UnicodeDecodeError):
            continue
        yield from rows


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
