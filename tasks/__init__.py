"""Tasks, one module each, every one of them imported here (so registered with bench.registry): a new task is one
new file (and its recipe TOML). `images.py` (the generic torchvision image task and its options), `models/` and
`translation/` are helpers the tasks share, not tasks."""
from __future__ import annotations

import importlib
import pkgutil

_HELPERS = {"images"}
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg):
    if _mod not in _HELPERS and not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")
