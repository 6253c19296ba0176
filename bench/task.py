"""What a task hands the engine, and the base class tasks derive from.

A task (one file under tasks/) knows its data, models, loss, metrics and recipe defaults. It gives the
engine plain objects in a `Job`; the engine knows no task.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from bench.options import NoOptions, option_names

# The file whose presence marks a dataset folder as written by `bench data fake`: such runs are labelled
# synthetic and never mixed with real-data runs.
SYNTHETIC_MARKER = "SYNTHETIC"


@dataclass
class Job:
    model: nn.Module
    train_loader: Iterable            # yields (inputs, targets) batches
    test_loader: Iterable
    loss_fn: Callable                 # training loss(outputs, targets)
    num_train: int                    # training examples per epoch (for images/s)
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None  # None: classification accuracy
    track: tuple[str, ...] = ("test_acc",)  # metrics whose max and final value go into the results row
    topk: tuple[int, ...] = (1,)      # default evaluation: top-k accuracies (test_acc, test_top5, ...)
    count: Callable | None = None     # examples in a target batch for averaging (default: y.shape[0])
    finalize: Callable[[nn.Module], dict[str, Any]] | None = None  # after training: extra row metrics
    # What the task keeps between epochs (e.g. the best weights so far): saved in every checkpoint and handed
    # back on resume. Tensors and plain Python values only (checkpoints are loaded with weights_only=True).
    state_dict: Callable[[], dict[str, Any]] | None = None
    load_state_dict: Callable[[dict[str, Any]], None] | None = None
    # Each example's training loss (outputs, targets) -> (n,), for minimizers that rank examples (ESAM);
    # None: plain cross entropy on classification outputs.
    loss_per_sample: Callable | None = None
    synthetic: bool = False           # trained on generated data: never mixed with real runs in reports
    fixed_batch: bool = True          # every training batch has batch_size examples but an epoch's last (False:
                                      # token-bucketed batches of varying size; torch.compile then compiles dynamic)
    info: dict[str, Any] = field(default_factory=dict)  # extra task facts for the results row


class Task:
    """Base class of a task; register a subclass with `@register_task("name", **kwargs)`."""

    name: str = ""
    description: str = ""
    base_optimizer: str = "sgd"
    Options: type = NoOptions  # its own options, declared as a minimizer's Hparams are (bench.options)
    loader_kinds: tuple[str, ...] = ("auto",)  # the --loader values this task honours (any other is refused)

    def __init__(self, name: str, **kwargs: Any):
        self.name = name
        for key, value in kwargs.items():
            setattr(self, key, value)

    @property
    def settings(self) -> tuple[str, ...]:
        """The names of its options (those of the shorthand flags among them: noise, augment, ...)."""
        return option_names(self.Options)

    def recipe(self, model: str | None = None) -> dict[str, Any]:
        """Recipe defaults: RunConfig fields plus `minimizers` ({name: {option: value}}, the TOML's
        `[minimizers.<name>]` tables) and `models`. With a model, including that model's own differences."""
        raise NotImplementedError

    def models(self) -> list[str]:
        return list(self.recipe().get("models", []))

    def has_model(self, name: str) -> bool:
        return name in self.models()

    def model_rev(self, name: str) -> str:
        """The revision of a model whose definition changed under its name ('' for none): part of run ids."""
        return ""

    def minimizers(self) -> list[str]:
        from bench.minimizers import MINIMIZERS
        return [self.base_optimizer, *MINIMIZERS]

    def check_config(self, cfg) -> None:
        """Refuse settings this task cannot run together (a UserError of one line); called by make_config."""

    def build(self, cfg, device: torch.device) -> Job:
        raise NotImplementedError

    def make_model(self, name: str) -> nn.Module:
        """A freshly initialised model of this task (for `bench perf`)."""
        from bench.errors import UserError
        raise UserError(f"task {self.name!r} cannot build a model on its own for `bench perf`")

    def measure_examples(self, cfg, n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The first n examples of the training and of the test split, (x_train, y_train, x_test, y_test) tensors
        on `device`, for `bench sharpness`: in the dataset's own order, as evaluation sees them (no
        augmentation), training targets as the run trained on them (noisy labels for a label-noise task). n
        larger than the training set is a UserError (`check_examples`); the test split gives what it has."""
        from bench.errors import UserError
        raise UserError(f"task {self.name!r} gives no examples for `bench sharpness` (classification tasks do)")

    def data_status(self, data_dir: str | Path) -> DataStatus | None:
        """Whether this task's data is under `data_dir`, by the presence of its files alone (None: the task has
        no such check; `bench run` then says what it misses)."""
        return None

    def make_fake(self, out_dir: str, **options: Any) -> str:
        """Write a small synthetic dataset in the real on-disk format; return a one-line summary."""
        from bench.errors import UserError
        raise UserError(f"task {self.name!r} has no synthetic data generator")


@dataclass(frozen=True)
class DataStatus:
    """Where a task's data is under a --data-dir, by file checks only (`bench doctor`: no dataset is loaded)."""
    found: Path | None     # the folder holding the files, or None
    looked: str            # where the task looks (its own words)
    how: str = ""          # how to get the data
    bundled: bool = False  # shipped with a package: nothing to look for


def holding(folder: Path, names: list[str]) -> Path | None:
    """`folder` if it holds every one of the files `names`, else None."""
    return folder if all((folder / n).is_file() for n in names) else None


def check_examples(task: str, n: int, have: int) -> None:
    """`bench sharpness --examples n` on a training split of `have` examples."""
    if n > have:
        from bench.errors import UserError
        raise UserError(f"--examples {n} is more than the {have} training examples of task {task}; pass at most "
                        f"{have}")


def merge_recipe(recipe: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`recipe` updated by `update`, in place; the `minimizers` tables merge option by option (a dataset's
    rho keeps the common eta)."""
    for key, value in update.items():
        if key == "minimizers":
            merged = {name: dict(opts) for name, opts in recipe.get("minimizers", {}).items()}
            for name, opts in value.items():
                merged.setdefault(name, {}).update(opts)
            recipe["minimizers"] = merged
        else:
            recipe[key] = value
    return recipe


def cross_entropy_per_example(smoothing: float = 0.0) -> Callable:
    """(outputs, targets) -> each example's cross entropy with label smoothing: per example, what timm's
    LabelSmoothingCrossEntropy and nn.CrossEntropyLoss(label_smoothing=...) average (a task's
    Job.loss_per_sample)."""
    return lambda out, y: nn.functional.cross_entropy(out.float(), y, reduction="none", label_smoothing=smoothing)
