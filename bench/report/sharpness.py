"""`bench report`'s view of a sharpness study (a table with `sharpness = {...}`, e.g. asam-correlation):
Kendall's rank correlation between each sharpness measure and the generalization gap over the table's
planned runs, the paper's figure beside ours where it is known, and a scatter plot per measure.

The gap is `gap_acc` of sharpness.csv: training accuracy minus test accuracy (points) on the protocol's
fixed examples, measured with the weights the measure saw. Pure: the section's runs (matched to the plan)
and <results>/sharpness.csv in, text and PNGs out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pandas as pd

from bench.report.paper import DASH, MARKS, NOTES, md_table
from bench.report.stats import kendall_tau
from bench.tables.layout import Layout, tasks

GAP = "gap_acc"
PAPER_METRIC = "kendall_tau"  # paper-cells.csv: the paper's tau of a measure (its `minimizer` column names it)


def study_rows(runs: pd.DataFrame, folder: str | Path | None) -> pd.DataFrame:
    """sharpness.csv's rows of the section's ok runs (empty when there are none)."""
    path = Path(folder or ".") / "sharpness.csv"
    if folder is None or not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=["run_id", "measure", "rho", "value", GAP])
    df = pd.read_csv(path, dtype={"run_id": str, "measure": str})
    ok = set(runs.loc[runs["status"] == "ok", "run_id"])
    df = df[df["run_id"].isin(ok)].copy()
    df["rho"] = pd.to_numeric(df["rho"], errors="coerce")
    return df


def correlations(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Per (task, measure, rho): runs measured, Kendall's tau-b of the measure against the gap."""
    out = []
    if df.empty:
        return out
    keys = df[["task", "measure", "rho"]].drop_duplicates().itertuples(index=False) if "task" in df else []
    for task, measure, rho in keys:
        part = df[(df["task"] == task) & (df["measure"] == measure)
                  & ((df["rho"] == rho) | (df["rho"].isna() & pd.isna(rho)))]
        value, gap = pd.to_numeric(part["value"], errors="coerce"), pd.to_numeric(part[GAP], errors="coerce")
        keep = value.notna() & gap.notna()
        out.append({"task": task, "measure": measure, "rho": rho, "n": int(keep.sum()),
                    "tau": kendall_tau(list(value[keep]), list(gap[keep])),
                    "x": list(value[keep]), "y": list(gap[keep])})
    return out


def _paper(t: dict, figs: dict, task: str, measure: str) -> tuple[str, str]:
    dataset = t.get("datasets", {}).get(task, task)
    fig = figs.get((str(t.get("paper", "")), str(t.get("table", "")), dataset, "", "", measure, PAPER_METRIC))
    if fig is None:
        return "n/a", ""
    mark = MARKS.get(fig["confidence"], "")
    return fig["mean"] + (f" {mark}" if mark else ""), mark


def study_section(t: dict, lay: Layout, runs: pd.DataFrame, folder: str | Path | None, figs: dict,
                  with_paper: bool) -> list[str]:
    """The correlation table of a sharpness study's section (nothing for a table without one)."""
    if lay.sharpness is None:
        return []
    rows, marks = [], set()
    for c in correlations(study_rows(runs, folder)):
        cells = [t.get("datasets", {}).get(c["task"], c["task"]) if len(tasks(t)) > 1 else None, c["measure"],
                 DASH if pd.isna(c["rho"]) else f"{c['rho']:g}", str(c["n"]),
                 DASH if pd.isna(c["tau"]) else f"{c['tau']:.3f}"]
        if with_paper:
            text, mark = _paper(t, figs, c["task"], c["measure"])
            marks.add(mark)
            cells.append(text)
        rows.append([x for x in cells if x is not None])
    head = (["dataset"] if len(tasks(t)) > 1 else []) + ["measure", "rho", "runs", "Kendall τ (ours)"]
    head += ["τ (paper)"] if with_paper else []
    out = ["### Sharpness and the generalization gap", ""]
    if not rows:
        return out + ["No sharpness measured yet for these runs (`bench reproduce` measures each run after "
                      "training it; `bench sharpness RUN_ID` measures one).", ""]
    out += md_table(head, rows)
    out += [f"Kendall's tau-b over the runs of the grid between each measure and the generalization gap (training "
            f"minus test accuracy on the protocol's examples; {_protocol(lay.sharpness)}). Higher: the measure "
            "orders the runs as their gaps do.", ""]
    return out + [line for m, note in NOTES.items() if m and m in marks for line in (note, "")]


def _protocol(spec: dict[str, Any]) -> str:
    keys = ("examples", "m", "iters", "eta", "seed")
    return ", ".join(f"{k} {spec[k]}" for k in keys if k in spec) or "the default protocol"


def plot_study(lay: Layout, runs: pd.DataFrame, folder: str | Path | None,
               write: Callable[[str, Any], None]) -> list[str]:
    """A scatter plot per (task, measure, rho): measure against gap, tau in the title. `write(name, fig)`
    saves a figure; returns the names written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = []
    for c in correlations(study_rows(runs, folder)):
        if c["n"] < 2:
            continue
        fig, ax = plt.subplots(figsize=(4.2, 3.4))
        ax.scatter(c["x"], c["y"], s=18)
        rho = "" if pd.isna(c["rho"]) else f", rho {c['rho']:g}"
        ax.set_title(f"{c['task']}: {c['measure']}{rho} (τ = {c['tau']:.2f}, {c['n']} runs)", fontsize=9)
        ax.set_xlabel(c["measure"])
        ax.set_ylabel("generalization gap (acc. points)")
        fig.tight_layout()
        name = f"{lay.name}-{c['task']}-{c['measure']}" + (f"-rho{c['rho']:g}" if rho else "")
        write(name, fig)
        plt.close(fig)
        names.append(name)
    return names
