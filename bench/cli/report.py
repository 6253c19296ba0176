"""`bench report` (the markdown tables beside the papers') and `bench show` (a task's rows)."""
from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

import bench
from bench.cli.console import console, user_errors
from bench.cli.run import print_rows
from bench.errors import UserError


def report_cmd(
    results_dir: Annotated[str, typer.Option(help="Folder of the result CSVs.")] = "results",
    out: Annotated[Optional[str], typer.Option(help="Markdown file; default <results-dir>/report.md.")] = None,
    targets: Annotated[Optional[str], typer.Option(help="The papers' published cells; default "
                                                        "results/paper/paper-cells.csv of this checkout.")] = None,
    plot: Annotated[Optional[list[str]], typer.Option(help="TASK:MODEL to plot (repeatable); default: "
                                                           "every group with epoch logs, at most 12.")] = None,
    preset: Annotated[Optional[list[str]], typer.Option(
        help="Whose plan the cells hold (repeatable): full (the papers' recipes, default), smoke, demo. Runs "
             "no plan names are listed apart, never averaged into a cell.")] = None,
):
    """Turn the result CSVs into markdown tables shaped like the papers', our numbers beside theirs.

    A cell averages only the runs `bench reproduce --preset PRESET` plans for it (same settings, any
    seed); every other run is listed under "Other runs" with the settings in which it differs."""
    from pathlib import Path

    from bench.registry import tables_file
    from bench.report.write import write_report
    from bench.tables.layout import load_tables as load_plan_tables
    from bench.tables.plan import planned_settings

    with user_errors():
        if not Path(results_dir).is_dir():
            raise UserError(f"no results folder {results_dir}; run `bench run` or `bench reproduce` first")
        out_path = Path(out) if out else Path(results_dir) / "report.md"
        here = Path(bench.__file__).resolve().parent.parent
        targets_path = Path(targets) if targets else here / "results" / "paper" / "paper-cells.csv"
        if not targets_path.exists():
            raise UserError(f"the papers' cells are not at {targets_path}; pass --targets FILE")
        pairs = None
        if plot:
            bad = [p for p in plot if ":" not in p]
            if bad:
                raise UserError(f"--plot takes TASK:MODEL, got {bad[0]!r}")
            pairs = [tuple(p.split(":", 1)) for p in plot]
        # The plans come from here (they need the task registry); the report itself stays torch-free.
        tables = load_plan_tables(tables_file())
        plans = planned_settings(tables, preset or ["full"])
        full = plans if "full" in (preset or ["full"]) else planned_settings(tables, ["full"])  # the summary's
        text = write_report(results_dir, out_path, targets_path, tables_file(), plans, plots=pairs, full_plans=full)
        console.print(text, highlight=False, markup=False)
        console.print(f"wrote {out_path}", highlight=False)


def show_cmd(
    task: Annotated[str, typer.Argument(help="Task whose results to show.")],
    results_dir: Annotated[str, typer.Option(help="Where <task>.csv lives.")] = "results",
    last: Annotated[int, typer.Option(help="Show the last N rows.")] = 20,
):
    """Print the rows of <results-dir>/<task>.csv."""
    import csv
    from pathlib import Path

    with user_errors():
        path = Path(results_dir) / f"{task}.csv"
        if not path.exists():
            raise UserError(f"no results at {path}; run `bench run {task} ...` first or pass --results-dir")
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))[-last:]
        print_rows([{k: _num(v) for k, v in r.items()} for r in rows])


def _num(v: str) -> Any:
    try:
        return float(v)
    except ValueError:
        return {"True": True, "False": False}.get(v, v)
