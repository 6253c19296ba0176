"""CIFAR-10 with symmetric label noise (ASAM Table 6), task `cifar10-noise`.

Each training label is, with probability `--noise`, replaced by a class drawn uniformly from the *other*
nine. The corruption comes from its own seed (`--noise-seed`), never from the run's seed, so SGD, SAM
and ASAM (and every training seed) see the very same noisy labels. Test labels stay clean. The corruption
itself is the generic image task's (`tasks.images.symmetric_noise`, applied to any image task that lists
"noise" in its settings).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.registry import register_task
from bench.task import load_toml, merge_recipe
from tasks.cifar import CifarTask
from tasks.images import symmetric_noise  # noqa: F401 (its historical home: tests and digits import it here)

NOISE_RECIPE = load_toml(Path(__file__).with_name("label_noise.toml"))


@register_task("cifar10-noise", dataset="cifar10",
               description="CIFAR-10 with symmetric label noise, ASAM Table 6 (--noise, --noise-seed)")
class LabelNoiseTask(CifarTask):
    settings = ("noise", "noise_seed", "augment", "dropout")

    def recipe(self, model: str | None = None) -> dict[str, Any]:
        return merge_recipe(super().recipe(model), NOISE_RECIPE)
