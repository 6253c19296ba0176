"""`bench report`: result CSVs + the papers' figures -> markdown shaped like the papers' tables, plus curves.

A pure function of files and plain data: it reads `<results>/*.csv`, the paper-targets CSV and
tasks/tables.toml, is handed the plans (per table and preset, the settings of every run `bench reproduce`
would run: `bench.sweep.plan.planned_settings`), and writes markdown and PNGs. It trains nothing and imports
no torch and no task, so it runs anywhere the CSVs are.

Like beside like, because a reader takes a cell for "this recipe, over seeds":
- A paper cell averages only the runs its table's plan names: the same settings (`RunConfig.identity()`)
  as a planned run, any seed. A run that differs in anything that changes what is computed (epochs, lr,
  rho, batch size, precision, world size, ...) is another experiment and never enters a cell. Where and
  how fast a run went (device, workers, loader, compile, ...) is not a setting and separates nothing.
- A table shows the plans of every given preset it has, one section per preset when it has several. The
  papers' figures and the difference to them stand only beside cells of the `full` preset (the papers'
  recipes); a smoke or demo cell has nothing to be compared with.
- Every other run is still shown, under "Other runs": one line per exact setting (its seeds averaged),
  saying in which settings it differs from the planned run of the same task/model/minimizer/noise, else
  from the closest planned run of its task (fewest differing settings). Runs of tasks no plan covers are
  listed there too, by the settings that vary among them. Failed runs are listed apart, never averaged.
- A setting missing from an older CSV (a column added since) takes RunConfig's default, the value that
  run used unless that default has changed since.
- Synthetic-data runs are a pipeline check: never averaged with real-data runs nor set beside the paper's
  figures. The SAM-paper section uses only runs of a `full` plan (none plans the SAM paper's recipes yet).
- Curves draw one line per exact setting too: seeds averaged, different settings never.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from bench.cells import Plans, match_plans, pct, presets
from bench.errors import UserError

try:
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REQUIRED = ["run_id", "task", "model", "minimizer"]
OPTIONAL = {"noise": 0.0, "synthetic": False, "status": "ok"}  # older CSVs predate these columns
TARGET_COLUMNS = ["paper", "table", "task", "model", "minimizer", "metric", "mean"]
NAMES = {"sgd": "SGD", "sam": "SAM", "asam": "ASAM", "adam": "ADAM"}
ORDER = ["sgd", "adam", "sam", "asam"]  # plot legend order; table columns follow tables.toml
DASH, DAGGER = "–", "†"
FOOTNOTE = f"{DAGGER} recalled from the paper, not yet cross-checked against the PDF."
SYNTHETIC = " — synthetic data (pipeline check; not comparable to the paper)"
MAX_PLOTS = 12
PAPER_PRESET = "full"  # the preset that runs the papers' recipes: only its cells stand beside their figures


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
    """Every `<results_dir>/*.csv` (not perf.csv, not subfolders), one row per run_id (a re-run wins)."""
    folder = Path(results_dir)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; point to the folder holding the results CSVs")
    frames = []
    for path in sorted(folder.glob("*.csv")):
        if path.name == "perf.csv" or not path.is_file():  # perf.csv holds timings, not runs
            continue
        df = _read_csv(path, "results CSV", REQUIRED, dtype={c: str for c in [*REQUIRED, "status", "note"]})
        if df is not None:  # a 0-byte file holds no runs
            frames.append(df)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=REQUIRED)
    df = _normalise(df).drop_duplicates("run_id", keep="last").reset_index(drop=True)
    df.attrs["results_dir"] = str(folder)
    return df


def load_targets(path: str | Path) -> pd.DataFrame:
    """The papers' figures. Kept as text, so a figure prints exactly as the CSV spells it ("81.6" stays)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; pass the paper-targets CSV (results/paper/asam.csv)")
    df = _read_csv(path, "paper-targets CSV", TARGET_COLUMNS, dtype=str, keep_default_na=False)
    if df is None:
        df = pd.DataFrame(columns=TARGET_COLUMNS)
    for col in ("std", "status", "noise"):
        if col not in df:
            df[col] = ""
    df = df.apply(lambda c: c.str.strip())
    bad = pd.to_numeric(df["mean"], errors="coerce").isna()
    if bad.any():
        i = int(bad.to_numpy().nonzero()[0][0])
        raise UserError(f"{path} line {i + 2}: mean {df['mean'].iloc[i]!r} is not a number; fix it")
    return df


def load_tables(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            tables = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} not found; pass the table definitions (tasks/tables.toml)") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path} is not valid TOML ({err}); fix it") from None
    for name, t in tables.items():
        lacks = [k for k in ("title", "task", "rows", "minimizers", "metrics") if k not in t]
        if lacks:
            raise UserError(f"{path}: table [{name}] lacks {', '.join(lacks)}; add them")
    return tables


def _ours(runs: pd.DataFrame, column: str | None) -> tuple[str, float | None]:
    """`mean ± std (n)` over ok runs; diverged runs are counted, never averaged in."""
    diverged = int((runs["status"] == "diverged").sum())
    ok = runs.loc[runs["status"] == "ok"]
    vals = pd.to_numeric(ok[column], errors="coerce").dropna() if column in ok else pd.Series(dtype=float)
    if vals.empty:
        return (f"diverged ({diverged})" if diverged else DASH), None
    mean = float(vals.mean())
    text = f"{mean:.2f} ± {vals.std(ddof=1):.2f} ({len(vals)})" if len(vals) > 1 else f"{mean:.2f} (1)"
    return text + (f" +{diverged} diverged" if diverged else ""), mean


def _paper_cell(fig: dict | None) -> tuple[str, float | None, bool]:
    if fig is None:
        return "n/a", None, False
    recalled = fig["status"] == "recalled"
    text = fig["mean"] + (f" ± {fig['std']}" if fig["std"] else "") + (f" {DAGGER}" if recalled else "")
    return text, float(fig["mean"]), recalled


def _delta(ours: float | None, paper: float | None) -> str:
    # + 0.0 turns a rounded -0.0 into +0.00
    return DASH if ours is None or paper is None else f"{round(ours - paper, 2) + 0.0:+.2f}"


def _figures(targets: pd.DataFrame) -> dict:
    """Paper figures by (paper, table, task, model, minimizer, metric, noise); noise None = clean data.
    Noise tables need a figure per noise rate: the optional `noise` column of the targets CSV."""
    noise = pd.to_numeric(targets.get("noise", pd.Series(index=targets.index)), errors="coerce").round(6)
    return {(*(str(r[c]) for c in TARGET_COLUMNS[:6]), None if pd.isna(n) else n): r  # later duplicate wins
            for r, n in zip(targets.to_dict("records"), noise)}


def _figure(figs: dict, t: dict, model: str, minimizer: str, metric: str, noise: float | None) -> dict | None:
    base = (str(t.get("paper")), str(t.get("table")), t["task"], model, minimizer, metric)
    keys = [base + (None,), base + (0.0,)] if noise is None else [base + (round(noise, 6),)]
    return next((figs[k] for k in keys if k in figs), None)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
    return [line(header), line(["---"] * len(header)), *map(line, rows), ""]


def _row_keys(t: dict, runs: pd.DataFrame, all_models: bool) -> tuple[str, list[tuple]]:
    """(row-axis name, [(label, model, noise or None)]) in the paper's order, then anything else we ran."""
    present = list(runs["model"].dropna().unique())
    listed = list(t.get("models", []))
    models = [m for m in listed if all_models or m in present] + sorted(set(present) - set(listed))
    if t["rows"] != "noise":
        return "model", [(m, m, None) for m in models]
    pairs = runs[["model", "noise"]].dropna().drop_duplicates()
    pairs = sorted(pairs.itertuples(index=False), key=lambda p: (models.index(p.model), p.noise))
    # Name the model only when a row could otherwise be mistaken for the paper's model.
    one = len(present) == 1 and present[0] in listed
    return ("noise" if one else "model, noise"), [
        (pct(p.noise) if one else f"{p.model}, {pct(p.noise)}", p.model, p.noise) for p in pairs]


def _table_section(t: dict, runs: pd.DataFrame, figs: dict, synthetic: bool, preset: str = PAPER_PRESET,
                   suffix: str = "") -> list[str]:
    with_paper = not synthetic and t.get("paper") != "demo" and preset == PAPER_PRESET
    out = [f"## {t['title']}{suffix}{SYNTHETIC if synthetic else ''}", ""]
    axis, rows = _row_keys(t, runs, all_models=not synthetic)
    mins = list(t["minimizers"]) + sorted(set(runs["minimizer"].dropna()) - set(t["minimizers"]))
    header = [axis]
    for m in mins:
        name = NAMES.get(m, m.upper())
        header += [f"{name} (ours)"] + ([f"{name} (paper)", "Δ"] if with_paper else [])
    for metric, column in t["metrics"].items():
        if len(t["metrics"]) > 1 or metric != column:
            out += [f"**{metric}** (results column `{column}`)", ""]
        body, daggers = [], False
        for label, model, noise in rows:
            sel = runs[runs["model"] == model]
            if noise is not None:
                sel = sel[(sel["noise"] - noise).abs() < 1e-9]
            cells, papers = [label], model in t.get("models", [model])  # the paper ran only its models
            for m in mins:
                text, mean = _ours(sel[sel["minimizer"] == m], column)
                cells.append(text)
                if with_paper:
                    fig = _figure(figs, t, model, m, metric, noise) if papers else None
                    ptext, pmean, recalled = _paper_cell(fig)
                    daggers |= recalled
                    cells += [ptext, _delta(mean, pmean)]
            body.append(cells)
        out += _md_table(header, body) + ([FOOTNOTE, ""] if daggers else [])
    return out


def _sam_section(results: pd.DataFrame, targets: pd.DataFrame) -> list[str]:
    """The SAM paper's figures beside our runs of a `full` plan with the same task/model/minimizer."""
    sam = targets[targets["paper"] == "sam"]
    if sam.empty:
        return []
    full = results["in_plans"].map(lambda pairs: any(p == PAPER_PRESET for _, p in pairs)).astype(bool)
    real = results[full & ~results["synthetic"] & (results["noise"] == 0)]  # its figures are clean data
    body, daggers = [], False
    for r in sam.to_dict("records"):
        column = "max_test_acc" if r["metric"] in ("max_test_acc", "top1") else None
        runs = real[(real["task"] == r["task"]) & (real["model"] == r["model"])
                    & (real["minimizer"] == r["minimizer"])]
        ours, mean = _ours(runs, column) if column else (DASH, None)
        ptext, pmean, recalled = _paper_cell(r)
        daggers |= recalled
        body.append([*(r[c] for c in TARGET_COLUMNS[1:6]), ptext, ours, _delta(mean, pmean)])
    header = [*TARGET_COLUMNS[1:6], "paper", "ours", "Δ"]
    return ["## SAM paper", ""] + _md_table(header, body) + ([FOOTNOTE, ""] if daggers else [])


def _failed_section(results: pd.DataFrame) -> list[str]:
    failed = results[results["status"] == "failed"]
    cols = ["run_id", "task", "model", "minimizer", "seed", "note"]
    # Seeds come back as floats when the column has gaps: print 3, not 3.0.
    body = [["" if pd.isna(v) else str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
             for v in (r.get(c) for c in cols)] for r in failed.to_dict("records")]
    return ["## Failed runs", ""] + _md_table(cols, body) if body else []


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
    figs = _figures(targets)
    for name, t in tables.items():
        given = list(plans.get(name, {}))
        for preset in given:
            runs = results[results["in_plans"].map(lambda pairs: (name, preset) in pairs).astype(bool)]
            suffix = f" (preset {preset})" if len(given) > 1 else ""
            for fake in (False, True):
                part = runs[runs["synthetic"] == fake]
                if len(part):
                    out += _table_section(t, part, figs, synthetic=fake, preset=preset, suffix=suffix)
    out += _other_section(others, tables, plans) + _sam_section(results, targets) + _failed_section(results)
    return "\n".join(out).rstrip() + "\n"


def _names(names: list[str]) -> str:
    return " and ".join(names) or "(none)"


def _unplanned(task: str, tables: dict, given: list[str]) -> str:
    having = [f"table {n} has preset {_names(list(t.get('presets', {})))}"
              for n, t in tables.items() if t["task"] == task]
    why = (f"No table plans task {task} for preset {_names(given)} ({'; '.join(having)})" if having
           else f"No table in tables.toml covers task {task}")
    return why + "; its runs are told apart by the settings that vary among them."


def _other_section(others: pd.DataFrame, tables: dict, plans: Plans) -> list[str]:
    """Runs in no cell, one line per exact setting (seeds averaged), by task and kind of data."""
    if others.empty:
        return []
    out = ["## Other runs", "", "Runs no plan above names, so they are in no cell: one line per setting, with "
           "the settings in which it differs from the planned run it is compared with.", ""]
    tasks = _rank(t["task"] for t in tables.values())
    models = _rank(m for t in tables.values() for m in t.get("models", []))
    mins = _rank(ORDER)
    for (task, fake), runs in sorted(others.groupby(["task", "synthetic"], dropna=False),
                                     key=lambda g: (tasks(g[0][0]), g[0][1])):
        mine = [t for t in tables.values() if t["task"] == task]
        metrics = {k: v for t in mine for k, v in t["metrics"].items()} or {"max_test_acc": "max_test_acc"}
        noisy = bool((runs["noise"] != 0).any()) or any(t["rows"] == "noise" for t in mine)
        out += [f"### {task}" + (" — synthetic data" if fake else ""), ""]
        if (runs["compared"] == "").all():
            out += [_unplanned(str(task), tables, presets(plans)), ""]
        groups: dict[tuple, list] = {}
        for i, k in zip(runs.index, runs["settings"]):
            groups.setdefault(k, []).append(i)
        body = []
        for g in sorted((runs.loc[i] for i in groups.values()), key=lambda g: (
                models(g["model"].iloc[0]), mins(g["minimizer"].iloc[0]), g["noise"].iloc[0], g["differs"].iloc[0])):
            r = g.iloc[0]
            body.append([r["model"], r["minimizer"], *([pct(r["noise"])] if noisy else []),
                         r["differs"] or DASH, r["compared"] or DASH,
                         *(_ours(g, column)[0] for column in metrics.values())])
        header = ["model", "minimizer", *(["noise"] if noisy else []), "settings", "compared with", *metrics]
        out += _md_table(header, body)
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
    order = [t["task"] for t in tables.values()] + [m for t in tables.values() for m in t.get("models", [])]
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
    _atomic(out, lambda tmp: tmp.write_text(md, encoding="utf-8"))
    return md
