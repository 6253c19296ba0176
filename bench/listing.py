"""What `bench list` prints: every task (models, recipe, the minimizer options its recipe sets) and every
registered minimizer (options with default, range and meaning; the paper and code it follows)."""
from __future__ import annotations

from dataclasses import fields

from bench.minimizers import MINIMIZERS
from bench.minimizers.base import describe_range
from bench.registry import get_task, task_names

RECIPE_KEYS = ("optimizer", "epochs", "batch_size", "lr", "momentum", "weight_decay", "label_smoothing", "schedule")


def task_lines(name: str) -> list[str]:
    task = get_task(name)
    recipe = task.recipe()
    opts = "; ".join(f"{m} " + " ".join(f"{k}={v}" for k, v in sorted(o.items(), key=lambda kv: kv[0] != "rho"))
                     for m, o in recipe.get("minimizers", {}).items())
    keys = (*RECIPE_KEYS, *task.settings)
    return [f"[bold]{name}[/]: {task.description}",
            f"  models:     {', '.join(task.models())} (default {recipe.get('model')})",
            f"  minimizers: {', '.join(task.minimizers())}" + (f" (recipe: {opts})" if opts else ""),
            "  recipe:     " + ", ".join(f"{k}={recipe[k]}" for k in keys if k in recipe)]


def minimizer_lines() -> list[str]:
    lines = ["[bold]minimizers[/] (+ each task's base optimizer alone; options: --mopt KEY=VALUE, or "
             "\\[minimizers.<name>] in a recipe)"]
    for name, cls in MINIMIZERS.items():
        lines.append(f"  [bold]{name}[/]  {cls.passes:g} passes/step nominal; {cls.citation}")
        for f in fields(cls.Hparams):
            setting = f"{f.name}={f.default!r}"
            lines.append(f"    {setting:<20} {describe_range(f)}: {f.metadata.get('help', '')}")
    return lines


def list_lines() -> list[str]:
    return [line for name in task_names() for line in task_lines(name)] + minimizer_lines()
