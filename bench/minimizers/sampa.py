"""SAMPa, SAM parallelized (Xie, Pethick and Cevher, NeurIPS 2024): the perturbation is taken along the gradient
at an auxiliary point y_t known before the step, so a step's two gradients do not depend on each other and
can run at the same time on two devices.

The paper's update (official README), with x the weights, y the auxiliary sequence, lambda = `lam`:

    x~_t    = x_t + rho * grad f(y_t) / ||grad f(y_t)||
    y_{t+1} = x_t - eta_t * grad f(y_t)
    x_{t+1} = x_t - eta_t * ((1 - lambda) * grad f(x~_t) + lambda * grad f(y_{t+1}))

One step here, on the step's batch B_t; grad f(y_t) (`gy`) is the gradient the previous step took at y_t:

    y_{t+1} = the base optimizer's step from x_t with grad f(y_t) as its gradient,
              its state (momentum, Adam's moments) left as it was
    g_y     = grad f(y_{t+1}; B_t)                          first pass, kind "ascent": the training metrics
    x~_t    = x_t + rho * gy / (||gy|| + 1e-12)
    g_p     = grad f(x~_t; B_t)                             second pass, kind "descent"
    x_{t+1} = base_step(x_t, (1 - lambda) * g_p + lambda * g_y);   gy <- g_y (kept for the next step)

The two passes only read x_t, gy and the base optimizer's state: on two devices they would run side by side,
whence `parallel_passes` = 1 beside the 2 `passes` spent here, on one device, one after the other. The
evaluated weights are x (the parameters hold x_t between steps), as in the official code.

The official code (LIONS-EPFL/SAMPa `train.py`, SGD lr 0.1, momentum 0.9, weight decay 5e-4, on two GPUs under
Lightning Fabric): rank 1 moves the weights to y_{t+1} = x_t - lr * (grad f(y_t) + wd * x_t + momentum *
buf_t), the step torch's SGD would take with grad f(y_t) without updating its buffer, and takes the gradient
there on the *current* batch B_t; rank 0 perturbs x_t along grad f(y_t) (which it recovers from the previous
step's all-reduced sum, see below) and takes the gradient at x~_t on the *previous* batch B_{t-1}, the batch
grad f(y_t) was taken on; the ranks all-reduce (1 - lambda) g_p + lambda g_y and both step SGD with it. At
the first step grad f(y_0) is taken as 0: x~_0 = y_1 = x_0, both passes run on B_0, and the step is a plain
SGD step. Ours starts the same way (no gy yet: no look-ahead, no perturbation, both passes at x_0).

Where ours differs from the official code, and why:
- Batches: the minimizer only sees the step's batch (the engine's contract) and x~_t is only known at step t,
  so the official pairing, grad f(x~_t) on B_{t-1}, cannot be kept by carrying gradients. Ours takes
  grad f(x~_t) on B_t, the batch of the step, as the paper's equations read with one batch per step: the
  perturbation's direction grad f(y_t) then comes from B_{t-1} while the perturbed gradient is taken on B_t
  (official: both on B_{t-1}, SAM's same-batch pairing), and the update uses B_t only (official: a
  (1 - lambda) share of B_{t-1}'s gradient). grad f(y_{t+1}) is on B_t in both. With the same batch at every
  step the two are the same (tests/minimizers/test_sampa.py checks both against a transcription of the
  official loop).
- y_{t+1} is whatever the base optimizer's step would be (SGD with nesterov or dampening, Adam, AdamW): a trial
  step on a copy of its state, which is then put back. For the official SGD (momentum 0.9, no nesterov, no
  dampening) it is the official formula. Two corner cases differ: with momentum 0 the official code leaves
  weight decay out of the look-ahead (it adds wd * x only beside a momentum buffer), ours keeps it (it is
  SGD's step); and the look-ahead is not clipped by `clip_norm` (the update is, as every minimizer's).
- grad f(y_t) is kept as it is. Rank 0 of the official code recovers it as (sum - (1 - lambda) g_p) /
  (lambda + 1e-15), which with lambda = 0 is 0: the official SAMPa-0 never perturbs (it is SGD with a
  one-step-stale batch). Ours perturbs for every lambda, as the paper's SAMPa-0.
- The weights are restored by copying x_t back (official: adding the displacement back, x - d + d, exact up
  to one rounding), so data-parallel replicas stay bit-identical.
- BatchNorm: each official rank keeps its own running statistics (DDP stops broadcasting buffers after the
  first forward under `no_backward_sync`), and rank 0, the one evaluated, only ever runs the perturbed pass:
  its statistics come from the x~ passes alone. Ours follows the engine's `bn_second_pass`, the one switch of
  the family: "update" (default) lets both passes update them, "freeze" keeps the y pass's only. Likewise
  dropout masks follow `second_pass_rng` (the official ranks, seeded alike, draw the same masks).
- No `surrogate_gap` (`reports_gap` False): the loss difference of its passes would be L(x~_t; B_t) -
  L(y_{t+1}; B_t), not SAM's L(w + e) - L(w), and no other minimizer's gap could be read beside it. The training
  loss is the y pass's; the official code logs none.
- fp16 (the official code runs in fp32): a step whose pass overflowed is skipped whole (no base step, the
  scale lowered) and gy is kept from the last good step. One overflow check per step, after both passes.
- Data parallel: `ascent_sync` all-reduces the y pass, whose gradient enters the update and is carried, so
  every replica holds the same gy (the checkpoint, written by rank 0, resumes every replica). The official
  two ranks are not data parallel: each runs one of the passes on the whole batch.
- Parameters with a gradient in only one of the passes get that pass's share alone (the other counted as 0).
- Not implemented: m-sharpness chunks (`--m`); plain steps in between (--sam-from, --sam-every) would leave gy
  stale, so SAMPa is not schedulable.

gy is kept per parameter and checkpointed (`extra_state`) with the base optimizer's state; a resume takes
the same next steps.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from bench.minimizers.base import Switches, as_batch, global_norm
from bench.minimizers.registry import register_minimizer
from bench.minimizers.sam import SAM
from bench.options import option

PERTURB_EPS = 1e-12  # added to ||grad f(y_t)||, as the official code


@dataclass(frozen=True)
class SAMPaHparams:
    """Xie, Pethick and Cevher, "SAMPa: Sharpness-aware Minimization Parallelized", NeurIPS 2024
    (arXiv 2410.10683); official code github.com/LIONS-EPFL/SAMPa. rho 0.1 and lam 0.2 are the official
    train.py defaults (--rho, --og) and its README's CIFAR-10 ResNet-56 command (SAMPa-0.2; SGD lr 0.1,
    momentum 0.9, weight decay 5e-4, batch 128, 200 epochs, cosine per epoch). The paper's per-model rho
    values were not checked."""
    rho: float = option(0.1, "radius of the perturbation along the gradient at the auxiliary point y_t", ge=0)
    lam: float = option(0.2, "lambda: the update's weight on grad f(y_{t+1}); 1 - lambda on grad f(x~_t)",
                        ge=0, le=1)


@register_minimizer("sampa")
class SAMPa(SAM):
    """SAMPa (Xie et al., 2024), as the official code but for the batch of the perturbed pass (see the module
    docstring)."""

    Hparams = SAMPaHparams
    passes = 2
    parallel_passes = 1     # its two passes are independent: one pass on the critical path on two devices
    ascent_sync = True      # the y pass's gradient enters the update and is carried to the next step
    supports_chunks = False
    schedulable = False     # gy is carried across steps: plain steps in between would leave it stale
    reports_gap = False     # its passes are at y_{t+1} and x~_t: L(x~) - L(y) is no surrogate gap of SAM's
    eps = PERTURB_EPS
    citation = "Xie et al., NeurIPS 2024 (arXiv 2410.10683); code: LIONS-EPFL/SAMPa"

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module, switches: Switches | None = None,
                 **options):
        super().__init__(base_optimizer, model, switches, **options)
        self._gy: dict[torch.Tensor, torch.Tensor] = {}  # grad f(y_t) by parameter; empty before the first step

    def step(self, batch):
        batch = as_batch(batch)
        params = [p for p in self.model.parameters() if p in self._gy]
        gy = [self._gy[p] for p in params]
        if params:
            self._keep(params)               # x_t, copied back after each pass
            self._lookahead(params, gy)      # the weights are y_{t+1}
        first, rng = self.first_pass(batch)  # grad f(y_{t+1})
        self._restore()
        new = {}
        for p in self.model.parameters():
            if p.grad is not None:
                new[p], p.grad = p.grad, None
        if params and self.rho > 0:
            self._displace(params, gy)       # x~_t
        self.perturbed_pass(batch, rng)      # grad f(x~_t)
        self._restore()
        if self.skip_if_overflow(batch):     # gradients dropped, gy kept: the step is taken again from x_t
            return first
        self._combine(new)
        self._gy = new
        self._base_step()                    # overflow already checked: clipping, base step, gradients cleared
        if batch.scaler is not None:
            batch.scaler.update(overflow=False)
        return first

    @torch.no_grad()
    def _keep(self, params: list[torch.Tensor]) -> None:
        """Save x_t of `params` in the persistent backup that `_restore` copies back."""
        for p in params:
            if p not in self._backup:
                self._backup[p] = torch.empty_like(p)
        torch._foreach_copy_([self._backup[p] for p in params], params)
        self._perturbed = params

    @torch.no_grad()
    def _displace(self, params: list[torch.Tensor], gy: list[torch.Tensor]) -> None:
        """x_t -> x~_t = x_t + rho gy / (||gy|| + 1e-12); the backup `_keep` made still holds x_t."""
        torch._foreach_add_(params, torch._foreach_mul(gy, self.rho / (global_norm(gy) + self.eps)))
        self._perturbed = params

    @torch.no_grad()
    def _lookahead(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Move `params` by the base optimizer's step with `grads` as their gradient, then put its state back as it
        was (a trial step: what it would do, without doing it). Only `params` carry a gradient meanwhile."""
        opt = self.base_optimizer
        saved = {p: {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in opt.state[p].items()}
                 for p in params if p in opt.state}
        for p, g in zip(params, grads):
            p.grad = g
        try:
            opt.step()
        finally:
            for p in params:
                p.grad = None
                if p in saved:
                    opt.state[p] = saved[p]
                else:
                    opt.state.pop(p, None)

    @torch.no_grad()
    def _combine(self, new: dict[torch.Tensor, torch.Tensor]) -> None:
        """p.grad (grad f(x~_t)) <- (1 - lam) p.grad + lam grad f(y_{t+1}); a missing gradient counts as 0."""
        lam = self.lam
        both, new_only = [], []
        for p in self.model.parameters():
            g = new.get(p)
            if p.grad is not None and g is not None:
                both.append(p)
            elif g is not None:
                new_only.append(p)
            elif p.grad is not None:
                p.grad.mul_(1 - lam)
        if both:
            grads = [p.grad for p in both]
            torch._foreach_mul_(grads, 1 - lam)
            torch._foreach_add_(grads, [new[p] for p in both], alpha=lam)
        for p in new_only:
            p.grad = new[p] * lam

    def extra_state(self) -> dict:
        names = {p: n for n, p in self.model.named_parameters()}
        return {"gy": {names[p]: g.detach().clone() for p, g in self._gy.items() if p in names}}

    def load_extra_state(self, state: dict) -> None:
        params = dict(self.model.named_parameters())
        self._gy = {params[n]: g for n, g in self.on_params(state.get("gy", {})).items()}
