"""What both kinds of `bench perf` timing share: the clock (`Timer`: wall time or CUDA events, and a device
sync), percentiles, perf.csv (rows appended under its lock, with provenance) and the markdown of its rows."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from bench.text import number


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def append_perf_rows(rows: Iterable[dict], results_dir: str | Path) -> Path:
    """Append rows to `<results_dir>/perf.csv` (atomic appends), each with the provenance columns
    (timestamp, device, torch/python/sambench versions, git commit, host); one timestamp per call."""
    from bench.store.files import append_row
    from bench.store.provenance import provenance
    path = Path(results_dir) / "perf.csv"
    rows = list(rows)
    if rows:
        prov = provenance(rows[0]["device_name"])
        for row in rows:
            append_row(path, {**row, **{k: v for k, v in prov.items() if k not in row}})
    return path


def markdown_rows(rows: Sequence[dict], cols: list[tuple[str, str | None]], ratios: tuple[str, ...] = ("ratio_to_sgd",),
                  label: Callable[[dict], str] | None = None) -> list[str]:
    """The lines of a markdown table of perf rows: `cols` are (heading, key); key None is the p10-p90 spread;
    ratios print with 3 digits, items/s as whole numbers, the rest with 2; `label(row)` names the minimizer."""
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for _, key in cols:
            if key is None:
                cells.append(f"{number(r.get('ms_p10'), 2)}–{number(r.get('ms_p90'), 2)}")
            elif key in ratios:
                cells.append(number(r.get(key), 3))
            elif key in ("images_per_s", "items_per_s"):
                cells.append(number(r.get(key), 0))
            elif key == "minimizer" and label is not None:
                cells.append(label(r))
            else:
                cells.append(number(r.get(key), 2))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


class Timer:
    """The clock of a timing: `now()` wall seconds (perf_counter, or the given clock), `sync()` waits for the
    device (CUDA only), and `mark()` / `ms(a, b)` for intervals read after a sync: CUDA events recorded on the
    current stream on a GPU (the host queues work ahead, as in training; the events time the GPU), else
    `now()` readings."""

    def __init__(self, device: torch.device | None = None, clock: Callable[[], float] = time.perf_counter):
        self.device, self.clock = device, clock
        self.cuda = device is not None and device.type == "cuda"

    def now(self) -> float:
        return self.clock()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def mark(self) -> Any:
        if not self.cuda:
            return self.now()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3
