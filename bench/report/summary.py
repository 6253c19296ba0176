"""`bench report`'s opening: what reproduced. Per paper table with published cells, how many of them have
full-recipe runs on real data and how many of those agree with the paper; then one line per cell that ran.

What counts: a run the `full` preset's plan names for that table (the papers' recipe, any seed;
bench.tables.cells), on real data (`synthetic` false), status ok. Synthetic runs, runs of other presets
(smoke, demo) and runs off the recipe (another epochs, lr, ...: no plan names them) never count. A cell is a
published cell of the table's full layout (a row x variant x column x metric the paper printed; the
figures of methods we do not run are left out) and is compared in the metric the paper printed: error
(100 - accuracy) in the SAM paper's error tables, accuracy or BLEU elsewhere, as each table section prints
it; a doubled SGD cell is the better of its epochs, as in its section.

Agreement: |ours - paper| <= 2 * sqrt(s_paper^2 + s_ours^2), s_ours the sample standard deviation over our
seeds (0 with one seed), s_paper the paper's standard deviation over its runs: the ASAM paper prints it; the
SAM paper prints the 95 % confidence interval over its 5 runs, turned back into a standard deviation as
CI * sqrt(5) / t(0.975, 4); a bound printed as "<0.1" counts as 0.1. Where neither spread exists (one seed
of ours and no published spread; a sharpness study's rank correlation) the cell is "not judged": run, never
counted as agreeing.

Pure: matched results rows, the tables, the plans and the published cells in, markdown lines out (a
sharpness study reads <results>/sharpness.csv, as its section does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.report.paper import DASH, PAPER_PRESET, by_cell, footnotes, md_table, ok_values, ours, paper_cell
from bench.report.sharpness import PAPER_METRIC, correlations, study_rows
from bench.report.stats import std, t975
from bench.tables.cells import Plans, presets
from bench.tables.layout import Layout, layout, metrics, minimizer_name, paper_key, tasks

HEADING = "## What reproduced"
PAPER_RUNS = 5  # the SAM paper's ± is a 95 % confidence interval over 5 runs (paper-cells.csv: ci95)
NOT_JUDGED = "not judged"
HEADER = ["table", "cell", "metric", "ours: mean ± sd (seeds)", "paper", "Δ", "allowed |Δ|", "agrees"]
RULE = ("Agreement: |ours − paper| ≤ 2·√(s_paper² + s_ours²), s_ours the sample standard deviation over our "
        "seeds (0 with one seed) and s_paper the paper's standard deviation over its runs (the SAM paper's 95 % "
        "confidence interval over 5 runs turned back into one, CI·√5 / t(0.975, 4); a printed “<0.1” taken as "
        "0.1), and a cell with neither spread is not judged (it counts as run, not as agreeing).")


@dataclass
class Compared:
    """One published cell our runs reached: the detail table's line and its verdict (yes, no, not judged)."""
    line: list[str]
    verdict: str
    mark: str


def paper_sd(fig: dict) -> float | None:
    """The paper's standard deviation over its runs, from the spread it printed (None where it printed none)."""
    text = str(fig.get("spread", "") or "").strip()
    number = text.lstrip("<").strip()
    try:
        value = float(number)
    except ValueError:
        return None
    if text.startswith("<") and value == 0:  # "<0.0": below half the last printed digit
        value = 0.5 * 10 ** -len(number.partition(".")[2])
    if fig.get("spread_kind") == "ci95":
        value *= math.sqrt(PAPER_RUNS) / t975(PAPER_RUNS - 1)
    return value


def judge(ours_mean: float, s_ours: float | None, paper_mean: float, s_paper: float | None) -> tuple[float | None, str]:
    """(allowed |Δ|, verdict) by the module's rule; no spread on either side: (None, not judged)."""
    if s_ours is None and s_paper is None:
        return None, NOT_JUDGED
    allowed = 2 * math.sqrt((s_paper or 0.0) ** 2 + (s_ours or 0.0) ** 2)
    return allowed, "yes" if abs(ours_mean - paper_mean) <= allowed + 1e-9 else "no"


def _line(short: str, cell: str, metric: str, ours_text: str, fig: dict, mean: float,
          s_ours: float | None) -> Compared:
    ptext, pmean, mark = paper_cell(fig)
    allowed, verdict = judge(mean, s_ours, pmean, paper_sd(fig))
    delta = f"{round(mean - pmean, 2) + 0.0:+.2f}"  # + 0.0 turns a rounded -0.0 into +0.00
    return Compared([short, cell, metric, ours_text, ptext, delta, DASH if allowed is None else f"{allowed:.2f}",
                     verdict], verdict, mark)


def _table_cells(t: dict, lay: Layout, runs: pd.DataFrame, figs: dict, short: str) -> tuple[int, list[Compared]]:
    """(published cells of the table's full layout, those our runs reached) of a results table."""
    mets = metrics(t)
    cells = by_cell(lay, PAPER_PRESET, runs, mets[0].column)  # a doubled SGD cell: its better epochs, by the first
    error = t.get("value") == "error"
    published, out = 0, []
    for task in lay.tasks:
        for row in lay.rows:
            for var in lay.variants:
                for m in lay.minimizers:
                    for metric in mets:
                        fig = figs.get(paper_key(t, task, row, var, minimizer_name(t, m, paper=True), metric))
                        if fig is None:
                            continue
                        published += 1
                        sel, epochs = cells.get((task, row["label"], var["label"], m), (runs.iloc[:0], None))
                        text, mean = ours(sel, metric.column, error=error, epochs=epochs)
                        if mean is None:
                            continue
                        vals = ok_values(sel, metric.column, error)
                        label = " / ".join(x for x in (
                            t.get("datasets", {}).get(task, task) if len(tasks(t)) > 1 else "", row["label"],
                            var["label"] if lay.variant_column else "", minimizer_name(t, m)) if x)
                        out.append(_line(short, label, metric.name, text, fig, mean,
                                         std(vals) if len(vals) > 1 else None))
    return published, out


def _study_cells(t: dict, lay: Layout, runs: pd.DataFrame, figs: dict, short: str,
                 folder: str | Path | None) -> tuple[int, list[Compared]]:
    """A sharpness study's published cells (a measure's Kendall τ against the gap) and ours over its grid."""
    datasets = {t.get("datasets", {}).get(task, task): task for task in lay.tasks}
    keys = [k for k in figs if k[:2] == (str(t.get("paper", "")), str(t.get("table", ""))) and k[6] == PAPER_METRIC
            and k[2] in datasets]
    found: dict[tuple, list[dict]] = {}
    for c in correlations(study_rows(runs, folder)):
        if c["n"] >= 2 and not pd.isna(c["tau"]):
            found.setdefault((c["task"], c["measure"]), []).append(c)
    out = []
    for key in keys:
        for c in found.get((datasets[key[2]], key[5]), []):
            rho = "" if pd.isna(c["rho"]) else f", rho {c['rho']:g}"
            label = " / ".join(x for x in (key[2] if len(tasks(t)) > 1 else "", key[5]) if x)
            out.append(_line(short, label, PAPER_METRIC, f"{c['tau']:.3f} ({c['n']} runs{rho})", figs[key],
                             c["tau"], None))
    return len(keys), out


def _verdicts(compared: list[Compared]) -> dict[tuple, str]:
    """Per published cell reached (cell, metric), its verdict (a study's measure at several rho: one cell)."""
    return {(c.line[1], c.line[2]): c.verdict for c in compared}


def summary_section(results: pd.DataFrame, tables: dict, plans: Plans, figs: dict,
                    folder: str | Path | None = None) -> list[str]:
    """The report's opening section: per table with published cells a count line, then the cells that ran."""
    counts, detail = [], []
    for name, t in tables.items():
        lay = layout(name, t, PAPER_PRESET)
        if lay is None:
            continue
        mine = results["in_plans"].map(lambda pairs, name=name: (name, PAPER_PRESET) in pairs).astype(bool)
        runs = results[mine & ~results["synthetic"].astype(bool)]
        short = t["title"].split(":")[0]
        published, compared = (_study_cells(t, lay, runs, figs, short, folder) if lay.sharpness is not None
                               else _table_cells(t, lay, runs, figs, short))
        if not published:
            continue  # a table of no paper (demos, variants)
        verdicts = _verdicts(compared)
        reached = len(verdicts)
        agree = sum(v == "yes" for v in verdicts.values())
        unjudged = sum(v == NOT_JUDGED for v in verdicts.values())
        counts.append(f"- {short}: {reached} of {published} cells run" + (
            f", {agree} agree" + (f", {unjudged} not judged" if unjudged else "") if reached else ""))
        detail += compared
    out = [HEADING, "", ("The papers' published cells that have full-recipe runs on real data: runs the `full` "
                         "preset's plan names (the papers' recipes, any seed), status ok. Synthetic runs, runs of "
                         "other presets and runs off the recipe never count; error-rate tables compare error rates."),
           "", *counts, ""]
    if not detail:
        given = presets(plans)
        if PAPER_PRESET not in given:
            out += [(f"This report holds runs against the plans of preset {' and '.join(given) or '(none)'}, not "
                     f"{PAPER_PRESET}: `bench report --preset {PAPER_PRESET}` (the default) counts the full-recipe "
                     "runs, which `bench reproduce <table>` makes on the real data (see `bench reproduce --help`)."),
                    ""]
        else:
            out += [("No full-recipe run on real data yet: `bench reproduce <table>` runs a table's cells on the "
                     "real data (see `bench reproduce --help`), then `bench report` counts them here."), ""]
        return out
    marks = {c.mark for c in detail}
    return out + md_table(HEADER, [c.line for c in detail]) + [RULE, ""] + footnotes(marks)
