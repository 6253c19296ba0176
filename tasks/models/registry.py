"""CIFAR model zoo, filled by `@register_model` (as timm's registry): a new model is one new function.

`create_model(name, num_classes, in_chans=3)` builds any registered model (every builder takes
`num_classes` and `in_chans`: 1 for Fashion-MNIST's 1x28x28 images, 3 for CIFAR and SVHN; all pool
adaptively, so 28x28 and 32x32 inputs both work); `MODEL_INFO[name]` holds the published parameter count
the tests check against and where that figure comes from, and whether the model has dropout layers
(`MODEL_INFO[name]["dropout"]`: its builder then takes `dropout=p`, and builds no dropout module at p = 0, so
the network, its parameter names and its random stream are those of the model without dropout).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
MODEL_INFO: dict[str, dict] = {}


def register_model(name: str, *, params_m: float, source: str, recipe: dict | None = None, rev: str = "",
                   dropout: bool = False):
    """Register a builder `fn(num_classes, in_chans) -> nn.Module` with its published size (millions of parameters,
    CIFAR-10 head) and the source of that figure; `recipe` holds per-model training differences. `rev` names a
    model whose definition changed under the same name; it joins the run id (RunConfig.model_rev), so results
    of the earlier network are never counted as this one's. `dropout`: the builder also takes `dropout: float`
    (RunConfig.dropout; 0 must build the very model it builds without the argument)."""
    def deco(fn):
        _MODELS[name] = fn
        MODEL_INFO[name] = {"params_m": params_m, "source": source, "recipe": recipe or {}, "rev": rev,
                            "dropout": dropout}
        return fn
    return deco


def create_model(name: str, num_classes: int = 10, in_chans: int = 3, dropout: float = 0.0, **kwargs) -> nn.Module:
    """Build a registered model; `dropout` > 0 only for a model registered with dropout layers."""
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(sorted(_MODELS))}")
    if MODEL_INFO[name]["dropout"]:
        kwargs["dropout"] = dropout
    elif dropout:
        raise ValueError(f"model {name} has no dropout layers (dropout={dropout}); models with them: "
                         f"{', '.join(dropout_models()) or 'none'}")
    return _MODELS[name](num_classes=num_classes, in_chans=in_chans, **kwargs)


def model_names() -> list[str]:
    return sorted(_MODELS)


def dropout_models() -> list[str]:
    """The registered models whose builder takes `dropout`."""
    return [name for name in model_names() if MODEL_INFO[name]["dropout"]]


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C), the mean of each map: torch's adaptive average pooling, except under deterministic
    algorithms (--deterministic), where torch refuses that op's CUDA backward as possibly non-deterministic (it
    checks the op, not the 1x1 case, whose kernel is deterministic): then the plain mean, equal up to rounding."""
    if torch.are_deterministic_algorithms_enabled():
        return x.mean((2, 3))
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
