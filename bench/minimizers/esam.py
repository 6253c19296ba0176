"""ESAM (Du et al., ICLR 2022): SAM with stochastic weight perturbation (SWP) and sharpness-sensitive data
selection (SDS).

One step, on a batch B of n examples:

1. forward/backward at w (kind "ascent"), keeping every example's loss l_i(w);
2. SWP: each parameter *tensor* with a gradient is kept with probability beta (mask m), and

       e = rho / (beta * (||m * g||_2 + 1e-7)) * m * g

   (the norm is over the kept tensors only; the others are not perturbed); w += e;
3. SDS: a no-grad forward of the whole batch at w + e gives l_i(w + e); the k = int(n * gamma) examples
   with the largest rise l_i(w + e) - l_i(w) are kept (in their batch order);
4. forward/backward at w + e on those k examples only (kind "descent"; the loss is their mean);
5. w is restored and the base optimizer steps with that gradient (every parameter, masked or not).

Cost per step: n + n + k examples forward, n + k backward (the engine's Cost counts them).

As the official code (github.com/dydjw9/Efficient_SAM, utils/Esam.py), read for this port:
- the mask is per parameter tensor, not per element (the paper's text speaks of a Bernoulli mask on the
  weights; the code draws one number per tensor), kept with probability beta;
- the radius is divided by beta for the kept tensors, and the norm is the norm of the masked gradient (the
  dropped tensors' gradients are zero there), with 1e-7 added (not SAM's 1e-16);
- the ranking uses the task's own training loss per example (the official code calls the same
  `loss_fct(reduction="none")` for training and ranking; here `Job.loss_per_sample`) at w and at w + e;
- the probe at w + e runs in train mode, so BatchNorm layers use the batch statistics and update their
  running statistics once more, and dropout draws fresh masks, as the official code (which never switches to
  eval mode); `bn_second_pass="freeze"` restores the statistics after the probe and the second pass;
- the second pass's loss is the mean over the selected examples (`loss_fct(...).mean()` on the subset).

Where we differ from the official code, and why:
- Count selected: the official code keeps the examples whose rise is *strictly greater* than the k-th
  largest (`instance_sharpness > cutoff`), i.e. k - 1 examples when there are no ties (fewer with ties), and
  fails (an empty `topk`) when int(n * gamma) = 0. We keep exactly k = max(1, int(n * gamma)) examples (the
  paper's |B+| = gamma |B|), ties broken by `torch.topk`. With gamma 0.5 and a batch of 8: 4, where the
  official code takes 3.
- All examples: the official code skips the selection when gamma >= 0.99 but still runs the probe forward.
  We skip the selection when k = n (gamma = 1, or n * gamma rounds down to n) and then skip the probe too:
  nothing uses it (it would only move the BatchNorm running statistics once more and cost a forward). For
  0.99 <= gamma < 1 we select int(n * gamma) examples, where the official code takes all of them.
- The mask draw: the official code draws it with Python's `random` at the end of each step, for the *next*
  step (the first step of a run is unmasked yet still divided by beta), and applies it by switching
  `requires_grad` off, so autograd skips the dropped tensors' weight gradients in the first backward. We
  draw it from torch's global (CPU) RNG in the step that uses it, so runs are reproducible and a resumed run
  is bit-identical (the engine checkpoints that RNG), and we compute the full first gradient and leave the
  dropped tensors out of the perturbation: the same update, without SWP's saving of those weight gradients.
  Toggling `requires_grad` between passes would change the model's autograd state under DDP's reducer and
  torch.compile's guards (a recompile at the least) and is not a minimizer's business (they see parameters,
  gradients and the batch); the official switch-back also re-enables every parameter of the optimizer, frozen
  or not. (The cost accounting counts examples, so it is the same either way.) With beta = 1 no number is
  drawn at all.
- The weights are restored by copying w back, not by subtracting e (as every minimizer here; see sam.py).
- The official code's `adaptive` switch (davda54's w^2 rule, off in its scripts) is not offered: see
  `sam_adaptive_all` for that rule.
- `second_pass_rng="reuse"` is refused: the second pass runs a subset of the batch, so the first pass's
  dropout masks cannot be replayed on it.
- `step_chunks` (m-sharpness) is not offered: the selection is defined on the whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.minimizers.base import Switches, as_batch, global_norm
from bench.minimizers.registry import register_minimizer
from bench.minimizers.sam import SAM
from bench.options import OptionError, option

EPS = 1e-7  # added to the norm of the masked gradient, as in the official code


@dataclass(frozen=True)
class ESAMHparams:
    """Du et al., "Efficient Sharpness-aware Minimization for Improved Training of Neural Networks", ICLR 2022
    (arXiv 2110.03141); official code github.com/dydjw9/Efficient_SAM. Defaults: the official run.sh's
    ResNet-18 CIFAR-10/100 lines (rho 0.05, beta 0.6, gamma 0.5); the same script uses beta 0.5 with rho 0.1
    (WRN) and rho 0.2 (PyramidNet-110), gamma 0.5 throughout."""
    rho: float = option(0.05, "radius of the L2 ball the weights are perturbed in (before the 1/beta)", ge=0)
    beta: float = option(0.6, "SWP: probability that a parameter tensor is perturbed", gt=0, le=1)
    gamma: float = option(0.5, "SDS: share of the batch, by rise of loss at w + e, in the second pass", gt=0, le=1)


def swp_mask(n: int, beta: float) -> list[bool]:
    """Which of n parameter tensors SWP perturbs: each with probability beta, drawn from torch's global CPU RNG
    (no draw when beta >= 1)."""
    if beta >= 1:
        return [True] * n
    return (torch.rand(n) < beta).tolist()


def selection_size(n: int, gamma: float) -> int:
    """Examples SDS keeps from a batch of n: int(n * gamma) (the official rounding), at least 1."""
    return min(n, max(1, int(n * gamma)))


def sharpest(before: torch.Tensor, after: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending, i.e. batch order) of the k examples whose loss rose most from `before` to `after`."""
    return torch.topk(after - before, k).indices.sort().values


@register_minimizer("esam")
class ESAM(SAM):
    """Efficient SAM (Du et al., 2022): stochastic weight perturbation + sharpness-sensitive data selection."""

    Hparams = ESAMHparams
    passes = 1 + 1 / 3 + 0.5  # nominal, default gamma: full fwd+bwd, a probe forward (1/3), gamma fwd+bwd
    supports_chunks = False
    citation = "Du et al., ICLR 2022 (arXiv 2110.03141); code: dydjw9/Efficient_SAM"

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module, switches: Switches | None = None,
                 **options):
        super().__init__(base_optimizer, model, switches, **options)
        if self.second_pass_rng != "fresh":
            raise OptionError("minimizer esam: second_pass_rng='reuse' is not supported (its second pass runs a "
                              "subset of the batch, so the first pass's dropout masks cannot be replayed)")
        self.passes = 1 + 1 / 3 + self.gamma

    @torch.no_grad()
    def ascent_step(self) -> None:
        """After the first backward: w += e on the tensors SWP keeps, then clear every gradient."""
        _, params = self.ascent_params()
        if not params:
            return
        kept = [p for p, keep in zip(params, swp_mask(len(params), self.beta)) if keep]
        if kept:
            grads = [p.grad for p in kept]
            scale = self.radius() / (global_norm(grads) + EPS) / self.beta  # the official order of operations
            torch._foreach_mul_(grads, scale)
            self.perturb(kept, grads)
        for p in params:
            p.grad = None

    def step(self, batch):
        """SWP ascent, SDS probe, second pass on the selected examples; returns the first pass's result."""
        batch = as_batch(batch)
        first, _ = self.first_pass(batch, per_sample=True)
        if self.skip_if_overflow(batch):
            return first
        self.ascent_step()
        n = first.per_sample.shape[0]
        k = selection_size(n, self.gamma)
        with torch.enable_grad(), self.second_pass():
            index = None
            if k < n:
                probe = batch("descent", backward=False, per_sample=True)
                index = sharpest(first.per_sample, probe.per_sample, k)
            batch("descent", index=index)
        self.descent_step(batch)
        return first
