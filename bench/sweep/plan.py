"""The paper tables' experiment matrix (tasks/tables.toml) -> a plan of runs (RunConfigs, hence run ids).

Resumable and idempotent: a run whose record (same run id: same settings and seed) already exists with
status ok/diverged is skipped; an interrupted sweep continues where it stopped; `force` re-runs. Tables
whose task is not built yet are listed and skipped with a message. The sweep itself: bench.sweep.sweeper.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.config import RunConfig
from bench.errors import UserError
from bench.registry import get_task, has_task
from bench.results import result_rows
from bench.runner import completed_run_ids, make_config
from bench.task import load_toml

PRESETS = ("full", "smoke", "demo")


@dataclass
class TablePlan:
    name: str
    title: str
    task: str
    runs: list[RunConfig] = field(default_factory=list)
    done: set[str] = field(default_factory=set)   # run ids already in the results
    skipped: str = ""                              # why the whole table is skipped
    synthetic: dict[str, int] | None = None        # `make_fake` options of the generated data

    @property
    def todo(self) -> list[RunConfig]:
        return [c for c in self.runs if c.run_id not in self.done]


def load_tables(path: str | Path) -> dict[str, dict]:
    return load_toml(path)


def plan(tables: dict[str, dict], names: list[str], preset: str, *, seeds: int | None = None,
         results_dir: str = "results", data_dir: str = "data", device: str = "auto", workers: int = 2,
         force: bool = False, download: bool = False, world_size: int = 1) -> list[TablePlan]:
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if seeds is not None and seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    unknown = [n for n in names if n not in tables]
    if unknown:
        raise UserError(f"unknown table(s) {', '.join(unknown)}; choose from: {', '.join(tables)}")
    done = set() if force else completed_run_ids(results_dir)
    plans = []
    for name in names or [n for n in tables if preset in tables[n].get("presets", {})]:
        spec = tables[name]
        tp = TablePlan(name=name, title=spec["title"], task=spec["task"])
        plans.append(tp)
        p = spec.get("presets", {}).get(preset)
        if p is None:
            tp.skipped = f"no '{preset}' preset (it has: {', '.join(spec.get('presets', {}))})"
            continue
        models = p.get("models", spec["models"])
        noises = p.get("noise", spec.get("noise", [None]))
        n_seeds = seeds or p.get("seeds", 1)
        count = len(models) * len(noises) * len(spec["minimizers"]) * n_seeds
        if not has_task(spec["task"]):
            tp.skipped = f"task {spec['task']!r} is not built yet ({count} runs not planned)"
            continue
        if "synthetic" in p:
            syn = p["synthetic"]
            tp.synthetic = dict(syn) if isinstance(syn, dict) else {"train": syn[0], "test": syn[1]}
            run_data = str(Path(results_dir) / "data" / spec["task"])
        else:
            run_data = data_dir
        for model in models:
            for noise in noises:
                for minimizer in spec["minimizers"]:
                    for seed in range(n_seeds):
                        settings: dict[str, Any] = {**p.get("settings", {}), "model": model,
                                                    "minimizer": minimizer, "seed": seed,
                                                    "results_dir": results_dir, "data_dir": run_data,
                                                    "device": device, "workers": workers,
                                                    "world_size": world_size,
                                                    "download": download and "synthetic" not in p}
                        if noise is not None:
                            settings["noise"] = noise
                        tp.runs.append(make_config(spec["task"], **settings))
        tp.done = {c.run_id for c in tp.runs} & done
    return plans


def measured_epoch_seconds(results_dir: str | Path) -> dict[tuple[str, str, str], tuple[float, str]]:
    """(task, model, minimizer) -> (training seconds per epoch, device) from earlier GPU rows, real data only.
    Training time, not wall time: a resumed run's wall time covers only its last session."""
    speeds: dict[tuple[str, str, str], tuple[float, str]] = {}
    for r in result_rows(results_dir):
        if r.get("status") != "ok" or r.get("synthetic") == "True" or "cpu" in r.get("device_name", "cpu").lower():
            continue
        try:
            epochs = float(r.get("epochs_done") or 0)
            if epochs > 0:
                speeds[(r["task"], r["model"], r["minimizer"])] = (float(r["train_time_s"]) / epochs, r["device_name"])
        except (KeyError, ValueError, TypeError):
            continue  # a row from an older or foreign CSV: no speed to learn from it
    return speeds


def describe(plans: list[TablePlan], results_dir: str | Path) -> list[str]:
    """The --dry-run text: per table, runs planned / already done, and GPU-hours where measured."""
    speeds = measured_epoch_seconds(results_dir)
    lines, total_h, unknown = [], 0.0, 0
    for tp in plans:
        if tp.skipped:
            lines.append(f"{tp.name}: skipped: {tp.skipped}")
            continue
        hours, missing = 0.0, 0
        for cfg in tp.todo:
            speed = speeds.get((cfg.task, cfg.model, cfg.minimizer))
            if speed:
                hours += speed[0] * cfg.epochs / 3600
            else:
                missing += 1
        total_h += hours
        unknown += missing
        est = f"~{hours:.1f} GPU-h measured" if hours else "GPU-h unknown"
        if missing and hours:
            est += f" + {missing} runs of unmeasured speed"
        data = (", synthetic data " + " ".join(f"{k}={v}" for k, v in tp.synthetic.items())) if tp.synthetic else ""
        lines.append(f"{tp.name} ({tp.task}): {len(tp.runs)} runs, {len(tp.runs) - len(tp.todo)} already done, "
                     f"{len(tp.todo)} to run{data}; {est}")
        for cfg in tp.todo:
            speed = speeds.get((cfg.task, cfg.model, cfg.minimizer))
            eta = f"{speed[0] * cfg.epochs / 3600:.2f} h on {speed[1]}" if speed else "speed not measured"
            lines.append(f"  {cfg.run_id}  {cfg.model} {cfg.minimizer} rho={cfg.rho} noise={cfg.noise} "
                         f"epochs={cfg.epochs} seed={cfg.seed}  ({eta})")
    lines.append(f"total: {sum(len(t.todo) for t in plans)} runs to do; {total_h:.1f} GPU-h measured"
                 + (f", {unknown} runs without a measured speed (run one epoch on your GPU to measure)"
                    if unknown else ""))
    return lines


def planned_settings(tables: dict[str, dict], presets: list[str]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """What `bench report` holds runs against: table -> preset -> the settings (`RunConfig.identity()`) of
    every run `bench reproduce --preset PRESET` plans for that table. A table takes a plan from each given
    preset it has; a table without any, or whose task is not built, plans nothing."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for preset in dict.fromkeys(presets):  # a preset given twice counts once
        for tp in plan(tables, [], preset, workers=0, force=True):  # force: no need to read the results
            if tp.runs:
                out.setdefault(tp.name, {})[preset] = [c.identity() for c in tp.runs]
    return out
