"""SAM-ON (Mueller et al., NeurIPS 2023): the (A)SAM perturbation on the normalisation layers' affine parameters
only ("SAM-OnlyNorm").

Let N be the weight and bias of every normalisation layer that have a gradient. The first gradient g is used
on N only:

    adaptive=False (SAM-ON):  e = rho * g / (||g_N||_2 + 1e-16)
    adaptive=True (ASAM-ON):  T = |w| + eta (element-wise),  e = rho * T^2 g / (||T g_N||_2 + 1e-16)

with e = 0 on every other parameter, the norm taken over N alone. The second forward/backward at w + e gives
the gradient of *every* parameter, and the base optimizer steps with it (w restored first), as in SAM.

As the official code (github.com/mueller-mp/SAM-ON, sam_on.py: `SAM_ON` / `ASAM_ON` with `only_norm`, p = 2,
`elementwise`), read for this port: the norm over the perturbed parameters only, 1e-16 added to it, T = |w| +
eta element-wise, T on the biases too with `normalize_bias` (the README's command passes it), T = 1 on them
without; the first gradients of the unperturbed parameters are discarded; the weights are restored by copy.

Where we differ from the official code, and why:
- Which parameters: the official code picks them by *name* (`'norm' in name or 'bn' in name`; its README asks
  that every normalisation layer be named so). We pick them by module type: the weight and bias of every
  BatchNorm/SyncBatchNorm/InstanceNorm (`_NormBase`), LayerNorm, GroupNorm and RMSNorm module, subclasses
  included (timm's BatchNormAct2d, LayerNorm2d). The paper's method is "the affine normalisation parameters";
  a name test depends on how a model names its layers (a norm layer inside an `nn.Sequential` is named "1",
  and in the official code's SE-ResNeXt the squeeze-excitation layers sit inside `norm2`/`norm3`, so their
  linear layers are perturbed there too). On models whose norm layers are named norm*/bn* and hold nothing
  else, the two choices are the same parameters.
- "weight" vs bias, with normalize_bias=False: the official code applies T where `'weight' in name`; we apply
  it to each layer's `weight` attribute (the same parameters on normalisation layers).
- Not offered: the official code's p = infinity and layerwise variants, and `no_norm` (all but the norm
  layers); only its element-wise p = 2 rule, the one the paper and the README run.
- A model without any normalisation-layer parameter is refused at construction (the official code would fail
  on an empty norm; SAM-ON is undefined there).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.errors import UserError
from bench.minimizers.asam import scale_by_weights
from bench.minimizers.base import Switches
from bench.minimizers.registry import register_minimizer
from bench.minimizers.sam import SAM
from bench.options import option

NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@dataclass(frozen=True)
class SAMONHparams:
    """Mueller, Vlaar, Rolnick and Hein, "Normalization Layers Are All That Sharpness-Aware Minimization Needs",
    NeurIPS 2023 (arXiv 2306.04226); official code github.com/mueller-mp/SAM-ON. Defaults: the official README's
    command (WRN-28-10 on CIFAR-100): ASAM-ON, element-wise, p = 2, normalize_bias, rho 10, and train.py's
    default eta 0. With adaptive=false (SAM-ON) rho must be set to a SAM-scale radius (train.py's default is 0.5)."""
    rho: float = option(10.0, "radius of the perturbation of the normalisation parameters (10: ASAM-ON's scale)",
                        ge=0)
    adaptive: bool = option(True, "ASAM-ON (T = |w| + eta, element-wise) instead of SAM-ON")
    eta: float = option(0.0, "added to |w| in T when adaptive (the official train.py's default)", ge=0)
    normalize_bias: bool = option(True, "when adaptive, T on the norm layers' biases too (else T = 1 there)")


def norm_parameters(model: nn.Module) -> tuple[set, set]:
    """(every affine parameter of the model's normalisation layers, the `weight`s among them)."""
    params, weights = set(), set()
    for m in model.modules():
        if isinstance(m, NORM_TYPES):
            for name, p in m.named_parameters(recurse=False):
                params.add(p)
                if name == "weight":
                    weights.add(p)
    return params, weights


@register_minimizer("samon")
class SAMON(SAM):
    """SAM-ON / ASAM-ON (Mueller et al., 2023): the perturbation on the normalisation layers only."""

    Hparams = SAMONHparams
    citation = "Mueller et al., NeurIPS 2023 (arXiv 2306.04226); code: mueller-mp/SAM-ON"

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module, switches: Switches | None = None,
                 **options):
        super().__init__(base_optimizer, model, switches, **options)
        self._norm, self._norm_weights = norm_parameters(model)
        if not self._norm:
            raise UserError("minimizer samon: this model has no normalisation layer with parameters (BatchNorm, "
                            "LayerNorm, GroupNorm, ...): SAM-ON perturbs only those; use sam or asam")

    def _with_grad(self):
        """The normalisation parameters with a gradient: the only ones ascent_step perturbs."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None and p in self._norm]
        return [n for n, _ in named], [p for _, p in named]

    def _scaled_grads(self, names, params):
        grads = [p.grad for p in params]  # the normalisation parameters only (_with_grad): the norm is over them
        idx = [i for i, p in enumerate(params) if self.normalize_bias or p in self._norm_weights] if self.adaptive else []
        return grads, scale_by_weights(grads, params, idx, self.eta)

    @torch.no_grad()
    def ascent_step(self) -> None:
        """Perturb the normalisation parameters; the other parameters' first gradients are discarded."""
        super().ascent_step()
        for p in self.model.parameters():
            p.grad = None
