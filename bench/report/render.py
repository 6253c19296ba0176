"""`bench report`: result CSVs + the papers' figures -> markdown shaped like the papers' tables, plus curves.

A pure function of files and plain data: it reads `<results>/*.csv`, the papers' published cells
(results/paper/paper-cells.csv) and tasks/tables.toml, is handed the plans (per table and preset, the
settings of every run `bench reproduce` would run, with its cell: `bench.tables.plan.planned_settings`), and
writes markdown and PNGs. It trains nothing and imports no torch and no task, so it runs anywhere the CSVs are.

Like beside like, because a reader takes a cell for "this recipe, over seeds":
- A paper cell averages only the runs its table's plan names: the same settings (`RunConfig.identity()`)
  as a planned run, any seed. A run that differs in anything that changes what is computed (epochs, lr,
  rho, batch size, precision, world size, ...) is another experiment and never enters a cell. Where and
  how fast a run went (device, workers, loader, compile, ...) is not a setting and separates nothing.
- A table shows the plans of every given preset it has, one section per preset when it has several. The
  papers' figures and the difference to them stand only beside cells of the `full` preset (the papers'
  recipes) of a paper with published cells; a smoke or demo cell, or a table of no paper (variants), has
  nothing to be compared with.
- The report opens with what reproduced (bench.report.summary): per paper table, how many of its published
  cells have full-recipe runs on real data and how many of those agree with the paper, then those cells.
- Real data first: the pipeline checks (the smoke preset's sections, every section on synthetic data, other
  runs on synthetic data) close the report under one heading, ours alone: no paper figures, no
  equal-compute view, no study, no plots.
- Every section of real data ends with its equal-compute view (bench.report.compute): per cell, each minimizer
  against the SGD run of its seed at SGD's compute, from the epoch logs; a PNG per cell beside the report.
- Every other run is still shown, under "Other runs": one line per exact setting (its seeds averaged),
  saying in which settings it differs from the planned run of the same task/model/minimizer/noise, else
  from the closest planned run of its task (fewest differing settings). Runs of tasks no plan covers are
  listed there too, by the settings that vary among them. Failed runs are listed apart, never averaged.
- A setting missing from an older CSV (a column added since) takes RunConfig's default, the value that
  run used unless that default has changed since.
- Synthetic-data runs are a pipeline check: never averaged with real-data runs nor set beside the paper's
  figures.
- Curves draw one line per exact setting too: seeds averaged, different settings never; runs on synthetic data
  are never drawn.

Each paper's table prints our cells as that paper printed its own (accuracy ± std for ASAM, error ± 95 %
confidence interval for SAM) and the published figures as the CSV spells them: bench.report.paper.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import pandas as pd

from bench.report.compute import compute_view
from bench.report.curves import ORDER
from bench.report.load import normalise
from bench.report.paper import DASH, PAPER_PRESET, figures, md_table, ours, table_section
from bench.report.sharpness import study_section
from bench.report.summary import summary_section
from bench.tables.cells import Plans, match_plans, pct, presets
from bench.tables.layout import layout, metrics, models, tasks

SMOKE = "smoke"  # the preset of pipeline checks: CPU-sized stand-ins on synthetic data
CHECKS = "## Pipeline checks on synthetic data: their numbers say nothing about the papers"
CHECKS_NOTE = ("The smoke preset's runs (CPU-sized stand-in models, an epoch or two, on generated data) and every "
               "run on synthetic data: they check that a table's runs go through the whole pipeline, nothing more. "
               "Ours alone, only the cells that ran: no paper figures, no equal-compute view, no plots.")


def _failed_section(results: pd.DataFrame) -> list[str]:
    failed = results[results["status"] == "failed"]
    cols = ["run_id", "task", "model", "minimizer", "seed", "note"]
    # Seeds come back as floats when the column has gaps: print 3, not 3.0.
    body = [["" if pd.isna(v) else str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
             for v in (r.get(c) for c in cols)] for r in failed.to_dict("records")]
    return ["## Failed runs", ""] + md_table(cols, body) if body else []


def render_report(results: pd.DataFrame, targets: pd.DataFrame, tables: dict, plans: Plans,
                  source: str | None = None) -> str:
    """The report as markdown. `plans`: table -> preset -> settings of each planned run (see the module
    docstring). `source` names the results folder (default: the one load_results read)."""
    main, checks = render_parts(results, targets, tables, plans, source)
    return main + checks


def render_parts(results: pd.DataFrame, targets: pd.DataFrame, tables: dict, plans: Plans,
                 source: str | None = None, full_plans: Plans | None = None) -> tuple[str, str]:
    """The report in two parts: what it says about the papers (what reproduced, then the real-data sections,
    other and failed runs), and the pipeline checks that close it ("" when there are none); `bench report`
    puts its plots between the two. `full_plans`: the full preset's plans, for the opening summary whatever
    presets the sections show (default: `plans`)."""
    source = source or results.attrs.get("results_dir", "?")
    plans = {name: p for name, p in plans.items() if name in tables}  # a cell needs its table to be shown
    results = match_plans(normalise(results), plans)
    folder = results.attrs.get("results_dir")
    counts = results["status"].value_counts()
    order = sorted(counts.index, key=lambda s: (["ok", "diverged", "failed", s].index(s), s))
    status = ", ".join(f"{counts[s]} {s}" for s in order)
    out = ["# sambench report", "", f"{len(results)} runs read from `{source}`"
           + (f" ({status})." if status else "."), ""]
    others = results[~results["planned"] & (results["status"] != "failed")]
    out += [f"A cell holds only the runs its table plans for preset {_names(presets(plans))} "
            "(the same settings, any seed)" + (f"; the {len(others)} other run{'s' * (len(others) > 1)} "
                                               f"{'are' if len(others) > 1 else 'is'} under Other runs."
                                               if len(others) else "."), ""]
    figs = figures(targets)
    summary_runs = results if full_plans is None else match_plans(results, {
        name: p for name, p in full_plans.items() if name in tables})
    out += summary_section(summary_runs, tables, plans if full_plans is None else full_plans, figs, folder)
    checks = []
    for t, lay, preset, part, fake, suffix in sections(results, tables, plans):
        if is_check(preset, fake):  # ours alone, at the end: no paper, no equal-compute view, no study
            checks += table_section(t, lay, part, figs, synthetic=fake, preset=preset, suffix=suffix, level=3)
            continue
        out += table_section(t, lay, part, figs, synthetic=fake, preset=preset, suffix=suffix)
        out += compute_view(t, lay, preset, part, folder)
        out += study_section(t, lay, part, folder, figs, with_paper=preset == PAPER_PRESET)
    fake = others["synthetic"].astype(bool)
    out += _other_section(others[~fake], tables, plans) + _failed_section(results)
    checks += _other_section(others[fake], tables, plans, level=3)
    if checks:
        checks = ["", CHECKS, "", CHECKS_NOTE, ""] + checks
    return "\n".join(out).rstrip() + "\n", "\n".join(checks).rstrip() + "\n" if checks else ""


def is_check(preset: str, synthetic: bool) -> bool:
    """Whether a table section is a pipeline check (the smoke preset's, or one on synthetic data): the
    report's last part, ours alone, no plots."""
    return synthetic or preset == SMOKE


def sections(results: pd.DataFrame, tables: dict, plans: Plans) -> Iterator[tuple]:
    """(table, layout, preset, its runs, synthetic, heading suffix) of every table section the report
    prints: per table, each given preset it has, real-data runs then synthetic ones, where there are runs."""
    for name, t in tables.items():
        given = [p for p in plans.get(name, {}) if p in t.get("presets", {})]  # plans of this tables file
        for preset in given:
            runs = results[results["in_plans"].map(lambda pairs: (name, preset) in pairs).astype(bool)]
            suffix = f" (preset {preset})" if len(given) > 1 else ""
            for fake in (False, True):
                part = runs[runs["synthetic"] == fake]
                if len(part):
                    yield t, layout(name, t, preset), preset, part, fake, suffix


def _names(names: list[str]) -> str:
    return " and ".join(names) or "(none)"


def _unplanned(task: str, tables: dict, given: list[str]) -> str:
    having = [f"table {n} has preset {_names(found)}" for n, t in tables.items() if task in tasks(t)
              for found in [[p for p in t.get("presets", {}) if task in layout(n, t, p).tasks]] if found]
    why = (f"No table plans task {task} for preset {_names(given)} ({'; '.join(having)})" if having
           else f"No table in tables.toml covers task {task}")
    return why + "; its runs are told apart by the settings that vary among them."


def _other_section(others: pd.DataFrame, tables: dict, plans: Plans, level: int = 2) -> list[str]:
    """Runs in no cell, one line per exact setting (seeds averaged), by task and kind of data; under the
    pipeline checks (`level` 3), those on synthetic data."""
    if others.empty:
        return []
    out = [f"{'#' * level} Other runs" + (" on synthetic data" if level > 2 else ""), "",
           ("Runs no plan above names, so they are in no cell: one line per setting, with the settings in which it "
            "differs from the planned run it is compared with."), ""]
    task_rank = _rank(task for t in tables.values() for task in tasks(t))
    model_rank = _rank(m for t in tables.values() for m in models(t))
    mins = _rank(ORDER)
    for (task, fake), runs in sorted(others.groupby(["task", "synthetic"], dropna=False),
                                     key=lambda g: (task_rank(g[0][0]), g[0][1])):
        mine = [t for t in tables.values() if task in tasks(t)]
        # Results columns as they are (accuracy, BLEU): an other run has no table to say how to print it.
        columns = list(dict.fromkeys(m.column for t in mine for m in metrics(t))) or ["max_test_acc"]
        noisy = bool((runs["noise"] != 0).any()) or any(t.get("row_axis") == "noise" for t in mine)
        out += [f"{'#' * (level + 1)} {task}" + (" — synthetic data" if fake else ""), ""]
        if (runs["compared"] == "").all():
            out += [_unplanned(str(task), tables, presets(plans)), ""]
        groups: dict[tuple, list] = {}
        for i, k in zip(runs.index, runs["settings"]):
            groups.setdefault(k, []).append(i)
        body = []
        for g in sorted((runs.loc[i] for i in groups.values()), key=lambda g: (
                model_rank(g["model"].iloc[0]), mins(g["minimizer"].iloc[0]), g["noise"].iloc[0],
                g["differs"].iloc[0])):
            r = g.iloc[0]
            body.append([r["model"], r["minimizer"], *([pct(r["noise"])] if noisy else []),
                         r["differs"] or DASH, r["compared"] or DASH,
                         *(ours(g, column)[0] for column in columns)])
        header = ["model", "minimizer", *(["noise"] if noisy else []), "settings", "compared with", *columns]
        out += md_table(header, body)
    return out


def _rank(names) -> Callable[[Any], tuple]:
    """A sort key: the given names first, in their order (first mention wins), then the rest by name."""
    order: dict[str, int] = {}
    for name in names:
        order.setdefault(name, len(order))
    return lambda name: (order.get(name, len(order)), str(name))


