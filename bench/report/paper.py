"""One paper table as markdown: a table's layout under a preset, its runs (by cell) and the papers' published
cells -> the lines `bench report` prints. Pure: plain data in, text out (bench.report reads the files).

Our cells print as each paper printed its own (tables.toml `value`, `spread`): accuracy (or BLEU) ± the sample
standard deviation over seeds (ASAM paper), or error (%) = 100 - accuracy ± the 95 % confidence interval
t_{0.975, n-1} * s / sqrt(n) (SAM paper; bench.report.stats). A published figure prints as the CSV spells it, marked
by how sure it is; each mark is explained under its table.
"""
from __future__ import annotations

import pandas as pd

from bench.report.stats import ci95, std
from bench.tables.layout import Layout, Metric, metrics, minimizer_name, paper_key, references, tasks

TARGET_KEY = ["paper", "table", "dataset", "model", "variant", "minimizer", "metric"]  # a published cell's place
DASH = "–"
MARKS = {"recalled": "†", "recalled+corroborated": "‡", "one-source": "§", "two-sources": ""}
NOTES = {"†": "† recalled from the paper, never cross-checked against its text: unverified, shown as recalled.",
         "‡": "‡ recalled from the paper and corroborated: the same figure is another paper's baseline.",
         "§": "§ read in one source only (or in copies sharing one upstream)."}
SYNTHETIC = " — synthetic data (pipeline check; not comparable to the paper)"
PAPER_PRESET = "full"  # the preset that runs the papers' recipes: only its cells stand beside their figures


def ours(runs: pd.DataFrame, column: str, error: bool = False, ci: bool = False,
         epochs: float | None = None) -> tuple[str, float | None]:
    """`mean ± spread (n)` over ok runs (spread: std, or the 95 % CI with `ci`; values 100 - column with
    `error`; `(n, E ep)` where a cell's epochs were chosen); diverged runs are counted, never averaged in."""
    diverged = int((runs["status"] == "diverged").sum())
    vals = ok_values(runs, column, error)
    if not vals:
        return (f"diverged ({diverged})" if diverged else DASH), None
    mean, n = sum(vals) / len(vals), f"{len(vals)}" + (f", {epochs:g} ep" if epochs else "")
    text = f"{mean:.2f} ± {(ci95 if ci else std)(vals):.2f} ({n})" if len(vals) > 1 else f"{mean:.2f} ({n})"
    return text + (f" +{diverged} diverged" if diverged else ""), mean


def ok_values(runs: pd.DataFrame, column: str, error: bool = False) -> list[float]:
    """The numbers of `column` over the ok runs (100 - each with `error`); diverged and failed runs have none."""
    ok = runs.loc[runs["status"] == "ok"]
    vals = pd.to_numeric(ok[column], errors="coerce").dropna() if column in ok else pd.Series(dtype=float)
    return list(100.0 - vals if error else vals)


def _better_epochs(runs: pd.DataFrame, column: str) -> tuple[pd.DataFrame, float | None]:
    """A doubled SGD cell: the runs at the epochs whose ok runs reach the higher mean `column` (accuracy,
    BLEU: higher is better), and those epochs; all runs and None while no epochs has an ok run."""
    ok = runs[runs["status"] == "ok"]
    if column not in ok or "epochs" not in ok:
        return runs, None
    means = pd.to_numeric(ok[column], errors="coerce").groupby(pd.to_numeric(ok["epochs"])).mean().dropna()
    if means.empty:
        return runs, None
    best = means.idxmax()  # a tie keeps the fewer epochs
    return runs[pd.to_numeric(runs["epochs"]) == best], float(best)


def paper_cell(fig: dict | None) -> tuple[str, float | None, str]:
    """(text, mean, mark): the published figure as printed, its spread as given, marked by its confidence."""
    if fig is None:
        return "n/a", None, ""
    mark = MARKS.get(fig["confidence"], "")
    text = fig["mean"] + (f" ± {fig['spread']}" if fig["spread"] else "") + (f" {mark}" if mark else "")
    return text, float(fig["mean"]), mark


def _delta(ours: float | None, paper: float | None) -> str:
    # + 0.0 turns a rounded -0.0 into +0.00
    return DASH if ours is None or paper is None else f"{round(ours - paper, 2) + 0.0:+.2f}"


def figures(targets: pd.DataFrame) -> dict:
    """Published cells by (paper, table, dataset, model, variant, minimizer, metric); a later duplicate wins."""
    return {tuple(str(r[c]) for c in TARGET_KEY): r for r in targets.to_dict("records")}


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
    return [line(header), line(["---"] * len(header)), *map(line, rows), ""]


def footnotes(marks: set[str]) -> list[str]:
    return [line for mark, text in NOTES.items() if mark in marks for line in (text, "")]


def by_cell(lay: Layout, preset: str, runs: pd.DataFrame, column: str) -> dict[tuple, tuple]:
    """The table's runs by cell: (task, row, variant, column) -> (its runs, None), or for a doubled SGD
    cell (the runs at the better epochs, those epochs)."""
    keys = [(r["task"], *r["cells"][(lay.name, preset)]) for r in runs.to_dict("records")]
    index: dict[tuple, list] = {}
    for i, key in zip(runs.index, keys):
        index.setdefault(key, []).append(i)
    return {key: _better_epochs(runs.loc[idx], column) if lay.double_sgd and key[3] == "sgd" else (runs.loc[idx], None)
            for key, idx in index.items()}


def _header(t: dict, lay: Layout, split: bool, with_paper: bool) -> list[str]:
    header = [t.get("row_axis", "model")] + ([t.get("variant_axis", "variant")] if split else [])
    for task in lay.tasks:
        for m in lay.minimizers:
            name = (f"{t.get('datasets', {}).get(task, task)} " if len(tasks(t)) > 1 else "") + minimizer_name(t, m)
            header += [f"{name} (ours)"] + ([f"{name} (paper)", "Δ"] if with_paper else [])
    return header


def table_section(t: dict, lay: Layout, runs: pd.DataFrame, figs: dict, synthetic: bool,
                  preset: str = PAPER_PRESET, suffix: str = "", level: int = 2) -> list[str]:
    """One table under one preset: rows x variants down, tasks x minimizers across (ours, paper, Δ); its
    heading at markdown `level` (3 under the pipeline checks' heading)."""
    # The paper's figures stand beside full-preset cells of a paper that has published cells (the demos and
    # the variants table have none: ours alone, no empty paper column).
    # A sharpness study's published figures are its correlations, which its own section prints (bench.report.sharpness).
    with_paper = (not synthetic and preset == PAPER_PRESET and any(k[0] == t.get("paper", "") for k in figs)
                  and "sharpness" not in t)
    out = [f"{'#' * level} {t['title']}{suffix}{SYNTHETIC if synthetic else ''}", ""]
    out += [lay.note, ""] if lay.note else []
    split = lay.variant_column
    mets = metrics(t)
    cells = by_cell(lay, preset, runs, mets[0].column)  # a doubled cell's epochs: by the first metric
    style = dict(error=t.get("value") == "error", ci=t.get("spread") == "ci95")
    for metric in mets:
        if len(mets) > 1:
            out += [f"**{metric.name}** (results column `{metric.column}`)", ""]
        body, marks = [], set()
        for row in lay.rows:
            for var in lay.variants:
                keys = [(task, row["label"], var["label"], m) for task in lay.tasks for m in lay.minimizers]
                if synthetic and not any(k in cells for k in keys):
                    continue  # a synthetic table shows what ran
                line = [row["label"]] + ([var["label"]] if split else [])
                for key in keys:
                    (task, *_, m), (sel, epochs) = key, cells.get(key, (runs.iloc[:0], None))
                    text, mean = ours(sel, metric.column, epochs=epochs, **style)
                    line.append(text)
                    if with_paper:
                        key = paper_key(t, task, row, var, minimizer_name(t, m, paper=True), metric)
                        ptext, pmean, mark = paper_cell(figs.get(key))
                        marks.add(mark)
                        line += [ptext, _delta(mean, pmean)]
                body.append(line)
        out += md_table(_header(t, lay, split, with_paper), body) + footnotes(marks)
    return out + _how_to_read(t, lay, mets) + (_references(t, lay, figs, mets[0]) if with_paper else [])


def _how_to_read(t: dict, lay: Layout, mets: list[Metric]) -> list[str]:
    """The SAM tables' reading: what a cell is and how its ± was computed (the ASAM tables need none)."""
    lines = []
    if t.get("spread") == "ci95":
        what = "error (%) = 100 − " if t.get("value") == "error" else ""
        columns = " / ".join(f"`{m.column}`" for m in mets)
        lines.append(f"Ours: {what}{columns}; mean ± t(0.975, n−1) · s / √n over "
                     "the n seeds in brackets (s: their sample standard deviation): the 95 % confidence interval "
                     "the SAM paper prints.")
    if lay.double_sgd:
        lines.append("SGD ran each cell at the table's epochs and at twice as many, as the SAM paper allowed it; "
                     "a cell shows the better of the two by mean over seeds, `(n, E ep)` naming the one shown.")
    return [part for line in lines for part in (line, "")]


def _references(t: dict, lay: Layout, figs: dict, metric: Metric) -> list[str]:
    """Published cells of the methods the table lists but we do not run: the paper's figures, as printed."""
    refs = references(t)
    if not refs:
        return []
    cols = [(task, row, var) for task in lay.tasks for row in lay.rows for var in lay.variants]
    header = ["method (published, not run here)"] + [" / ".join(x for x in (
        task if len(tasks(t)) > 1 else "", row["label"], var["label"]) if x) for task, row, var in cols]
    body, marks = [], set()
    for ref in refs:
        line = [ref["minimizer"]]
        for task, row, var in cols:
            row = {**row, **{k: v for k, v in ref.items() if k == "paper_model"}}
            text, _, mark = paper_cell(figs.get(paper_key(t, task, row, var, ref["minimizer"], metric)))
            line.append(text)
            marks.add(mark)
        body.append(line)
    return (["**Other methods, as the paper printed them** (published figures, not runs of ours)", ""]
            + md_table(header, body) + footnotes(marks))
