"""F-SAM, Friendly SAM (Li et al., CVPR 2024): SAM whose perturbation leaves out an estimate of the full
gradient, an exponential moving average of past mini-batch gradients, so it follows the batch's gradient
noise.

One step, in the order of the official code (nblt/F-SAM, `utils.py`, class FriendlySAM, first_step):

    g   = grad L(w)                                  first pass, kind "ascent"
    first step (no m yet):  d = g,              m <- g
    later steps:            d = g - sigma * m,  m <- lmbda * m + (1 - lmbda) * g
    e   = rho * d / (||d|| + 1e-12)
    w  <- base_step(w, grad L(w + e))                second pass, kind "descent": SAM's update

So d is formed with the momentum *before* this step's gradient enters it (m_{t-1}), and m starts at the first
gradient (not at zero), so the first step is plain SAM. The paper's algorithm, as it is transcribed
elsewhere, writes d_t = g_t - sigma * m_t with m_t already updated; we follow the code, which produced the
paper's results (not checked against the paper's own text, which was not at hand). m is kept
per parameter (lazily started at that parameter's first gradient, as the code's per-parameter state) and
checkpointed.

Where ours differs from the official code, and why:
- m is updated from d instead of g: m <- (lmbda + (1 - lmbda) sigma) m + (1 - lmbda) d, which is
  lmbda m + (1 - lmbda) g since d = g - sigma m; equal up to rounding, computed in place with no
  parameter-sized temporary.
- The weights are restored by copying (the official code does too); norms are in fp32 at least.
- BatchNorm: the official training loop sets BatchNorm momentum to 0 in the second pass (running statistics
  unchanged); ours follows the engine's `bn_second_pass` (default "update"), the one switch every minimizer of
  the family shares.
- Data parallel (the official code runs on one device): `ascent_sync` all-reduces the first gradient, so m
  is the same on every replica and the checkpoint (written by rank 0) resumes every replica exactly; the
  perturbation then uses the global batch's noise (m = global batch), not each replica's own.
- Not implemented: the official `adaptive` flag (e scaled by w^2; 0 in all the official scripts). No
  m-sharpness chunks (`--m`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.minimizers.base import Switches, global_norm
from bench.minimizers.registry import register_minimizer
from bench.minimizers.sam import SAM
from bench.options import option

PERTURB_EPS = 1e-12  # added to ||d||, as the official code


@dataclass(frozen=True)
class FSAMHparams:
    """Li, Zhou, He, Cheng and Huang, "Friendly Sharpness-Aware Minimization", CVPR 2024 (arXiv 2403.12350);
    official code github.com/nblt/F-SAM. rho 0.2, sigma 1 and lmbda 0.6 are the official run.sh (CIFAR-100,
    ResNet-18; its committed log reaches 81.19% there, 81.32% with lmbda 0.95); train.py's own argparse
    defaults are rho 0.1, lmbda 0.95."""
    rho: float = option(0.2, "radius of the L2 ball the weights are perturbed in", ge=0)
    sigma: float = option(1.0, "how much of the full-gradient estimate m is taken out of g: d = g - sigma m", ge=0)
    lmbda: float = option(0.6, "lambda, the EMA decay of m (the full-gradient estimate)", ge=0, lt=1)


@register_minimizer("fsam")
class FSAM(SAM):
    """Friendly SAM (Li et al., 2024), as the official code (see the module docstring)."""

    Hparams = FSAMHparams
    passes = 2
    ascent_sync = True      # m is carried across steps: it must be the same on every replica
    supports_chunks = False
    eps = PERTURB_EPS
    citation = "Li et al., CVPR 2024 (arXiv 2403.12350); code: nblt/F-SAM"

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module, switches: Switches | None = None,
                 **options):
        super().__init__(base_optimizer, model, switches, **options)
        self._m: dict[torch.Tensor, torch.Tensor] = {}  # the EMA of first gradients, by parameter

    def _scaled_grads(self, names, params):
        """d = g - sigma m (in the gradient buffers) and ||d||, m updated: SAM's ascent_step then perturbs
        w += rho d / (||d|| + 1e-12)."""
        old = [p for p in params if p in self._m]
        for p in params:
            if p not in self._m:  # its first gradient: d = g, m = g
                self._m[p] = p.grad.detach().clone()
        if old:
            grads, ms = [p.grad for p in old], [self._m[p] for p in old]
            torch._foreach_add_(grads, ms, alpha=-self.sigma)                    # d = g - sigma m
            torch._foreach_mul_(ms, self.lmbda + (1 - self.lmbda) * self.sigma)  # m <- lmbda m + (1 - lmbda) g
            torch._foreach_add_(ms, grads, alpha=1 - self.lmbda)
        d = [p.grad for p in params]
        return d, global_norm(d)

    def extra_state(self) -> dict:
        names = {p: n for n, p in self.model.named_parameters()}
        return {"m": {names[p]: m.detach().clone() for p, m in self._m.items() if p in names}}

    def load_extra_state(self, state: dict) -> None:
        params = dict(self.model.named_parameters())
        self._m = {params[n]: m for n, m in self.on_params(state.get("m", {})).items()}
