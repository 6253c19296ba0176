"""The papers' result tables as data (tasks/tables.toml): read, check, and lay out per preset.

A table is tasks x rows x variants x columns x seeds. A column is a minimizer (`"sam"`) or a minimizer under
settings of its own (`{ label = "SAM, last 1/8", minimizer = "sam", sam_from = 0.875 }`: a schedule, an option).
Rows and variants are lists of lines: a `label`,
any RunConfig settings, and the names the published cells give them where those differ from the label
(`paper_model`, `paper_variant`). A setting's value may be a table keyed by task (`rho = {cifar10 = 0.05,
cifar100 = 0.1}`). Settings stack: the table's `settings`, the row's, the variant's, the preset's.

Pure data: no torch and no task registry. bench.tables.plan turns a layout into runs, bench.report into
markdown; both read the tables through this module, so they agree on rows, variants and their order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bench.errors import UserError

try:
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TABLE_KEYS = {"paper", "table", "title", "task", "tasks", "datasets", "rows", "variants", "row_axis",
              "variant_axis", "minimizers", "metrics", "settings", "value", "spread", "sgd_double_epochs",
              "paper_model", "paper_minimizers", "references", "presets", "grid", "sharpness"}
PRESET_KEYS = {"rows", "variants", "tasks", "seeds", "settings", "synthetic", "note", "grid", "sharpness"}
LINE_META = ("label", "paper_model", "paper_variant")  # a line's keys that are not settings
# How the report heads our columns: the papers' own spellings (a minimizer not named here: its name in capitals).
NAMES = {"sgd": "SGD", "sam": "SAM", "asam": "ASAM", "adam": "ADAM", "gsam": "GSAM", "esam": "ESAM",
         "looksam": "LookSAM", "fsam": "F-SAM", "samon": "SAM-ON", "sam_adaptive_all": "SAM (adaptive, all)",
         "msam": "MSAM", "wsam": "WSAM", "sampa": "SAMPa"}
PLAIN = {"label": ""}  # the one variant of a table without variants


@dataclass(frozen=True)
class Metric:
    name: str            # the paper's metric name (paper-cells.csv `metric`) unless `paper_metric` says
    column: str          # the results column it is read from
    paper_metric: str
    paper_variant: str | None  # where a metric, not a line, picks the published cell (BLEU valid / test)


@dataclass(frozen=True)
class Cell:
    """One cell of a table: every seed of it runs these settings (rho/eta still for every minimizer)."""
    task: str
    row: str
    variant: str
    minimizer: str
    settings: dict[str, Any]
    column: str = ""  # its column's key: the minimizer's name, or the label of a column with settings of its own


@dataclass(frozen=True)
class Layout:
    """A table under one preset: the lines it keeps, the seeds, the generated data, the preset's note."""
    name: str
    spec: dict[str, Any]
    tasks: list[str]
    rows: list[dict[str, Any]]
    variants: list[dict[str, Any]]
    seeds: int
    synthetic: dict[str, int] | None
    note: str
    preset_settings: dict[str, Any]  # win over the table's, the row's and the variant's
    sharpness: dict[str, Any] | None = None  # `bench sharpness` of every run: measures, rho, protocol

    @property
    def minimizers(self) -> list[str]:
        """The columns' keys, in order (a minimizer's name, or a column's label)."""
        return list(columns(self.spec))

    @property
    def variant_column(self) -> bool:
        """Whether the report prints a variant column: several variants, or one with a label (SAM Table 1)."""
        return len(self.variants) > 1 or bool(self.variants[0]["label"])

    @property
    def double_sgd(self) -> bool:
        """The SAM paper gave SGD twice the epochs too and kept the better: plan both."""
        return bool(self.spec.get("sgd_double_epochs"))

    def cells(self) -> Iterator[Cell]:
        for task in self.tasks:
            for row in self.rows:
                for variant in self.variants:
                    settings = {}
                    for layer in (self.spec.get("settings", {}), row, variant, self.preset_settings):
                        settings.update(resolve(self.name, layer, task))
                    for key, (m, own) in columns(self.spec).items():
                        yield Cell(task, row["label"], variant["label"], m,
                                   {**settings, **resolve(self.name, own, task), **self.preset_settings}, key)


def resolve(table: str, layer: dict[str, Any], task: str) -> dict[str, Any]:
    """A line's (or settings table's) settings for one task: per-task values picked, meta keys dropped."""
    out = {}
    for key, value in layer.items():
        if key in LINE_META:
            continue
        if isinstance(value, dict):
            if task not in value:
                raise UserError(f"tables.toml [{table}]: {key} = {value} names no value for task {task}; add one")
            value = value[task]
        out[key] = value
    return out


def columns(spec: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """key -> (minimizer, the column's own settings): `"sam"` is ("sam", {}) under key "sam";
    `{ label = "SAM every 5", minimizer = "sam", sam_every = 5 }` is ("sam", {"sam_every": 5}) under its label.
    A column's settings win over the table's, the row's and the variant's; the preset's win over all."""
    out = {}
    for m in spec["minimizers"]:
        if isinstance(m, str):
            out[m] = (m, {})
        else:
            out[m["label"]] = (m["minimizer"], {k: v for k, v in m.items() if k not in ("label", "minimizer")})
    return out


def tasks(spec: dict[str, Any]) -> list[str]:
    return list(spec.get("tasks") or [spec["task"]])


def load_tables(path: str | Path) -> dict[str, dict[str, Any]]:
    """tasks/tables.toml, checked: a table lacking a key, or with one this format does not know, is a
    one-line UserError naming the table."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            tables = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} not found; pass the table definitions (tasks/tables.toml)") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path} is not valid TOML ({err}); fix it") from None
    for name, spec in tables.items():
        _check(path, name, spec)
        if "grid" in spec and "rows" not in spec:
            spec["rows"] = grid_rows(spec["grid"])
    return tables


def grid_rows(grid: dict[str, list]) -> list[dict[str, Any]]:
    """A grid of settings (`grid = { batch_size = [128, 256], lr = [0.05, 0.1] }`) as rows: every combination,
    the first setting varying slowest, labelled `batch_size=128 lr=0.05`."""
    rows: list[dict[str, Any]] = [{}]
    for key, values in grid.items():
        rows = [{**row, key: v} for row in rows for v in (values if isinstance(values, list) else [values])]
    return [{"label": " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), **row}
            for row in rows]


def _check(path: Path, name: str, spec: dict[str, Any]) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise UserError(f"{path}: table [{name}] {what}; fix it")

    lacks = [k for k in ("title", "rows", "minimizers", "metrics") if k not in spec and not (k == "rows" and "grid" in spec)]
    need(not lacks and ("task" in spec or "tasks" in spec), f"lacks {', '.join(lacks or ['task'])}")
    need(not isinstance(spec.get("rows"), str), f"uses the old format (rows = {spec.get('rows')!r}); write rows "
         "as a list of lines, e.g. rows = [{ label = \"wrn28_10\", model = \"wrn28_10\" }] (see the file's header)")
    need(not set(spec) - TABLE_KEYS, f"has unknown key(s) {', '.join(sorted(set(spec) - TABLE_KEYS))}")
    need(spec.get("value", "accuracy") in ("accuracy", "error"), "has value other than accuracy or error")
    need(spec.get("spread", "std") in ("std", "ci95"), "has spread other than std or ci95")
    need(isinstance(spec.get("grid", {}), dict) and all(spec.get("grid", {}).values()),
         "has a grid that is not a table of non-empty lists (grid = { lr = [0.05, 0.1] })")
    for axis in ("rows", "variants"):
        lines = spec.get(axis, [PLAIN]) if not (axis == "rows" and "grid" in spec and "rows" not in spec) else [PLAIN]
        need(isinstance(lines, list) and lines and all(isinstance(x, dict) and "label" in x for x in lines),
             f"{axis} must be a non-empty list of tables, each with a label")
        labels = [x["label"] for x in lines]
        need(len(set(labels)) == len(labels), f"repeats a label in {axis}")
    cols = spec["minimizers"]
    need(isinstance(cols, list) and cols and all(isinstance(c, str) or (isinstance(c, dict) and "label" in c and
                                                   "minimizer" in c) for c in cols),
         'minimizers must be a list of names or of tables { label = "...", minimizer = "...", <settings> }')
    keys = [c if isinstance(c, str) else c["label"] for c in cols]
    need(len(set(keys)) == len(keys), "repeats a column in minimizers (give each table column its own label)")
    for preset, p in spec.get("presets", {}).items():
        need(not set(p) - PRESET_KEYS, f"preset {preset} has unknown key(s) {', '.join(sorted(set(p) - PRESET_KEYS))}")


def expand_names(tables: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """Table names as given, a paper's name (`asam`, `sam`) standing for that paper's tables."""
    papers = {}
    for table, spec in tables.items():
        papers.setdefault(spec.get("paper", ""), []).append(table)
    out = []
    for name in names:
        if name not in tables and name not in papers:
            raise UserError(f"unknown table(s) {name}; choose from: {', '.join(tables)} or a paper: "
                            f"{', '.join(p for p in papers if p and p not in tables)}")
        out += [name] if name in tables else papers[name]
    return list(dict.fromkeys(out))


def layout(name: str, spec: dict[str, Any], preset: str) -> Layout | None:
    """The table under `preset` (None if it has no such preset): the rows, variants and tasks it keeps."""
    p = spec.get("presets", {}).get(preset)
    if p is None:
        return None
    synthetic = p.get("synthetic")
    if synthetic is not None and not isinstance(synthetic, dict):
        synthetic = {"train": synthetic[0], "test": synthetic[1]}
    rows = grid_rows(p["grid"]) if "grid" in p else spec["rows"]
    sharp = {**spec["sharpness"], **p.get("sharpness", {})} if "sharpness" in spec else None
    return Layout(name=name, spec=spec, tasks=_keep(name, preset, "tasks", tasks(spec), p),
                  rows=_keep(name, preset, "rows", rows, p),
                  variants=_keep(name, preset, "variants", spec.get("variants", [PLAIN]), p),
                  seeds=int(p.get("seeds", 1)), synthetic=dict(synthetic) if synthetic else None,
                  note=p.get("note", ""), preset_settings=p.get("settings", {}), sharpness=sharp)


def _keep(table: str, preset: str, axis: str, items: list, p: dict[str, Any]) -> list:
    """The items (lines, or task names) a preset keeps, by label, in the table's order."""
    label = (lambda x: x) if axis == "tasks" else (lambda x: x["label"])
    wanted = p.get(axis)
    if wanted is None:
        return list(items)
    unknown = [w for w in wanted if w not in {label(x) for x in items}]
    if unknown:
        raise UserError(f"tables.toml [{table}] preset {preset}: no {axis[:-1]} {unknown[0]!r}; choose from: "
                        f"{', '.join(label(x) for x in items)}")
    return [x for x in items if label(x) in wanted]


def metrics(spec: dict[str, Any]) -> list[Metric]:
    """A metric is `name = "results column"` or `name = { column, paper_metric, paper_variant }`."""
    out = []
    for name, m in spec["metrics"].items():
        m = {"column": m} if isinstance(m, str) else m
        out.append(Metric(name, m["column"], m.get("paper_metric", name), m.get("paper_variant")))
    return out


def paper_key(spec: dict[str, Any], task: str, row: dict, variant: dict, minimizer: str,
              metric: Metric) -> tuple[str, ...]:
    """The published cell's coordinates in paper-cells.csv: (paper, table, dataset, model, variant,
    minimizer, metric), `minimizer` as the paper names it. A line's names default to its label; a metric or
    a row may name the variant."""
    model = row.get("paper_model", spec.get("paper_model", row["label"]))
    var = metric.paper_variant or variant.get("paper_variant") or row.get("paper_variant") or variant["label"]
    return (str(spec.get("paper", "")), str(spec.get("table", "")), spec.get("datasets", {}).get(task, task),
            model, var, minimizer, metric.paper_metric)


def minimizer_name(spec: dict[str, Any], minimizer: str, paper: bool = False) -> str:
    """Our column heading of a column (a minimizer, or a labelled column: its label), or (paper=True) the name its
    published cells use."""
    if any(isinstance(c, dict) and c.get("label") == minimizer for c in spec.get("minimizers", [])):
        return minimizer
    names = {**NAMES, **(spec.get("paper_minimizers", {}) if paper else {})}
    return names.get(minimizer, minimizer.upper())


def references(spec: dict[str, Any]) -> list[dict[str, str]]:
    """Published cells of methods we do not run (`references`): `"Mixup"` or `{ minimizer, paper_model }`."""
    return [{"minimizer": r} if isinstance(r, str) else dict(r) for r in spec.get("references", [])]


def models(spec: dict[str, Any]) -> list[str]:
    """The models a table's rows (or its settings) name, in order: for sorting the report's other runs."""
    found = [line.get("model") for line in spec["rows"]] + [spec.get("settings", {}).get("model")]
    return list(dict.fromkeys(m for m in found if isinstance(m, str)))
