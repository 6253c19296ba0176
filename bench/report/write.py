"""`bench report`'s entry: results, paper cells, tables and plans in, report.md and its PNGs out (written whole,
through atomic renames, so a reader never sees half a file)."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from bench.report.compute import cell_views, labels, plot_compute
from bench.report.frontier import plot_frontier
from bench.report.curves import plot_curves, plot_title, save_png
from bench.report.load import load_results, load_targets
from bench.report.render import is_check, render_parts, sections
from bench.report.sharpness import plot_study
from bench.store.files import atomic_write
from bench.tables.cells import Plans, match_plans
from bench.tables.layout import load_tables, models, tasks

MAX_PLOTS = 12


MAX_COMPUTE_PLOTS = 24  # accuracy-vs-compute plots: one per cell


def _plot_groups(results: pd.DataFrame, tables: dict, plots: list | None) -> list[tuple]:
    """(task, model, noise, synthetic) groups of ok runs on real data (synthetic runs are pipeline checks: never
    drawn), the tables' order first, or those of `plots`."""
    ok = results.loc[(results["status"] == "ok") & ~results["synthetic"], ["task", "model", "noise", "synthetic"]]
    groups = list(ok.drop_duplicates().itertuples(index=False, name=None))
    if plots is not None:
        wanted = [tuple(p) for p in plots]
        return sorted((g for g in groups if g[:2] in wanted), key=lambda g: (wanted.index(g[:2]), g[3], g[2]))
    order = [task for t in tables.values() for task in tasks(t)] + [m for t in tables.values() for m in models(t)]
    rank = {name: i for i, name in reversed(list(enumerate(order)))}  # first mention wins
    return sorted(groups, key=lambda g: (rank.get(g[0], len(order)), str(g[0]), rank.get(g[1], len(order)),
                                         str(g[1]), g[3], g[2]))


def write_report(results_dir: str | Path, out_path: str | Path, targets_path: str | Path,
                 tables_path: str | Path, plans: Plans, plots: list | None = None,
                 full_plans: Plans | None = None) -> str:
    """Render the report to `out_path` with its curves as PNGs beside it; returns the markdown. `full_plans`:
    the full preset's plans, which the opening summary counts whatever `plans` the sections show."""
    results = match_plans(load_results(results_dir), plans)
    tables = load_tables(tables_path)
    md, checks = render_parts(results, load_targets(targets_path), tables, plans, source=str(results_dir),
                              full_plans=full_plans)
    out = Path(out_path)
    links, made = [], set()
    for task, model, noise, fake in _plot_groups(results, tables, plots):
        if plots is None and len(made) >= MAX_PLOTS:
            break
        name = f"{out.stem}-{task}-{model}" + (f"-noise{noise:g}" if noise else "")
        name += "-synthetic" if fake else ""
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png"  # a safe file name whatever the task is called
        if plot_curves(results_dir, results, task, model, out.with_name(name), noise=noise, synthetic=fake):
            made.add((task, model, noise, fake))
            what = plot_title(task, model, noise, fake)
            links += [f"### {what}", "", f"![{what}]({name})", ""]
    real = {g[:2] for g in _plot_groups(results, tables, None)}
    fake = set(zip(results.loc[results["synthetic"], "task"], results.loc[results["synthetic"], "model"])) - real
    missing = [f"- {t} / {m}: " + ("synthetic data only (a pipeline check: not drawn)" if (t, m) in fake
                                   else "no epoch logs")
               for t, m in plots or [] if (t, m) not in {g[:2] for g in made}]
    if links or missing:
        md += "\n## Curves\n\n" + "\n".join(links + missing).rstrip() + "\n"
    md += _compute_plots(results_dir, results, tables, plans, out, plots)
    md += _study_plots(results_dir, results, tables, plans, out)
    md += checks  # the pipeline checks close the report, after the plots of real data
    atomic_write(out, md)
    return md


def _study_plots(results_dir: str | Path, results: pd.DataFrame, tables: dict, plans: Plans, out: Path) -> str:
    """The sharpness studies' scatter plots (a measure against the generalization gap), beside the report."""
    links = []
    for t, lay, preset, part, fake, suffix in sections(results, tables, plans):
        if is_check(preset, fake):
            continue

        def write(name: str, fig) -> None:
            file = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{out.stem}-sharpness-{preset}-{name}" + "-synthetic" * fake)
            save_png(fig, out.with_name(file + ".png"))
            links.extend([f"### {lay.name}{suffix}: {name}" + (" — synthetic data" if fake else ""), "",
                          f"![{name}]({file}.png)", ""])
        plot_study(lay, part, results_dir, write)
    head = ["## Sharpness against the generalization gap", ""]
    return "\n" + "\n".join(head + links).rstrip() + "\n" if links else ""


def _cell_png(out: Path, kind: str, table: str, preset: str, view, fake: bool) -> str:
    """The file name of one cell's plot of `kind` (compute, frontier), beside the report."""
    parts = [out.stem, kind, table, preset, view.task, view.row, view.variant, "synthetic" * fake]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(p for p in parts if p)) + ".png"


def _compute_plots(results_dir: str | Path, results: pd.DataFrame, tables: dict, plans: Plans, out: Path,
                   plots: list | None) -> str:
    """Accuracy against compute, one PNG per cell of a table section with compute logs (those of `plots`'
    task/model pairs when given; at most MAX_COMPUTE_PLOTS), beside the report; their markdown links."""
    links, made, left = [], 0, 0
    wanted = None if plots is None else {tuple(p) for p in plots}
    for t, lay, preset, part, fake, suffix in sections(results, tables, plans):
        if is_check(preset, fake):  # pipeline checks: no plots
            continue
        for view in cell_views(t, lay, preset, part, results_dir):
            if wanted is not None and (view.task, view.model) not in wanted:
                continue
            if made >= MAX_COMPUTE_PLOTS:
                left += 1
                continue
            made += 1
            cell = " / ".join(x for x in labels(t, lay, view) if x)
            name, front = (_cell_png(out, kind, lay.name, preset, view, fake) for kind in ("compute", "frontier"))
            plot_compute(view, f"{lay.name}: {cell}" + (" (synthetic data)" if fake else ""),
                         lambda fig: save_png(fig, out.with_name(name)))
            what = f"{lay.name}{suffix}: {cell}" + (" — synthetic data" if fake else "")
            links += [f"### {what}", "", f"![{what}]({name})", ""]
            if plot_frontier(view, f"{lay.name}: {cell}, frontier" + (" (synthetic data)" if fake else ""),
                             lambda fig: save_png(fig, out.with_name(front))):
                links += [f"![{what}: frontier]({front})", ""]
    if left:
        links.append(f"{left} more cell{'s' * (left > 1)} not plotted (at most {MAX_COMPUTE_PLOTS}; "
                     "choose with --plot TASK:MODEL).")
    head = ["## Accuracy vs compute", "", "Mean test accuracy over seeds against cumulative passes (a forward alone "
            "counting 1/3), one line per minimizer; dashed: SGD's total compute. Beside it, the cell's frontier (bench.report."
            "frontier): final accuracy (mean ± sd over seeds) against passes and wall time in all, one point per "
            "minimizer and schedule, the frontier joined.", ""]
    return "\n" + "\n".join(head + links).rstrip() + "\n" if links else ""
