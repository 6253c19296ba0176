"""ASAM (Kwon et al., ICML 2021): SAM with the element-wise normalisation T_w = |w| + eta, p = 2.

As the official code (SamsungLabs/ASAM `asam.py`):

    T = |w| + eta on parameters whose *name* contains "weight", T = 1 elsewhere
    e = rho * T^2 g / (||T g||_2 + 1e-16)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.minimizers.base import global_norm
from bench.minimizers.registry import register_minimizer
from bench.minimizers.sam import SAM
from bench.options import option


@dataclass(frozen=True)
class ASAMHparams:
    """Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural
    Networks", ICML 2021 (arXiv 2102.11600); official code github.com/SamsungLabs/ASAM. rho 0.5 is the official
    example's CIFAR-10 value; eta 0.01 is the official `ASAM` class's default, but the released example_cifar.py
    passes its own --eta, default 0.0, so the released CIFAR runs use eta 0 (tasks/cifar.toml does too). The
    paper's text could not be checked for eta."""
    rho: float = option(0.5, "radius of the ball in the normalised (T^-1 w) coordinates", ge=0)
    eta: float = option(0.01, "added to |w| in T_w, so zero weights still move", ge=0)


@register_minimizer("asam")
class ASAM(SAM):
    """Adaptive SAM (Kwon et al., 2021), element-wise normalisation with p = 2, as the official code."""

    Hparams = ASAMHparams
    citation = "Kwon et al., ICML 2021 (arXiv 2102.11600); code: SamsungLabs/ASAM"

    def _scaled_grads(self, names, params):
        grads = [p.grad for p in params]
        return grads, scale_by_weights(grads, params, [i for i, n in enumerate(names) if "weight" in n], self.eta)


def scale_by_weights(grads: list[torch.Tensor], params: list[torch.Tensor], idx: list[int], eta: float) -> torch.Tensor:
    """ASAM's normalisation in place: grads[i] <- T^2 g with T = |w| + eta for i in `idx` (T = 1 on the other
    gradients); returns ||T g|| over all of them. SAM-ON and sam_adaptive_all (eta 0, every parameter) share it."""
    if not idx:
        return global_norm(grads)
    scaled = [grads[i] for i in idx]
    t = torch._foreach_abs([params[i] for i in idx])
    if eta:
        torch._foreach_add_(t, eta)         # T = |w| + eta
    torch._foreach_mul_(scaled, t)          # T g
    norm = global_norm(grads)               # ||T g||
    torch._foreach_mul_(scaled, t)          # T^2 g
    return norm
