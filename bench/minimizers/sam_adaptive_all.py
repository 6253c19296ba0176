"""The `adaptive=True` SAM of davda54/sam and pytorch-optimizer: an element-wise adaptive perturbation on every
parameter, with no eta.

    e = rho * w^2 * g / (|| |w| * g ||_2 + 1e-12)     (on every parameter with a gradient)

then SAM's second pass at w + e and the base step with that gradient (w restored first).

It is *not* ASAM (Kwon et al., ICML 2021; `asam` here, as SamsungLabs/ASAM): ASAM uses T = |w| + eta, and only
on parameters whose name contains "weight" (T = 1 on biases); this rule uses T = |w| with no eta on every
parameter, biases and normalisation layers included, so a parameter at exactly 0 (a bias at its usual
initialisation) is never perturbed. It is the rule that `SAM(..., adaptive=True)` of github.com/davda54/sam
(sam.py) and `pytorch_optimizer.SAM(adaptive=True)` (github.com/kozistr/pytorch_optimizer,
optimizer/sam.py) compute: `torch.pow(p, 2) * p.grad * rho / (norm + 1e-12)` with the norm of
`torch.abs(p) * p.grad`; the eps 1e-12 is both codes' (davda54 hard-codes it, pytorch-optimizer's
`perturb_eps` defaults to it).

Where we differ from those codes, and why:
- The order of operations: they form w^2 * g * (rho / norm); we form |w| * (|w| * g) * (rho / norm), reusing
  the |w| * g of the norm (fused kernels, no extra buffer); the same value up to rounding.
- The weights are restored by copying w back (as davda54's `p.data = old_p`; see sam.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.minimizers.asam import scale_by_weights
from bench.minimizers.registry import register_minimizer
from bench.minimizers.sam import SAM
from bench.options import option

EPS = 1e-12  # added to the norm, as davda54/sam and pytorch-optimizer's default perturb_eps


@dataclass(frozen=True)
class SAMAdaptiveAllHparams:
    """The `adaptive=True` option of davda54/sam (github.com/davda54/sam, an unofficial SAM/ASAM port) and of
    pytorch-optimizer's SAM, after Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks", ICML 2021 (arXiv 2102.11600). rho 2.0 is davda54's
    example/train.py default for adaptive=True and the value its README gives ("ASAM is set to rho=2.0, as
    suggested by its authors", davda54/sam issue 37)."""
    rho: float = option(2.0, "radius of the ball in the |w|-normalised coordinates", ge=0)


@register_minimizer("sam_adaptive_all")
class SAMAdaptiveAll(SAM):
    """davda54/sam's adaptive=True: e = rho w^2 g / || |w| g || on every parameter, no eta. Not ASAM."""

    Hparams = SAMAdaptiveAllHparams
    eps = EPS
    citation = ("adaptive=True of davda54/sam and pytorch-optimizer's SAM, after Kwon et al., ICML 2021 "
                "(arXiv 2102.11600); not the official ASAM (see asam)")

    def _scaled_grads(self, names, params):
        grads = [p.grad for p in params]
        return grads, scale_by_weights(grads, params, list(range(len(params))), 0.0)  # w^2 g, || |w| g ||
