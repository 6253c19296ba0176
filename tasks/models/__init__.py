"""The CIFAR model zoo: one module per family, each registering its builders with `@register_model`
(tasks/models/registry.py, as timm's registry); importing this package imports them all, so a new model is one
new function in one of them (or one new file here)."""
from __future__ import annotations

import importlib
import pkgutil

from tasks.models.registry import (  # noqa: F401
    MODEL_INFO,
    count_params,
    create_model,
    dropout_models,
    global_avg_pool,
    model_names,
    register_model,
)

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "registry" and not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")
