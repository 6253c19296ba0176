"""A task's recipe plus what the user (or a table) overrides -> a checked RunConfig; and whether this checkout
can run a cell at all (its task, minimizer, model and task settings exist), asked once for both: a run refuses
what is missing with the choices there are, a table's plan leaves it out and says what is not built yet."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.config import DEFAULTS, TASK_SETTINGS, RunConfig, build_config
from bench.errors import UserError
from bench.gpu import check_deterministic
from bench.minimizers import MINIMIZERS
from bench.registry import get_task, has_task, task_names


@dataclass(frozen=True)
class Missing:
    """A part of a cell this checkout lacks: kind task | minimizer | model | setting, its name, the task."""
    kind: str
    name: str
    task: str

    def planned(self) -> str:
        """How a table's plan says it (the cell is left out)."""
        if self.kind == "task":
            return f"task {self.name!r} is not built yet"
        if self.kind == "setting":
            return f"task {self.task} does not read setting {self.name} yet"
        where = f" for task {self.task}" if self.kind == "model" else ""
        return f"{self.kind} {self.name!r} is not built yet{where}"

    def refused(self) -> str:
        """How a run refuses it (one line with the choices there are)."""
        if self.kind == "task":
            return f"unknown task {self.name!r}; choose one of: {', '.join(task_names())}"
        task = get_task(self.task)
        if self.kind == "model":
            return f"unknown model {self.name!r} for task {self.task}; choose one of: {', '.join(task.models())}"
        if self.kind == "minimizer":
            return (f"unknown minimizer {self.name!r} for task {self.task}; choose one of: "
                    f"{', '.join(task.minimizers())}")
        users = [t for t in task_names() if self.name in get_task(t).settings]
        return (f"--{self.name.replace('_', '-')} does not apply to task {self.task}; it is a setting of: "
                f"{', '.join(users) or 'no task'}")


def missing_part(task_name: str, minimizer: str | None, settings: dict[str, Any]) -> Missing | None:
    """What of a cell (its task, minimizer, model, or a task setting away from its default) this checkout lacks."""
    if not has_task(task_name):
        return Missing("task", task_name, task_name)
    task = get_task(task_name)
    model = settings.get("model") or task.recipe().get("model")
    if not task.has_model(model):
        return Missing("model", str(model), task.name)
    if minimizer not in task.minimizers():
        return Missing("minimizer", str(minimizer), task.name)
    for name in TASK_SETTINGS:
        if name not in task.settings and settings.get(name) not in (None, DEFAULTS[name]):
            return Missing("setting", name, task.name)
    return None


def check_chunks(cfg: RunConfig) -> None:
    """--m (m-sharpness) needs a minimizer whose step is a plain perturbation (its step_chunks)."""
    cls = MINIMIZERS.get(cfg.minimizer)
    if cls is not None and cfg.m and not cls.supports_chunks:
        able = ", ".join(n for n, c in MINIMIZERS.items() if c.supports_chunks)
        raise UserError(f"--m (m-sharpness) is not defined for {cfg.minimizer}; it is for: {able}. Pass --m 0")


def check_schedule(cfg: RunConfig) -> None:
    """--sam-from / --sam-every need a minimizer whose step is a two-pass perturbation a plain step may replace."""
    if not cfg.scheduled:
        return
    cls = MINIMIZERS.get(cfg.minimizer)
    if cls is None or not cls.schedulable:
        able = ", ".join(n for n, c in MINIMIZERS.items() if c.schedulable)
        flag = "--sam-from" if cfg.sam_from else "--sam-every"
        what = "the base optimizer alone" if cls is None else f"{cfg.minimizer}, whose step is not a two-pass one"
        raise UserError(f"{flag} schedules a two-pass minimizer's steps, not {what}; it is for: {able}")


def make_config(task_name: str, **overrides: Any) -> RunConfig:
    """The task's recipe defaults overridden by the given non-None settings, checked."""
    task = get_task(task_name)
    task_name = task.name  # an alias (e.g. a dataset name) runs as the task itself
    missing = missing_part(task_name, overrides.get("minimizer"), overrides)
    if missing is not None:
        raise UserError(missing.refused())
    model = overrides.get("model") or task.recipe().get("model")
    minimizer = MINIMIZERS.get(overrides["minimizer"])
    cfg = build_config(task_name, task.recipe(model), {**overrides, "model_rev": task.model_rev(model)}, task.Options,
                       minimizer.Hparams if minimizer is not None else None)
    check_chunks(cfg)
    check_schedule(cfg)
    if cfg.loader not in task.loader_kinds:
        raise UserError(f"--loader {cfg.loader} does not apply to task {task_name}: its data takes "
                        f"{' or '.join(task.loader_kinds)} (--loader device holds a whole in-memory image dataset on "
                        "the GPU: CIFAR, SVHN, Fashion-MNIST)")
    check_deterministic(cfg)
    task.check_config(cfg)
    return cfg
