"""The paper tables' experiment matrix (tasks/tables.toml, laid out by bench.tables) -> a plan of runs
(RunConfigs, hence run ids).

Resumable and idempotent: a run whose record (same run id: same settings and seed) already exists with
status ok/diverged is skipped; an interrupted sweep continues where it stopped; `force` re-runs. Cells that
need a task, a minimizer, a model or a task setting this checkout does not have yet are left out and said
so (a table with none left is skipped), so a table can be written before its parts are. The sweep itself:
bench.sweep.sweeper.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.config import RunConfig
from bench.errors import UserError
from bench.recipes import make_config, missing_part
from bench.registry import get_task
from bench.store.records import result_rows
from bench.tables.cells import COLUMN, ROW, VARIANT
from bench.tables.layout import Cell, Layout, expand_names, layout, tasks
from bench.train.runner import completed_run_ids

PRESETS = ("full", "smoke", "demo")  # every table has some of these; a table may define presets of its own


def known_presets(tables: dict[str, dict]) -> list[str]:
    return list(dict.fromkeys([*PRESETS, *(p for t in tables.values() for p in t.get("presets", {}))]))


@dataclass
class TablePlan:
    name: str
    title: str
    task: str                                      # the table's task(s), for messages
    runs: list[RunConfig] = field(default_factory=list)
    done: set[str] = field(default_factory=set)   # run ids already in the results
    skipped: str = ""                              # why the whole table is skipped
    unplanned: dict[str, int] = field(default_factory=dict)  # cells left out: why -> how many runs
    synthetic: dict[str, int] | None = None        # `make_fake` options of the generated data
    cells: dict[str, tuple[str, str]] = field(default_factory=dict)  # run id -> (row, variant) label
    columns: dict[str, str] = field(default_factory=dict)  # run id -> its column's key (bench.tables.layout.columns)
    sharpness: Any = None                          # bench.sharpness.Request: every run is measured after training

    @property
    def todo(self) -> list[RunConfig]:
        return [c for c in self.runs if c.run_id not in self.done]

    def unmeasured(self, cfg: RunConfig) -> list:
        """The (measure, rho) pairs of this table's sharpness study that sharpness.csv lacks for the run."""
        if self.sharpness is None:
            return []
        from bench.sharpness.run import missing_pairs
        return missing_pairs(cfg.results_dir, cfg.run_id, self.sharpness)


def plan(tables: dict[str, dict], names: list[str], preset: str, *, seeds: int | None = None,
         results_dir: str = "results", data_dir: str = "data", device: str = "auto", workers: int = 2,
         force: bool = False, download: bool = False, world_size: int = 1, log: str = "none",
         checkpoint_every: int = 1, deterministic: bool = False) -> list[TablePlan]:
    """The runs of the named tables (a paper's name stands for its tables; none: every table with the
    preset) under `preset`. `log`, `checkpoint_every` and `deterministic` reach every run (none is part of a
    run id)."""
    if preset not in known_presets(tables):
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(known_presets(tables))}")
    if seeds is not None and seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    names = expand_names(tables, names)
    done = set() if force else completed_run_ids(results_dir)
    where = dict(results_dir=results_dir, data_dir=data_dir, device=device, workers=workers,
                 world_size=world_size, download=download, log=log, checkpoint_every=checkpoint_every,
                 deterministic=deterministic)
    plans = []
    for name in names or [n for n in tables if preset in tables[n].get("presets", {})]:
        spec = tables[name]
        lay = layout(name, spec, preset)
        tp = TablePlan(name=name, title=spec["title"], task=", ".join(tasks(spec)))
        plans.append(tp)
        if lay is None:
            tp.skipped = f"no '{preset}' preset (it has: {', '.join(spec.get('presets', {}))})"
            continue
        _plan_table(tp, lay, seeds or lay.seeds, where)
        tp.done = {c.run_id for c in tp.runs if not tp.unmeasured(c)} & done
    return plans


def _plan_table(tp: TablePlan, lay: Layout, n_seeds: int, where: dict[str, Any]) -> None:
    """Fill `tp` with the runs of every cell this checkout can build; count the others by reason."""
    tp.synthetic = lay.synthetic
    if lay.sharpness is not None:
        tp.sharpness = sharpness_request(tp.name, lay.sharpness, where["device"])
    for cell in lay.cells():
        doubled = lay.double_sgd and cell.minimizer == "sgd"
        missing = missing_part(cell.task, cell.minimizer, cell.settings)
        why = missing.planned() if missing else ""
        if why:
            tp.unplanned[why] = tp.unplanned.get(why, 0) + n_seeds * (2 if doubled else 1)
            continue
        for cfg in _cell_runs(cell, n_seeds, doubled, lay.synthetic is not None, where):
            if cfg.run_id in tp.cells:
                raise UserError(f"table {tp.name} plans one run twice ({' / '.join(tp.cells[cfg.run_id])} and "
                                f"{cell.row} / {cell.variant}): give its cells different settings")
            tp.runs.append(dataclasses.replace(cfg, keep_weights=True) if tp.sharpness is not None else cfg)
            tp.cells[cfg.run_id] = (cell.row, cell.variant)
            tp.columns[cfg.run_id] = cell.column or cell.minimizer
    if not tp.runs:
        tp.skipped = "; ".join(f"{why} ({n} runs not planned)" for why, n in tp.unplanned.items())


def sharpness_request(table: str, spec: dict[str, Any], device: str):
    """A table's `sharpness = { measures, rho, examples, m, iters, eta, seed }` as a checked Request."""
    from bench.sharpness.run import make_request
    spec = dict(spec)
    measures, rho = spec.pop("measures", None), spec.pop("rho", None)
    try:
        return make_request(measures, rho if rho is None or isinstance(rho, list) else [rho], device, **spec)
    except TypeError as e:  # an unknown protocol key
        raise UserError(f"tables.toml [{table}] sharpness: {e}; its keys: measures, rho, examples, m, iters, eta, "
                        "seed, power_iters, power_tol") from None


def _cell_runs(cell: Cell, n_seeds: int, doubled: bool, synthetic: bool, where: dict[str, Any]) -> list[RunConfig]:
    """Every seed of a cell; a doubled SGD cell at its epochs, then at twice as many."""
    settings = dict(cell.settings)
    if cell.minimizer == get_task(cell.task).base_optimizer:  # the base optimizer has no radius
        settings.pop("rho", None)
        settings.pop("eta", None)
    if synthetic:  # the sweep writes the table's generated data here (bench.sweep.sweeper.ensure_fake_data)
        where = {**where, "data_dir": str(Path(where["results_dir"]) / "data" / cell.task), "download": False}
    runs = [make_config(cell.task, **settings, **where, minimizer=cell.minimizer, seed=seed)
            for seed in range(n_seeds)]
    return runs + [dataclasses.replace(c, epochs=2 * c.epochs) for c in runs] if doubled else runs


SpeedKey = tuple  # (task, model, minimizer, precision, compile)


def speed_key(task: str, model: str, minimizer: str, precision: Any = "fp32", compile_: Any = False) -> SpeedKey:
    """What a measured speed holds for: the same network and minimizer at the same precision, compiled or not
    (bf16 + compile runs several times faster than fp32 eager). Older rows without the columns: fp32, eager."""
    return (task, model, minimizer, str(precision or "fp32"), str(compile_) in ("True", "true", "1"))


def measured_epoch_seconds(results_dir: str | Path) -> dict[SpeedKey, dict[int, tuple[float, str]]]:
    """speed_key -> {GPUs of the run: (training seconds per epoch, device)} from earlier GPU rows, real data only.
    Training time, not wall time: a resumed run's wall time covers only its last session."""
    speeds: dict[SpeedKey, dict[int, tuple[float, str]]] = {}
    for r in result_rows(results_dir):
        if r.get("status") != "ok" or r.get("synthetic") == "True" or "cpu" in r.get("device_name", "cpu").lower():
            continue
        try:
            epochs = float(r.get("epochs_done") or 0)
            if epochs > 0:
                key = speed_key(r["task"], r["model"], r["minimizer"], r.get("precision"), r.get("compile"))
                gpus = int(float(r.get("world_size") or 1))
                speeds.setdefault(key, {})[gpus] = (float(r["train_time_s"]) / epochs, r["device_name"])
        except (KeyError, ValueError, TypeError):
            continue  # a row from an older or foreign CSV: no speed to learn from it
    return speeds


def gpu_hours(cfg: RunConfig, speeds: dict) -> tuple[float, str] | None:
    """GPU-hours of a planned run (all its GPUs: seconds per epoch x epochs x GPUs) and how it was estimated;
    None without a measured speed. A speed measured on another number of GPUs is taken as GPU-seconds per epoch
    (perfect scaling), and said."""
    by_gpus = speeds.get(speed_key(cfg.task, cfg.model, cfg.minimizer, cfg.precision, cfg.compile))
    if not by_gpus:
        return None
    if cfg.world_size in by_gpus:
        seconds, device = by_gpus[cfg.world_size]
        return seconds * cfg.epochs * cfg.world_size / 3600, f"on {cfg.world_size} x {device}"
    gpus, (seconds, device) = max(by_gpus.items())
    return seconds * gpus * cfg.epochs / 3600, f"on {gpus} x {device}, scaled to {cfg.world_size}"


def describe(plans: list[TablePlan], results_dir: str | Path) -> list[str]:
    """The --dry-run text: per table, runs planned / already done, and GPU-hours where measured."""
    speeds = measured_epoch_seconds(results_dir)
    lines, total_h, unknown = [], 0.0, 0
    for tp in plans:
        if tp.skipped:
            lines.append(f"{tp.name}: skipped: {tp.skipped}")
            continue
        estimates = {cfg.run_id: gpu_hours(cfg, speeds) for cfg in tp.todo}
        hours = sum(e[0] for e in estimates.values() if e)
        missing = sum(e is None for e in estimates.values())
        total_h += hours
        unknown += missing
        est = f"~{hours:.1f} GPU-h measured" if hours else "GPU-h unknown"
        if missing and hours:
            est += f" + {missing} runs of unmeasured speed"
        data = (", synthetic data " + " ".join(f"{k}={v}" for k, v in tp.synthetic.items())) if tp.synthetic else ""
        lines.append(f"{tp.name} ({tp.task}): {len(tp.runs)} runs, {len(tp.runs) - len(tp.todo)} already done, "
                     f"{len(tp.todo)} to run{data}; {est}")
        lines += [f"  not planned: {why} ({n} runs)" for why, n in tp.unplanned.items()]
        for cfg in tp.todo:
            e = estimates[cfg.run_id]
            eta = f"{e[0]:.2f} GPU-h {e[1]}" if e else "speed not measured"
            column = tp.columns.get(cfg.run_id, cfg.minimizer)
            cell = " / ".join(label for label in (*tp.cells.get(cfg.run_id, ()), column if column != cfg.minimizer
                                                  else "") if label)
            lines.append(f"  {cfg.run_id}  {f'[{cell}] ' if cell else ''}{cfg.model} {cfg.minimizer} rho={cfg.rho} "
                         f"noise={cfg.noise} epochs={cfg.epochs} seed={cfg.seed} {cfg.precision}"
                         f"{' compiled' if cfg.compile else ''} on {cfg.world_size} GPU(s)  ({eta})")
    left = sum(n for t in plans for n in t.unplanned.values())
    lines.append(f"total: {sum(len(t.todo) for t in plans)} runs to do"
                 + (f" ({left} more not planned: their parts are not built yet)" if left else "")
                 + f"; {total_h:.1f} GPU-h measured"
                 + (f", {unknown} runs without a measured speed (run one epoch on your GPU to measure)"
                    if unknown else ""))
    return lines


def planned_settings(tables: dict[str, dict], presets: list[str]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """What `bench report` holds runs against: table -> preset -> the settings (`RunConfig.identity()`) of
    every run `bench reproduce --preset PRESET` plans for that table, each with the labels of its cell's
    row and variant (bench.tables.cells.ROW, VARIANT). A table takes a plan from each given preset it has; a table
    without any, or none of whose cells can be built yet, plans nothing."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for preset in dict.fromkeys(presets):  # a preset given twice counts once
        for tp in plan(tables, [], preset, workers=0, force=True):  # force: no need to read the results
            if tp.runs:
                out.setdefault(tp.name, {})[preset] = [
                    {**c.identity(), ROW: tp.cells[c.run_id][0], VARIANT: tp.cells[c.run_id][1],
                     COLUMN: tp.columns[c.run_id]} for c in tp.runs]
    return out
