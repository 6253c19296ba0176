"""`bench report`: result CSVs + the papers' figures -> markdown shaped like the papers' tables, plus curves.

A pure function of files and plain data: it reads `<results>/*.csv`, the papers' published cells
(results/paper/paper-cells.csv) and tasks/tables.toml, is handed the plans (per table and preset, the
settings of every run `bench reproduce` would run, with its cell: `bench.sweep.plan.planned_settings`), and
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
- Every table section ends with its equal-compute view (bench.report_compute): per cell, each minimizer
  against the SGD run of its seed at SGD's compute, from the epoch logs; a PNG per cell beside the report.
- Every other run is still shown, under "Other runs": one line per exact setting (its seeds averaged),
  saying in which settings it differs from the planned run of the same task/model/minimizer/noise, else
  from the closest planned run of its task (fewest differing settings). Runs of tasks no plan covers are
  listed there too, by the settings that vary among them. Failed runs are listed apart, never averaged.
- A setting missing from an older CSV (a column added since) takes RunConfig's default, the value that
  run used unless that default has changed since.
- Synthetic-data runs are a pipeline check: never averaged with real-data runs nor set beside the paper's
  figures.
- Curves draw one line per exact setting too: seeds averaged, different settings never.

Each paper's table prints our cells as that paper printed its own (accuracy ± std for ASAM, error ± 95 %
confidence interval for SAM) and the published figures as the CSV spells them: bench.report_tables.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd

from bench.cells import Plans, match_plans, pct, presets
from bench.errors import UserError
from bench.report_compute import cell_views, compute_view, labels, plot_compute
from bench.report_sharpness import plot_study, study_section
from bench.results import results_csvs
from bench.report_tables import DASH, MARKS, PAPER_PRESET, TARGET_KEY, figures, md_table, ours, table_section
from bench.tables import NAMES, layout, load_tables, metrics, models, tasks

REQUIRED = ["run_id", "task", "model", "minimizer"]
OPTIONAL = {"noise": 0.0, "synthetic": False, "status": "ok"}  # older CSVs predate these columns
TARGET_COLUMNS = [*TARGET_KEY, "mean"]
TARGET_OPTIONAL = ["spread", "spread_kind", "confidence", "source"]
ORDER = ["sgd", "adam", "sam", "asam"]  # plot legend order; table columns follow tables.toml
MAX_PLOTS = 12
MAX_COMPUTE_PLOTS = 24  # accuracy-vs-compute plots: one per cell


def _read_csv(path: Path, what: str, required: list[str], **kw: Any) -> pd.DataFrame | None:
    """A CSV, or None for a 0-byte file; anything unreadable is a UserError naming the file (one line)."""
    try:
        df = pd.read_csv(path, **kw)
    except pd.errors.EmptyDataError:
        return None
    except (ValueError, UnicodeDecodeError, OSError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{path} is not a readable {what} ({reason}); fix or move it away") from None
    missing = [c for c in required if c not in df]
    if missing:
        raise UserError(f"{path} is not a readable {what} (no column {', '.join(missing)}); "
                        "fix or move it away")
    return df


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Add the optional columns and give them one type, whichever CSVs the rows came from. Idempotent."""
    df = df.copy()
    for col in REQUIRED:
        if col not in df:
            df[col] = pd.Series(dtype=object)
    for col, default in OPTIONAL.items():
        if col not in df:
            df[col] = default
    df["noise"] = pd.to_numeric(df["noise"], errors="coerce").fillna(0.0).astype(float)
    # bools, "True"/"False" strings, or empty (rows written before the column existed)
    df["synthetic"] = df["synthetic"].map(
        lambda v: v if isinstance(v, bool) else str(v).strip().lower() in {"true", "1", "1.0"}).astype(bool)
    df["status"] = df["status"].fillna("ok").astype(str).str.strip().replace("", "ok")
    return df


def load_results(results_dir: str | Path) -> pd.DataFrame:
    """Every `<results_dir>/<task>.csv` (bench.results.results_csvs), one row per run_id (a re-run wins)."""
    folder = Path(results_dir)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; point to the folder holding the results CSVs")
    frames = []
    for path in results_csvs(folder):
        df = _read_csv(path, "results CSV", REQUIRED, dtype={c: str for c in [*REQUIRED, "status", "note"]})
        if df is not None:  # a 0-byte file holds no runs
            frames.append(df)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=REQUIRED)
    df = _normalise(df).drop_duplicates("run_id", keep="last").reset_index(drop=True)
    df.attrs["results_dir"] = str(folder)
    return df


def load_targets(path: str | Path) -> pd.DataFrame:
    """The papers' published cells. Kept as text, so a figure prints exactly as the CSV spells it ("81.6"
    stays, a spread "<0.1" too)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; pass the papers' cells (results/paper/paper-cells.csv)")
    df = _read_csv(path, "paper-cells CSV", TARGET_COLUMNS, dtype=str, keep_default_na=False)
    if df is None:
        df = pd.DataFrame(columns=TARGET_COLUMNS)
    for col in TARGET_OPTIONAL:
        if col not in df:
            df[col] = ""
    df = df.apply(lambda c: c.str.strip())
    for bad, what in ((pd.to_numeric(df["mean"], errors="coerce").isna(), "mean {!r} is not a number"),
                      (~df["confidence"].isin([*MARKS, ""]), f"confidence {{!r}} is none of {', '.join(MARKS)}")):
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            value = df["mean" if "mean" in what else "confidence"].iloc[i]
            raise UserError(f"{path} line {i + 2}: {what.format(value)}; fix it")
    return df


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
    source = source or results.attrs.get("results_dir", "?")
    plans = {name: p for name, p in plans.items() if name in tables}  # a cell needs its table to be shown
    results = match_plans(_normalise(results), plans)
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
    for t, lay, preset, part, fake, suffix in _sections(results, tables, plans):
        out += table_section(t, lay, part, figs, synthetic=fake, preset=preset, suffix=suffix)
        out += compute_view(t, lay, preset, part, results.attrs.get("results_dir"))
        out += study_section(t, lay, part, results.attrs.get("results_dir"), figs,
                             with_paper=preset == PAPER_PRESET and not fake)
    out += _other_section(others, tables, plans) + _failed_section(results)
    return "\n".join(out).rstrip() + "\n"


def _sections(results: pd.DataFrame, tables: dict, plans: Plans) -> Iterator[tuple]:
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


def _other_section(others: pd.DataFrame, tables: dict, plans: Plans) -> list[str]:
    """Runs in no cell, one line per exact setting (seeds averaged), by task and kind of data."""
    if others.empty:
        return []
    out = ["## Other runs", "", "Runs no plan above names, so they are in no cell: one line per setting, with "
           "the settings in which it differs from the planned run it is compared with.", ""]
    task_rank = _rank(task for t in tables.values() for task in tasks(t))
    model_rank = _rank(m for t in tables.values() for m in models(t))
    mins = _rank(ORDER)
    for (task, fake), runs in sorted(others.groupby(["task", "synthetic"], dropna=False),
                                     key=lambda g: (task_rank(g[0][0]), g[0][1])):
        mine = [t for t in tables.values() if task in tasks(t)]
        # Results columns as they are (accuracy, BLEU): an other run has no table to say how to print it.
        columns = list(dict.fromkeys(m.column for t in mine for m in metrics(t))) or ["max_test_acc"]
        noisy = bool((runs["noise"] != 0).any()) or any(t.get("row_axis") == "noise" for t in mine)
        out += [f"### {task}" + (" — synthetic data" if fake else ""), ""]
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


def _read_epochs(path: Path) -> pd.Series | None:
    log = _read_csv(path, "epoch log", [])
    if log is None or "epoch" not in log or "test_acc" not in log:
        return None  # e.g. a BLEU task: nothing to plot as accuracy
    log = log.drop_duplicates("epoch", keep="last").set_index("epoch")
    return pd.to_numeric(log["test_acc"], errors="coerce").dropna()


def plot_curves(results_dir: str | Path, results: pd.DataFrame, task: str, model: str, out_png: str | Path,
                noise: float | None = None, synthetic: bool | None = None) -> bool:
    """Test accuracy per epoch: mean over seeds, band = min..max. False (nothing written) without logs.
    Runs with a `variant` column (from match_plans) get one line per variant."""
    runs = _normalise(results)
    runs = runs[(runs["task"] == task) & (runs["model"] == model) & (runs["status"] == "ok")]
    if noise is not None:
        runs = runs[(runs["noise"] - noise).abs() < 1e-9]
    if synthetic is not None:
        runs = runs[runs["synthetic"] == bool(synthetic)]
    curves: dict[tuple, list[pd.Series]] = {}
    for r in runs.itertuples(index=False):
        path = Path(results_dir) / "runs" / str(r.run_id) / "epochs.csv"
        acc = _read_epochs(path) if path.is_file() else None
        if acc is not None and len(acc):
            # Separate lines per noise rate, data kind and setting: those are never averaged together.
            curves.setdefault((r.minimizer, r.noise, r.synthetic, getattr(r, "variant", "")), []).append(acc)
    if not curves:
        return False

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: keeps `bench` startup fast
    from matplotlib.figure import Figure  # no pyplot: no global state, always the Agg canvas
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    many_noise = len({k[1] for k in curves}) > 1
    many_kinds = len({k[2] for k in curves}) > 1
    rank = {m: i for i, m in enumerate(ORDER)}
    for key in sorted(curves, key=lambda k: (rank.get(k[0], len(ORDER)), k[0], k[1], k[2], k[3])):
        m, rate, fake, variant = key
        seeds = pd.concat(curves[key], axis=1).sort_index()  # epochs x runs
        n = seeds.shape[1]
        label = NAMES.get(m, m.upper()) + (f", noise {pct(rate)}" if many_noise else "")
        label += (" (synthetic)" if fake and many_kinds else "") + (f", {variant}" if variant else "")
        label += f" ({n} run{'s' * (n > 1)})"
        (line,) = ax.plot(seeds.index, seeds.mean(axis=1), label=label)
        ax.fill_between(seeds.index, seeds.min(axis=1), seeds.max(axis=1), color=line.get_color(),
                        alpha=0.2, lw=0)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=_what(task, model, noise, synthetic))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _atomic(Path(out_png), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return True


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """A reader (or a crash) never sees half a file: write a temp file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # pid: two reports at once don't collide
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _plot_groups(results: pd.DataFrame, tables: dict, plots: list | None) -> list[tuple]:
    """(task, model, noise, synthetic) groups of ok runs, the tables' order first, or those of `plots`."""
    ok = results.loc[results["status"] == "ok", ["task", "model", "noise", "synthetic"]]
    groups = list(ok.drop_duplicates().itertuples(index=False, name=None))
    if plots is not None:
        wanted = [tuple(p) for p in plots]
        return sorted((g for g in groups if g[:2] in wanted), key=lambda g: (wanted.index(g[:2]), g[3], g[2]))
    order = [task for t in tables.values() for task in tasks(t)] + [m for t in tables.values() for m in models(t)]
    rank = {name: i for i, name in reversed(list(enumerate(order)))}  # first mention wins
    return sorted(groups, key=lambda g: (rank.get(g[0], len(order)), str(g[0]), rank.get(g[1], len(order)),
                                         str(g[1]), g[3], g[2]))


def _what(task: str, model: str, noise: float | None, synthetic: bool | None) -> str:
    return (f"{task} / {model}" + (f", noise {pct(noise)}" if noise else "")
            + (" (synthetic data)" if synthetic else ""))


def write_report(results_dir: str | Path, out_path: str | Path, targets_path: str | Path,
                 tables_path: str | Path, plans: Plans, plots: list | None = None) -> str:
    """Render the report to `out_path` with its curves as PNGs beside it; returns the markdown."""
    results = match_plans(load_results(results_dir), plans)
    tables = load_tables(tables_path)
    md = render_report(results, load_targets(targets_path), tables, plans, source=str(results_dir))
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
            what = _what(task, model, noise, fake)
            links += [f"### {what}", "", f"![{what}]({name})", ""]
    missing = [f"- {t} / {m}: no epoch logs" for t, m in plots or [] if (t, m) not in {g[:2] for g in made}]
    if links or missing:
        md += "\n## Curves\n\n" + "\n".join(links + missing).rstrip() + "\n"
    md += _compute_plots(results_dir, results, tables, plans, out, plots)
    md += _study_plots(results_dir, results, tables, plans, out)
    _atomic(out, lambda tmp: tmp.write_text(md, encoding="utf-8"))
    return md


def _study_plots(results_dir: str | Path, results: pd.DataFrame, tables: dict, plans: Plans, out: Path) -> str:
    """The sharpness studies' scatter plots (a measure against the generalization gap), beside the report."""
    links = []
    for t, lay, preset, part, fake, suffix in _sections(results, tables, plans):
        def write(name: str, fig) -> None:
            file = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{out.stem}-sharpness-{preset}-{name}" + "-synthetic" * fake)
            _atomic(out.with_name(file + ".png"), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
            links.extend([f"### {lay.name}{suffix}: {name}" + (" — synthetic data" if fake else ""), "",
                          f"![{name}]({file}.png)", ""])
        plot_study(lay, part, results_dir, write)
    head = ["## Sharpness against the generalization gap", ""]
    return "\n" + "\n".join(head + links).rstrip() + "\n" if links else ""


def _compute_plots(results_dir: str | Path, results: pd.DataFrame, tables: dict, plans: Plans, out: Path,
                   plots: list | None) -> str:
    """Accuracy against compute, one PNG per cell of a table section with compute logs (those of `plots`'
    task/model pairs when given; at most MAX_COMPUTE_PLOTS), beside the report; their markdown links."""
    links, made, left = [], 0, 0
    wanted = None if plots is None else {tuple(p) for p in plots}
    for t, lay, preset, part, fake, suffix in _sections(results, tables, plans):
        for view in cell_views(t, lay, preset, part, results_dir):
            if wanted is not None and (view.task, view.model) not in wanted:
                continue
            if made >= MAX_COMPUTE_PLOTS:
                left += 1
                continue
            made += 1
            cell = " / ".join(x for x in labels(t, lay, view) if x)
            parts = [out.stem, "compute", lay.name, preset, view.task, view.row, view.variant, "synthetic" * fake]
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(p for p in parts if p)) + ".png"
            plot_compute(view, f"{lay.name}: {cell}" + (" (synthetic data)" if fake else ""),
                         lambda fig: _atomic(out.with_name(name), lambda tmp: fig.savefig(tmp, format="png", dpi=110)))
            what = f"{lay.name}{suffix}: {cell}" + (" — synthetic data" if fake else "")
            links += [f"### {what}", "", f"![{what}]({name})", ""]
    if left:
        links.append(f"{left} more cell{'s' * (left > 1)} not plotted (at most {MAX_COMPUTE_PLOTS}; "
                     "choose with --plot TASK:MODEL).")
    head = ["## Accuracy vs compute", "", "Mean test accuracy over seeds against cumulative passes (a forward alone "
            "counting 1/3), one line per minimizer; dashed: SGD's total compute.", ""]
    return "\n" + "\n".join(head + links).rstrip() + "\n" if links else ""
