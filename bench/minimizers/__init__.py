"""The minimizers: one module per minimizer, each registering itself with `@register_minimizer("name")`.

`base.py` holds the step contract (what the engine hands a minimizer each step) and the plain one-pass
minimizer; `sam.py` the two-pass step the family shares. Every other module of this package is imported
here, so a new minimizer is one new file. Minimizers see parameters, gradients and the batch callable,
never data or files.
"""
from __future__ import annotations

import importlib
import pkgutil

from bench.minimizers.asam import ASAM  # noqa: F401
from bench.minimizers.base import Minimizer, Pass, Switches, as_batch, global_norm  # noqa: F401
from bench.minimizers.registry import (  # noqa: F401
    BASE_NAMES,
    MINIMIZERS,
    create_minimizer,
    minimizer_class,
    option_names,
    register_minimizer,
)
from bench.minimizers.sam import SAM  # noqa: F401
from bench.minimizers.scaler import LossScaler  # noqa: F401
from bench.options import OptionError, make_options  # noqa: F401

_SUPPORT = {"base", "registry", "scaler", "sam", "asam"}
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in _SUPPORT and not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")
