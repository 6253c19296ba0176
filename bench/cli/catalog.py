"""What `bench list` prints: every task (models, recipe, the minimizer options its recipe sets) and every
registered minimizer (options with default, range and meaning; the paper and code it follows)."""
from __future__ import annotations

from dataclasses import fields
from typing import Annotated

import typer

from bench.cli.console import console, user_errors
from bench.errors import UserError
from bench.minimizers import MINIMIZERS
from bench.options import describe_range
from bench.registry import get_task, task_names

RECIPE_KEYS = ("optimizer", "epochs", "batch_size", "lr", "momentum", "weight_decay", "label_smoothing", "schedule")


def task_lines(name: str) -> list[str]:
    task = get_task(name)
    recipe = task.recipe()
    opts = "; ".join(f"{m} " + " ".join(f"{k}={v}" for k, v in sorted(o.items(), key=lambda kv: kv[0] != "rho"))
                     for m, o in recipe.get("minimizers", {}).items())
    lines = [f"[bold]{name}[/]: {task.description}",
             f"  models:     {', '.join(task.models())} (default {recipe.get('model')})",
             f"  minimizers: {', '.join(task.minimizers())}" + (f" (recipe: {opts})" if opts else ""),
             "  recipe:     " + ", ".join(f"{k}={recipe[k]}" for k in RECIPE_KEYS if k in recipe)]
    if fields(task.Options):
        lines.append("  options (--topt KEY=VALUE; the recipe's value, else the default):")
        lines += option_lines(task.Options, recipe)
    return lines


def option_lines(cls: type, values: dict | None = None) -> list[str]:
    """One line per declared option: name=value, its range, its meaning."""
    out = []
    for f in fields(cls):
        setting = f"{f.name}={(values or {}).get(f.name, f.default)!r}"
        out.append(f"    {setting:<20} {describe_range(f)}: {f.metadata.get('help', '')}")
    return out


def minimizer_lines() -> list[str]:
    lines = ["[bold]minimizers[/] (+ each task's base optimizer alone; options: --mopt KEY=VALUE, or "
             "\\[minimizers.<name>] in a recipe)"]
    for name, cls in MINIMIZERS.items():
        lines.append(f"  [bold]{name}[/]  {cls.passes:g} passes/step nominal; {cls.citation}")
        lines += option_lines(cls.Hparams)
    return lines


def list_lines() -> list[str]:
    return [line for name in task_names() for line in task_lines(name)] + minimizer_lines()


def list_cmd():
    """Tasks (their models, recipes and minimizer options) and every minimizer with its options."""
    from bench.cli.catalog import list_lines

    with user_errors():
        for line in list_lines():
            console.print(line, highlight=False)


def data_fake_cmd(
    name: Annotated[str, typer.Argument(help="Dataset / task name, e.g. cifar10.")],
    out_dir: Annotated[str, typer.Argument(help="Folder to write into (use it as --data-dir).")],
    train: Annotated[int, typer.Option(help="Training examples (CIFAR).")] = 2000,
    test: Annotated[int, typer.Option(help="Test examples (CIFAR).")] = 500,
    classes: Annotated[int, typer.Option(help="Classes (ImageNet).")] = 4,
    per_class: Annotated[int, typer.Option(help="Training images per class (ImageNet; val gets half).")] = 8,
    seed: Annotated[int, typer.Option()] = 0,
):
    """Write a small synthetic dataset in the real on-disk format."""
    from bench.registry import get_task

    with user_errors():
        msg = get_task(name).make_fake(out_dir, train=train, test=test, classes=classes, per_class=per_class,
                                       seed=seed)
        console.print(msg, highlight=False)


def data_prepare_cmd(
    name: Annotated[str, typer.Argument(help="Dataset, e.g. iwslt14.")],
    raw: Annotated[str, typer.Option(help="The downloaded archive (e.g. de-en.tgz) or its extracted folder.")],
    out: Annotated[str, typer.Option(help="Folder for the prepared corpus (use it as --data-dir).")] = "data/iwslt14",
    bpe_merges: Annotated[int, typer.Option(help="Joint BPE merges.")] = 10000,
):
    """Turn a raw dataset archive into the corpus the task trains on (IWSLT'14: prepare-iwslt14.sh)."""
    from bench.registry import get_task

    with user_errors():
        task = get_task(name)
        if not hasattr(task, "prepare"):
            raise UserError(f"task {task.name!r} needs no preparation")
        console.print(task.prepare(raw, out, bpe_merges=bpe_merges), highlight=False)
