"""Files a results folder holds, written so that many processes and a crash at any instant never leave half of
one: an exclusive lock per file (`locked`), whole-file writes through a temporary file and an atomic rename
(`atomic_write`, `atomic_replace`), CSV appends under the lock (`append_row`), whole small CSVs (`write_csv`).
No torch: the report reads results through this."""
from __future__ import annotations

import contextlib
import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from filelock import FileLock


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `<path>.lock` (the same filelock the run claims use; it dies with its process)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def csv_text(header: list[str], rows: Iterable[dict[str, Any]], with_header: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, extrasaction="raise", lineterminator="\n")
    if with_header:
        writer.writeheader()
    for row in rows:
        writer.writerow({k: cell(row.get(k)) for k in header})
    return buf.getvalue()


def cell(value: Any) -> Any:
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
            atomic_write(path, csv_text(list(row), [row], with_header=True))
            return
        new = [k for k in row if k not in header]
        if new:  # widen the file: rewrite it whole with the union of columns
            with open(path, newline="") as f:
                old = list(csv.DictReader(f))
            header = header + new
            atomic_write(path, csv_text(header, [*old, row], with_header=True))
            return
        line = csv_text(header, [row], with_header=False).encode()
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
    atomic_write(Path(path), csv_text(header, rows, with_header=True))


def csv_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []
