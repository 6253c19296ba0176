"""The accuracy-vs-compute frontier of a table cell: which minimizers and schedules no other beats.

A line of a cell (a minimizer, or a minimizer under a schedule: bench.tables.layout.columns) is a point: its final
test accuracy (mean over seeds, with their standard deviation) against the compute its runs spent in all (mean
total passes; mean total training seconds). A point is on the frontier when no other point of the cell reaches at
least its accuracy at no more compute, one of the two strictly better. Means decide; the spreads are drawn, so a
reader sees where the frontier is within noise. `bench report` names the frontier under passes in every table's
equal-compute view and draws one plot per cell (against passes and against wall time, the frontier joined).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from bench.store.history import final_acc, spent


@dataclass(frozen=True)
class Point:
    label: str
    acc: float          # mean final test accuracy (%)
    acc_sd: float       # its standard deviation over seeds (0 for one)
    passes: float       # mean total passes
    wall: float         # mean training seconds in all, of typical epochs (bench.store.history.epoch_seconds)
    parallel: float     # mean total passes on the critical path of a multi-device run (SAMPa), else = passes
    seeds: int


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def points(view: Any) -> list[Point]:
    """One point per line of a cell view (bench.report.compute.CellView) with a final accuracy and compute counts."""
    out = []
    for line in view.lines:
        logs = [log for log in line.logs if spent(log) and final_acc(log) is not None]
        if not logs:
            continue
        accs = [final_acc(log) for log in logs]
        costs = [spent(log) for log in logs]
        shares = line.parallel_shares or [1.0] * len(logs)
        passes = [c["passes"] for c in costs]
        out.append(Point(line.label, statistics.fmean(accs), _sd(accs), statistics.fmean(passes),
                         statistics.fmean(c["epoch_s"] * c["epochs"] for c in costs),
                         statistics.fmean(p * s for p, s in zip(passes, shares)), len(logs)))
    return out


def on_frontier(pts: list[Point], cost: str = "passes") -> list[Point]:
    """The points no other dominates (at least the accuracy at no more `cost`, one strictly better), by cost."""
    def beaten(p: Point) -> bool:
        return any(getattr(q, cost) <= getattr(p, cost) and q.acc >= p.acc and
                   (getattr(q, cost) < getattr(p, cost) or q.acc > p.acc) for q in pts if q is not p)
    return sorted((p for p in pts if not beaten(p)), key=lambda p: getattr(p, cost))


def plot_frontier(view: Any, title: str, write: Any) -> bool:
    """Final accuracy against total passes and against wall time, one point per line with its spread, the
    frontier joined; `write(fig)` saves it. False (nothing drawn) for a cell with fewer than two points."""
    pts = points(view)
    if len(pts) < 2:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: keeps `bench` startup fast
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4))
    FigureCanvasAgg(fig)
    for i, (cost, xlabel) in enumerate((("passes", "total passes (SGD steps of equal compute)"),
                                        ("wall", "total training time (s, this machine)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for p in pts:
            ax.errorbar(getattr(p, cost), p.acc, yerr=p.acc_sd or None, fmt="o", ms=5, capsize=3,
                        label=f"{p.label} ({p.seeds} seed{'s' * (p.seeds > 1)})")
        front = on_frontier(pts, cost)
        ax.plot([getattr(p, cost) for p in front], [p.acc for p in front], "k--", lw=1, marker="o", ms=12,
                mfc="none", label="frontier (ringed)")
        ax.set(xlabel=xlabel, ylabel="final test accuracy (%)")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize="x-small")
    fig.suptitle(title)
    fig.tight_layout()
    write(fig)
    return True
