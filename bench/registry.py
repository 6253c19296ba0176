"""The task registry, filled by a decorator as timm's @register_model: a new task is one new file.

Tasks in this repo live in the `tasks` package; third-party packages can add theirs through the
`sambench.tasks` entry-point group (each entry point names a module to import).
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from pathlib import Path

from bench.errors import UserError
from bench.task import Task

_TASKS: dict[str, Task] = {}
_ALIASES: dict[str, str] = {}  # other names a task answers to (e.g. a dataset name for `bench data`)
_loaded = False


def register_task(name: str, aliases: tuple[str, ...] = (), **kwargs):
    """Class decorator: `@register_task("cifar10", dataset="cifar10")` registers one instance."""
    def deco(cls: type[Task]) -> type[Task]:
        if name in _TASKS or name in _ALIASES:
            raise ValueError(f"task {name!r} registered twice")
        _TASKS[name] = cls(name, **kwargs)
        _ALIASES.update({a: name for a in aliases})
        return cls
    return deco


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("tasks")
    for ep in entry_points(group="sambench.tasks"):
        importlib.import_module(ep.value)


def tables_file() -> Path:
    """The paper tables' experiment matrix (tasks/tables.toml)."""
    return Path(importlib.import_module("tasks").__file__).with_name("tables.toml")


def task_names() -> list[str]:
    _load()
    return sorted(_TASKS)


def has_task(name: str) -> bool:
    _load()
    return name in _TASKS or name in _ALIASES


def get_task(name: str) -> Task:
    _load()
    name = _ALIASES.get(name, name)
    if name not in _TASKS:
        raise UserError(f"unknown task {name!r}; choose one of: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]
