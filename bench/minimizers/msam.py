"""Momentum-SAM, MSAM (Becker, Altrock and Risse, 2024): SAM's perturbation taken along the base optimizer's
momentum instead of a fresh gradient, so a step costs one forward/backward pass, as the base optimizer alone.

The paper's update (its Algorithm 1, SGD with momentum mu, learning rate lr), w the unperturbed weights and v
the momentum buffer:

    w~_t    = w_t - rho * v_t / ||v_t||             (global L2 norm; v_0 = 0: no perturbation at the first step)
    g_t     = grad L(w~_t)                          the step's only pass
    v_{t+1} = mu * v_t + g_t
    w_{t+1} = w_t - lr * v_{t+1}

The official code (MarlonBecker/MSAM, `optimizer/msam.py` and `main.py`) keeps the parameters at w~ *between*
steps: its `step()` adds rho * v_t / (||v_t|| + 1e-12) back (w~ -> w), takes the SGD step, and subtracts
rho * v_{t+1} / (||v_{t+1}|| + 1e-12) (w -> w~_{t+1}), so the one forward/backward of the next step is at the
perturbed point. The training loop calls `move_up_to_momentumAscent()` (w -> w~) before each epoch and
`move_back_from_momentumAscent()` (w~ -> w) after it, before the test pass and the checkpoint: it evaluates and
saves the *unperturbed* weights; the README asks for `move_back_from_momentumAscent()` at the end of training
when rho is not decayed to 0 (its `main.py` calls it after every epoch, the last included).

One step here takes the same gradient at the same point, but leaves the parameters at w between steps:

    e   = rho * v / (||v|| + 1e-12)                 v: SGD's `momentum_buffer` (Adam/AdamW: `exp_avg`), as it
                                                    stands before this step; none yet (first step): e = 0
    w  <- w - e                                     (the official's state between steps, w~)
    g   = grad L(w - e)                             kind "plain", the training metrics (the official logs the
                                                    loss at w~ too: it is the only pass)
    w  <- w + e                                     (the official's step() opening)
    w  <- base_step(w, g - wd * e)                  torch's SGD adds wd * w: the update sees g + wd * (w - e),
                                                    the official's decay at the perturbed weights

Moving w -> w~ at the start of step t+1 instead of at the end of step t is the same point (v does not change
in between), so the gradients, momentum and weights are the official ones up to rounding (w - e + e, which the
official code computes too). The engine's evaluation, checkpoints, metrics and the final model therefore see
w, which is what the official code evaluates and saves after its `move_back_from_momentumAscent()`; nothing
has to be called at the end of training or around evaluation, and a resume needs nothing but the base
optimizer's state (`tests/minimizers/test_msam.py` checks all this against a transcription of the official
class and loop, including its between-epoch moves).

Official defaults (README and `configs/`, for CIFAR-100 WRN-16-4 and ResNet-50 and for ImageNet): rho 3,
with SGD momentum 0.9 (no Nesterov), weight decay 5e-4 (WRN) / 1e-3 (ResNet-50), lr 0.5 (WRN) / 0.1, batch 256,
200 epochs, label smoothing 0.1, a constant rho (`rhoScheduler = const`). The class's own signature default,
rho 0.3, is not used by any official run. AdamW_MSAM (ViT on ImageNet) uses rho 3 too.

Where ours differs from the official code, and why:
- The parameters hold w between steps (above): the same arithmetic, moved inside step(), so the engine needs no
  hook around evaluation or checkpoints. The official's rho scheduler (constant in every official config)
  would un-perturb with the new rho what the old rho perturbed; here rho is constant within a run.
- BatchNorm: the running statistics are updated by the passes at w~, as in the official code. After the last
  epoch the official `main.py` (not for ViT) runs one more forward-only epoch over the training data in
  train mode at w (no gradients) to recompute them, then tests and saves again; the per-epoch test results are
  without it. That pass needs the data, so it is the engine's: `recalibrate_bn_at_end` says this minimizer
  asks for it. Not done here.
- Base optimizer: torch's SGD or Adam/AdamW, any number of parameter groups (the official MSAM is its own copy
  of SGD, one group, no Nesterov, no dampening; AdamW_MSAM its own AdamW). The buffer is the same recurrence:
  the official starts it at zeros, so its first buffer is d, torch's clone of d. Dampening only scales it and
  the direction is normalized, so e is unchanged; with Nesterov the update is torch's Nesterov step and e still
  follows the buffer. Adam's e follows exp_avg, as AdamW_MSAM (its bias correction cancels in the norm).
- The norm is taken over every parameter that has a buffer, in fp32 at least (official: over the parameters
  with a gradient at that step, in their dtype; the same when every parameter gets a gradient at every step).
  A parameter without a gradient at a step is perturbed and restored with the others (official: left at its
  old perturbation while the others move to the new one).
- Weight decay: the official adds wd * w~ to the (clipped) gradient, i.e. decays at the perturbed weights; torch's
  SGD and Adam add wd * w at the step, so -wd * e is added to the gradient just before it (after the engine's
  clipping, which the official main.py applies to the loss gradient alone too). With `--weight-decay-style
  loss` the L2 term is in the loss and so at w~ already. AdamW: decoupled decay of w, as the official, but
  torch decays before the Adam update and AdamW_MSAM after it (a difference of lr^2 * wd * update).
- fp16 (the official runs in fp32): a step whose pass overflowed is skipped (weights back at w, momentum
  unchanged, so the next step perturbs along the same v).
- Momentum 0 (Adam: beta1 0) is refused: torch's SGD then keeps no buffer (the official one would keep the last
  d and perturb along it, a one-step-late SAM, not the method). Other base optimizers are refused.
- Data parallel: the pass is an ordinary one (all-reduced), the buffers are the same on every replica, so
  every replica perturbs alike. No m-sharpness chunks (`--m`), and no --sam-from / --sam-every (a one-pass
  method: `schedulable` False).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.minimizers.base import Minimizer, Switches, as_batch, global_norm
from bench.minimizers.registry import register_minimizer
from bench.options import OptionError, option

EPS = 1e-12  # added to ||v||, as the official code


@dataclass(frozen=True)
class MSAMHparams:
    """Becker, Altrock and Risse, "Momentum-SAM: Sharpness Aware Minimization without Computational Overhead",
    2024 (arXiv 2401.12033); official code github.com/MarlonBecker/MSAM. rho 3 is the README's and configs'
    value for every run (CIFAR-100 WRN-16-4 and ResNet-50, ImageNet ResNet-50 and ViT); the MSAM class's own
    signature default, 0.3, is used by none."""
    rho: float = option(3.0, "radius of the perturbation -rho v / ||v|| along the base optimizer's momentum v", ge=0)


def momentum_key(base: torch.optim.Optimizer) -> str:
    """The base optimizer's state entry that holds its momentum: SGD's `momentum_buffer`, Adam's `exp_avg`; a
    base optimizer without momentum is refused in one line."""
    if isinstance(base, torch.optim.SGD):
        if any(not g["momentum"] > 0 for g in base.param_groups):
            raise OptionError("minimizer msam perturbs along SGD's momentum buffer, but the momentum is 0: set "
                              "--momentum above 0 (0.9 in the official runs), or train with sgd alone")
        return "momentum_buffer"
    if isinstance(base, torch.optim.Adam):  # AdamW too (a subclass)
        if any(not g["betas"][0] > 0 for g in base.param_groups):
            raise OptionError("minimizer msam perturbs along Adam's first moment, but beta1 (--momentum) is 0: "
                              "set it above 0 (0.9 in the official AdamW runs)")
        return "exp_avg"
    raise OptionError(f"minimizer msam perturbs along the base optimizer's momentum: it needs SGD with momentum, "
                      f"Adam or AdamW, not {type(base).__name__}")


@register_minimizer("msam")
class MSAM(Minimizer):
    """Momentum-SAM (Becker et al., 2024): one pass at w - rho v / ||v|| (see the module docstring)."""

    Hparams = MSAMHparams
    passes = 1
    reports_gap = False       # one pass: no L(w + e) - L(w) is measured
    schedulable = False       # already one pass: nothing for --sam-from / --sam-every to save
    # For the engine: the official main.py recomputes BatchNorm statistics at the final (unperturbed) weights with
    # one forward-only train-mode epoch over the training data after the last epoch, then tests again.
    recalibrate_bn_at_end = True
    citation = "Becker, Altrock and Risse, 2024 (arXiv 2401.12033); code: MarlonBecker/MSAM"

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module, switches: Switches | None = None,
                 **options):
        super().__init__(base_optimizer, model, switches, **options)
        self.key = momentum_key(base_optimizer)

    def momentum(self) -> list[tuple[dict, list[torch.Tensor], list[torch.Tensor]]]:
        """(group, parameters, their momentum buffers) for each parameter group, parameters without a buffer
        (before their first step; frozen or never used) left out."""
        out = []
        for group in self.base_optimizer.param_groups:
            pairs = [(p, s.get(self.key)) for p in group["params"] if (s := self.base_optimizer.state.get(p))]
            pairs = [(p, v) for p, v in pairs if v is not None]
            if pairs:
                out.append((group, [p for p, _ in pairs], [v for _, v in pairs]))
        return out

    def step(self, batch):
        batch = as_batch(batch)
        groups = self.momentum()
        if not groups or self.rho == 0:  # the first step (no momentum yet): a plain step, as the official
            out = batch("plain")
            self._base_step(batch)
            return out
        params = [p for _, ps, _ in groups for p in ps]
        bufs = [v for _, _, vs in groups for v in vs]
        scale = self.rho / (global_norm(bufs) + EPS)  # a device scalar: no host sync
        self._move(params, bufs, -scale)                # w~ = w - e
        try:
            out = batch("plain")
        finally:
            self._move(params, bufs, scale)             # back at w, whatever happened in the pass
        hook = self.base_optimizer.register_step_pre_hook(lambda *_: self._decay_at_perturbed(groups, scale))
        try:
            self._base_step(batch)  # fp16 overflow: skipped there (the hook then does not run)
        finally:
            hook.remove()
        return out

    @staticmethod
    @torch.no_grad()
    def _move(params: list[torch.Tensor], bufs: list[torch.Tensor], scale: torch.Tensor) -> None:
        """w += scale * v (a parameter-sized temporary, freed at once: no copy of the weights is kept)."""
        torch._foreach_add_(params, torch._foreach_mul(bufs, scale))

    @torch.no_grad()
    def _decay_at_perturbed(self, groups, scale: torch.Tensor) -> None:
        """Right before the base step (after clipping): grad -= wd * e, so that SGD's (and Adam's coupled) decay,
        wd * w, becomes the official wd * (w - e). AdamW's decoupled decay is left at w, as the official."""
        for group, params, bufs in groups:
            wd = group.get("weight_decay", 0.0)
            if not wd or group.get("decoupled_weight_decay", False):
                continue
            pairs = [(p.grad, v) for p, v in zip(params, bufs) if p.grad is not None]
            if pairs:
                grads, vs = [g for g, _ in pairs], [v for _, v in pairs]
                torch._foreach_add_(grads, torch._foreach_mul(vs, -wd * scale))
