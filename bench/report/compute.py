"""`bench report`'s equal-compute view of a table: each minimizer against SGD at the compute SGD spent.

SAM-like minimizers spend about two passes per step where SGD spends one, so a table of final accuracies
flatters them. Per cell of a table (the runs a plan's cell holds, bench.tables.cells; never across cells) and per
minimizer, mean over seeds, each run measured against the SGD run (the table's base optimizer) of the
same cell and seed, from the runs' epoch logs (bench.store.history):
- the test accuracy it had reached with SGD's total compute;
- the compute it took to reach SGD's final test accuracy, in multiples of SGD's total compute;
- what a step and an epoch cost it: passes per step, training seconds per epoch.
Compute is counted in passes: forward+backward passes over a batch, a forward alone counting 1/3 (SGD: 1
per step). In a table that also trains SGD at twice the epochs, that SGD is a line of its own and the
reference is SGD at the table's epochs. A curve per cell (mean test accuracy over seeds against
cumulative passes, one line per minimizer) is drawn by `plot_compute`.

Pure: results rows (matched to the plans) and the epoch logs under the results folder in, text and PNGs out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bench.config import DEFAULTS, OPTIMIZERS
from bench.report.frontier import on_frontier, points
from bench.report.paper import DASH, md_table
from bench.store.history import acc_at_compute, final_acc, run_history, spent, time_to_target
from bench.store.records import canon
from bench.tables.layout import Layout, minimizer_name, tasks

HEADER = ["acc at SGD's compute (%)", "compute to SGD's final acc", "passes/step", "wall s/epoch", "seeds",
          "final acc (%)", "passes in all", "frontier"]
READING = ("Mean over seeds, each run against the SGD run of its seed: its test accuracy at its last epoch within "
           "SGD's total passes, and the passes it took to reach SGD's final test accuracy ÷ SGD's total (`(k of n)`: "
           "only k of the n seeds compared have a figure; –: no SGD run to compare with). A pass is a "
           "forward+backward over a batch, a forward alone counting 1/3; `(k parallel)`: the passes per step on the "
           "critical path when a step's independent passes run on devices of their own (SAMPa). wall s/epoch: the median "
           "of a run's epochs' training seconds (evaluation excluded), mean over seeds; `(a–b)`: the seeds' range, "
           "shown where they differ more than 1.5×, as when the machine was shared. Final accuracy: mean "
           "± standard deviation over seeds. **frontier**: no other line of the cell reaches at least its mean final "
           "accuracy with no more passes in all (one of the two strictly better).")


@dataclass
class Line:
    """One minimizer of one cell: its runs' epoch logs (with compute counts) and each one's SGD reference."""
    label: str
    logs: list[list[dict]] = field(default_factory=list)
    refs: list[list[dict] | None] = field(default_factory=list)
    parallel_shares: list[float] = field(default_factory=list)  # per run: parallel passes / passes spent (SAMPa < 1)


@dataclass
class CellView:
    task: str
    row: str
    variant: str
    model: str
    lines: list[Line]


def base_optimizer(lay: Layout) -> str | None:
    """The table's base optimizer: the reference every other minimizer is measured against."""
    return next((m for m in lay.minimizers if m in OPTIMIZERS), None)


def cell_views(t: dict, lay: Layout, preset: str, runs: pd.DataFrame, folder: str | Path | None) -> list[CellView]:
    """The cells of a table section that have epoch logs with compute counts, in the table's order."""
    if folder is None or runs.empty:
        return []
    ok = runs[runs["status"] == "ok"]
    by_cell: dict[tuple, list[dict]] = {}
    for r in ok.to_dict("records"):
        row, variant, column = r["cells"][(lay.name, preset)]
        by_cell.setdefault((r["task"], row, variant), []).append({**r, "column": column})
    base, views = base_optimizer(lay), []
    for key in ((k, r["label"], v["label"]) for k in lay.tasks for r in lay.rows for v in lay.variants):
        view = _cell_view(t, lay, key, by_cell.get(key, []), base, folder)
        if view is not None:
            views.append(view)
    return views


def _epochs(row: dict) -> int:
    try:
        return int(float(row.get("epochs")))
    except (TypeError, ValueError):  # a CSV older than the column: the run used the default
        return int(DEFAULTS["epochs"])


def _cell_view(t: dict, lay: Layout, key: tuple, runs: list[dict], base: str | None,
               folder: str | Path) -> CellView | None:
    """A cell's lines, or None when none of its runs logged test accuracy with compute counts (a BLEU
    task, a log written before the counts existed)."""
    logs = {r["run_id"]: run_history(folder, r["run_id"]) for r in runs}
    runs = [r for r in runs if spent(logs[r["run_id"]]) is not None and final_acc(logs[r["run_id"]]) is not None]
    if not runs:
        return None
    base_runs = [r for r in runs if r["column"] == base]
    ref_epochs = min((_epochs(r) for r in base_runs), default=None)
    refs = {canon(r["seed"]): logs[r["run_id"]] for r in base_runs if _epochs(r) == ref_epochs}
    lines: dict[tuple, Line] = {}
    for m in lay.minimizers:
        for r in sorted((r for r in runs if r["column"] == m), key=lambda r: (_epochs(r), canon(r["seed"]))):
            extra = m == base and _epochs(r) != ref_epochs  # SGD at twice the epochs: a line of its own
            label = minimizer_name(t, m) + (f" ({_epochs(r)} ep)" if extra else "")
            line = lines.setdefault((m, _epochs(r) if extra else None), Line(label))
            line.logs.append(logs[r["run_id"]])
            line.refs.append(refs.get(canon(r["seed"])))
            line.parallel_shares.append(_share(r))
    return CellView(*key, model=str(runs[0]["model"]), lines=list(lines.values()))


def _share(row: dict) -> float:
    """The run's parallel passes per step over the passes it spent (1 for a row older than the column)."""
    try:
        share = float(row["parallel_passes_per_step"]) / float(row["passes_per_step"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 1.0
    return 1.0 if math.isnan(share) else share


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _of(k: int, n: int) -> str:
    return f" ({k} of {n})" if k < n else ""


def line_cells(line: Line) -> list[str]:
    """The view's figures of one line: accuracy at SGD's compute, compute to SGD's final accuracy,
    passes per step, seconds per epoch, seeds."""
    costs = [spent(log) for log in line.logs]
    pairs = [(log, ref, spent(ref)) for log, ref in zip(line.logs, line.refs) if ref and spent(ref)]
    accs = [a for a in (acc_at_compute(log, total["passes"]) for log, _, total in pairs) if a is not None]
    ratios = []
    for log, ref, total in pairs:
        passes = time_to_target(log, final_acc(ref))["target_passes"]
        if passes is not None:
            ratios.append(passes / total["passes"])
    acc = f"{_mean(accs):.2f}{_of(len(accs), len(pairs))}" if accs else DASH
    ratio = (f"{_mean(ratios):.2f}×{_of(len(ratios), len(pairs))}" if ratios
             else "not reached" if pairs else DASH)
    walls = [c["epoch_s"] for c in costs]
    wall = _mean(walls)
    per_step = _mean([c["passes"] / c["steps"] for c in costs])
    share = _mean(line.parallel_shares) if line.parallel_shares else 1.0
    passes = f"{per_step:.2f}" + (f" ({per_step * share:.2f} parallel)" if abs(share - 1) > 1e-9 else "")
    return [acc, ratio, passes, _seconds(wall) + _spread(walls), str(len(costs))]


def _seconds(s: float) -> str:
    return DASH if s != s else f"{s:.2f}" if s < 10 else f"{s:.1f}"


def _spread(walls: list[float]) -> str:
    """The seeds' range where their epochs took more than 1.5 times as long as each other's: the machine was
    shared while some of them ran (or they ran on different machines), and the mean says little."""
    ok = [w for w in walls if w == w and w > 0]
    return f" ({_seconds(min(ok))}–{_seconds(max(ok))})" if len(ok) > 1 and max(ok) > 1.5 * min(ok) else ""


def frontier_cells(view: CellView) -> dict[str, list[str]]:
    """Per line label: its final accuracy (mean ± sd), its passes in all, and whether it is on the frontier."""
    pts = points(view)
    front = {p.label for p in on_frontier(pts)}
    return {p.label: [f"{p.acc:.2f} ± {p.acc_sd:.2f}" if p.seeds > 1 else f"{p.acc:.2f}", f"{p.passes:,.0f}",
                      "yes" if p.label in front else ""] for p in pts}


def labels(t: dict, lay: Layout, view: CellView) -> list[str]:
    """A cell's coordinates as the view's first columns print them: dataset, row, variant (where shown)."""
    return ([t.get("datasets", {}).get(view.task, view.task)] if len(tasks(t)) > 1 else []) + [view.row] + (
        [view.variant] if lay.variant_column else [])


def compute_view(t: dict, lay: Layout, preset: str, runs: pd.DataFrame, folder: str | Path | None) -> list[str]:
    """The markdown of a table section's equal-compute view; nothing when no run has a log to count."""
    views = cell_views(t, lay, preset, runs, folder)
    if not views:
        return []
    header = (["dataset"] if len(tasks(t)) > 1 else []) + [t.get("row_axis", "model")] + (
        [t.get("variant_axis", "variant")] if lay.variant_column else []) + ["minimizer", *HEADER]
    body = []
    for v in views:
        front = frontier_cells(v)
        body += [labels(t, lay, v) + [line.label, *line_cells(line), *front.get(line.label, [DASH, DASH, ""])]
                 for line in v.lines]
    return ["### Equal compute", ""] + md_table(header, body) + [READING, ""]


def curves(view: CellView) -> dict[str, tuple[list[float], list[float], int]]:
    """Per line: the mean cumulative passes and mean test accuracy of each epoch over its seeds, and the
    seeds. Epochs some seed lacks (a run stopped early) are averaged over the seeds that have them."""
    out = {}
    for line in view.lines:
        frames = [pd.DataFrame(log).set_index("epoch")[["passes", "test_acc"]] for log in line.logs]
        mean = pd.concat(frames).groupby(level=0).mean().dropna()
        out[line.label] = (list(mean["passes"]), list(mean["test_acc"]), len(frames))
    return out


def plot_compute(view: CellView, title: str, write: Any) -> None:
    """Accuracy against compute of one cell: `write(fig)` saves the figure (atomically, bench.report)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: keeps `bench` startup fast
    from matplotlib.figure import Figure  # no pyplot: no global state, always the Agg canvas

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (x, y, n) in curves(view).items():
        ax.plot(x, y, marker="o", ms=3, label=f"{label} ({n} run{'s' * (n > 1)})")
    refs = {id(ref): ref for line in view.lines for ref in line.refs if ref}.values()
    if refs:
        ax.axvline(_mean([spent(ref)["passes"] for ref in refs]), color="grey", ls="--", lw=1,
                   label="SGD's total compute")
    ax.set(xlabel="cumulative passes (SGD steps of equal compute)", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    write(fig)
