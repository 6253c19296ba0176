"""The minimizer registry, filled by `@register_minimizer("name")` as timm's model registry: a new minimizer
is one new file in this package (imported by bench/minimizers/__init__.py) or in a plugin package."""
from __future__ import annotations

from dataclasses import fields

import torch
from torch import nn

from bench.errors import UserError

MINIMIZERS: dict[str, type] = {}
# Names that mean "the base optimizer alone" (bench.config.OPTIMIZERS; tasks name theirs in base_optimizer).
BASE_NAMES = ("sgd", "adam", "adamw")


def register_minimizer(name: str):
    def deco(cls):
        if name in MINIMIZERS or name in BASE_NAMES:
            raise ValueError(f"minimizer {name!r} registered twice")
        cls.name = name
        MINIMIZERS[name] = cls
        return cls
    return deco


def minimizer_class(name: str, base_names: tuple[str, ...] = BASE_NAMES) -> type:
    """The class of a registered minimizer, or the plain Minimizer for a base optimizer's name."""
    from bench.minimizers.base import Minimizer
    if name in MINIMIZERS:
        return MINIMIZERS[name]
    if name in base_names:
        return Minimizer
    raise UserError(f"unknown minimizer {name!r}; choose one of: {', '.join(MINIMIZERS)}, or a base "
                    f"optimizer alone: {', '.join(base_names)}")


def option_names(name: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(minimizer_class(name, (name,)).Hparams))


def create_minimizer(name: str, base_optimizer: torch.optim.Optimizer, model: nn.Module, switches=None, *,
                     base_names: tuple[str, ...] = BASE_NAMES, **options):
    """Build a minimizer by name with its options (checked against its ranges: one it does not have is refused)
    and the engine's `Switches`. A name in `base_names` (a task's base optimizer: "sgd", "adam") means the base
    optimizer alone, which has no options; any other name must be registered: a typo must not silently train
    without SAM."""
    return minimizer_class(name, base_names)(base_optimizer, model, switches, **options)
