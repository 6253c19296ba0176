"""WSAM (Yue et al., KDD 2023): SAM's sharpness L(w + e) - L(w) as a regularization term of weight
gamma / (1 - gamma) added to the plain loss, rather than SAM's fixed weight 1.

    L_WSAM(w) = L(w) + gamma / (1 - gamma) * (max_{||d|| <= rho} L(w + d) - L(w))

One step, as the official code (intelligent-machine-learning/dlrover `atorch/atorch/optimizers/wsam.py`,
class WeightedSAM; `atorch/docs/README-WSAM.md`), with alpha = gamma / (1 - gamma):

    g    = grad L(w)                                     first pass, kind "ascent"
    e    = rho * g / (||g||_2 + 1e-12)                   (global norm; the official `sam_eps` 1e-12)
    g_s  = grad L(w + e)                                 second pass, kind "descent"
    decouple=True (the official default, "as used in our paper"):
        w <- base_step(w, g)                             the base optimizer (momentum, weight decay, Adam's
        w <- w - lr * alpha * (g_s - g)                  moments) sees g only; the sharpness term is added
                                                         after it with the group's lr, nothing else
    decouple=False:
        w <- base_step(w, alpha * g_s + (1 - alpha) * g)       (= g + alpha * (g_s - g))

gamma = 0.5 (alpha = 1) with decouple=False is SAM (the update's gradient is g_s), and with decouple=True it is
SAM too for a base optimizer that is plain SGD without momentum or weight decay; gamma = 0 is the base
optimizer with an unused second pass.

Defaults are the official code's: rho 0.05, gamma 0.9, decouple True, adaptive False, sam_eps 1e-12,
max_norm None (no clipping). Its README's usage and its CIFAR-10 example script use gamma 0.9 too (the script
with rho 0.2 for ResNet-18); the example's argparse default gamma is 0.5.

Gradient clipping (the official `max_norm`; ours the engine's `clip_norm`, 0 = off as the official None): the
official code clips the two gradients *separately*, each to the global norm max_norm (torch's
clip_grad_norm_: coefficient max_norm / (norm + 1e-6), at most 1), g in first_step after its all-reduce and
after the perturbation was taken, g_s in second_step before they are combined; the combined gradient (or,
decoupled, the sharpness term) is not clipped again. Ours does the same, so unlike the other minimizers the
base step does not clip the gradient it is handed.

Data parallel: the official two-step usage (its README) runs the first pass under DDP's `no_sync()`: each
worker perturbs its weights with its *own* gradient (norm and direction local: the SAM paper's m-sharpness,
m = per-worker batch) and `first_step` then all-reduces (averages) every g, after perturbing, so the update
uses the global g; DDP averages g_s in the second backward and `second_step` all-reduces it once more (the
same value, up to rounding). Ours keeps `ascent_sync` False, so the engine runs the ascent pass locally as for SAM (the
same m), and averages g itself after the perturbation (one coalesced all-reduce per dtype) unless the engine
already reduced it (`--sync-perturbation`, or a batch with `local_ascent` False). The official
closure-based `step()` does not use no_sync: there DDP already averages g, and the perturbation is the
global one (m = global batch), what ours does with `--sync-perturbation`.

Where ours differs from the official code, and why:
- The weights are restored by copying w back, not by subtracting e (SAM's descent_step): exact, so
  data-parallel replicas stay bit-identical. The perturbation's norm is accumulated in fp32 at least.
- BatchNorm: the official `step()` sets every BatchNorm2d's momentum to 0 for the second pass (running
  statistics unchanged, num_batches_tracked still counted). Ours follows the engine's `bn_second_pass`
  (default "update": both passes update them; "freeze" restores them), as every minimizer of the family.
- fp16: the official code has no loss scaling; ours skips a step whose first or second pass overflowed
  (checked before the perturbation and before the gradients are combined: no inf enters the update).
- Decoupled mode: p.grad is set to g by handing the parameter g's own buffer (the official copies g into
  p.grad through `mul_(0).add_(g)`), and the sharpness term g_s - g is computed in g_s's buffer: the same
  values (the official's `0 * g_s` would turn an inf of g_s into a NaN; fp16 steps with an inf are skipped).
- A parameter with g_s but no g (used only in the second pass) is taken to have g = 0 (the official code
  would fail on its missing state; pytorch-optimizer also uses zeros); one with g but no g_s gets no update,
  as in the official code.
- Not implemented: the official `adaptive=True` perturbation (ASAM-style |w| scaling; off by default). No
  m-sharpness chunks (`--m`): the engine refuses them for this minimizer.

pytorch-optimizer's `WSAM` (4.1.0) follows the official code with these differences: it clips only g_s, not
g (max_norm); it accumulates ||g|| in float32 whatever the gradients' dtype (ours in fp32 at least: in float64
the two agree to ~1e-9, to rounding with its norm in float64, tests/minimizers/test_wsam.py); its coupled
mode mixes with `lerp_` (the same value up to rounding); its BatchNorm freeze covers every BatchNorm, not only
BatchNorm2d; its fused (foreach) path, used only outside torch.distributed and when asked for, does no
all-reduce. Defaults are the same (rho 0.05, gamma 0.9, decouple True, eps 1e-12, max_norm None).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench import distributed as D
from bench.minimizers.base import Switches, as_batch
from bench.minimizers.registry import register_minimizer
from bench.minimizers.sam import SAM
from bench.options import option

SAM_EPS = 1e-12    # the official `sam_eps`, added to ||g|| in the perturbation
CLIP_EPS = 1e-6    # torch's clip_grad_norm_ (which the official code calls): max_norm / (norm + 1e-6)


@dataclass(frozen=True)
class WSAMHparams:
    """Yue, Jiang, Ye, Gao, Liu and Zhang, "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
    Regularization Term", KDD 2023 (arXiv 2305.15817); official code github.com/intelligent-machine-learning/
    dlrover atorch/atorch/optimizers/wsam.py. Defaults are the official code's (rho 0.05, gamma 0.9, decoupled);
    its CIFAR-10 ResNet-18 example uses rho 0.2, gamma 0.9. The paper's ablation is summarized (pytorch-optimizer
    issue #213) as gamma working best in [0.8, 0.95]; its per-experiment values were not checked here."""
    rho: float = option(0.05, "radius of the L2 ball the weights are perturbed in", ge=0)
    gamma: float = option(0.9, "weight of the sharpness term, applied as gamma / (1 - gamma) (0.5: SAM)", ge=0, lt=1)
    decouple: bool = option(True, "the sharpness term after the base step (lr-scaled only), as the paper; "
                                  "false: in the base step's gradient")


@register_minimizer("wsam")
class WSAM(SAM):
    """Weighted SAM (Yue et al., 2023), as the official code (see the module docstring)."""

    Hparams = WSAMHparams
    passes = 2
    ascent_sync = False     # the perturbation is local (as SAM's); g is averaged by the step itself, as officially
    supports_chunks = False
    schedulable = True      # nothing is carried across steps: a plain base step may replace one
    eps = SAM_EPS
    citation = ("Yue et al., KDD 2023 (arXiv 2305.15817); code: intelligent-machine-learning/dlrover "
                "atorch/optimizers/wsam.py")

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module, switches: Switches | None = None,
                 **options):
        super().__init__(base_optimizer, model, switches, **options)
        self._clean: list[torch.Tensor] = []          # g, the first gradient, held until the update
        self._clean_params: list[torch.Tensor] = []

    @property
    def alpha(self) -> float:
        """gamma / (1 - gamma): the sharpness term's weight (from the live gamma, so a loaded one counts)."""
        return self.gamma / (1 - self.gamma)

    def step(self, batch):
        """Both passes on the same batch; returns the first pass's result (the training metrics)."""
        batch = as_batch(batch)
        first, rng = self.first_pass(batch)
        if self.skip_if_overflow(batch):
            return first
        self.ascent_step(local=getattr(batch, "local_ascent", True))
        self.perturbed_pass(batch, rng)
        self.descent_step(batch)
        return first

    @torch.no_grad()
    def ascent_step(self, local: bool = True) -> None:
        """After the first backward: w += rho g / (||g|| + 1e-12) from this replica's g, then (under DDP, when g
        is still local) g averaged over the replicas and (clip_norm) clipped; g is kept, the .grad cleared."""
        _, params, grads = self.perturb_keeping_gradient()
        if local:
            _average(grads)
        if self.clip_norm > 0:
            _clip(grads, self.clip_norm)
        self._clean_params, self._clean = params, grads

    @torch.no_grad()
    def descent_step(self, batch=None) -> None:
        """After the second backward: restore w, (clip g_s), combine g and g_s, base step (decoupled: then
        w -= lr * alpha * (g_s - g) per parameter group), clear the gradients."""
        self._restore()
        clean = dict(zip(self._clean_params, self._clean))
        self._clean, self._clean_params = [], []
        if batch is not None and self.skip_if_overflow(batch):
            return
        params = [p for p in self.model.parameters() if p.grad is not None]  # the official: model.parameters()
        g_s = [p.grad for p in params]
        g = [clean[p] if p in clean else torch.zeros_like(p.grad) for p in params]
        if params and self.clip_norm > 0:
            _clip(g_s, self.clip_norm)
        alpha = self.alpha
        if params and self.decouple:
            torch._foreach_sub_(g_s, g)                   # g_s's buffers now hold the sharpness term g_s - g
            for p, gi in zip(params, g):
                p.grad = gi                               # the base optimizer sees g alone
        elif params:
            torch._foreach_mul_(g_s, alpha)               # alpha g_s + (1 - alpha) g, the official order
            torch._foreach_add_(g_s, g, alpha=1 - alpha)
        self.base_optimizer.step()
        self.base_optimizer.zero_grad()
        if params and self.decouple and alpha != 0:
            sharp = dict(zip(params, g_s))
            for group in self.base_optimizer.param_groups:
                mine = [p for p in group["params"] if p in sharp]
                if mine:
                    torch._foreach_add_(mine, [sharp[p] for p in mine], alpha=-group["lr"] * alpha)
        if batch is not None and batch.scaler is not None:
            batch.scaler.update(overflow=False)


def _clip(tensors: list[torch.Tensor], max_norm: float) -> None:
    """Scale the tensors in place to a global L2 norm of at most max_norm, as torch's clip_grad_norm_."""
    if not tensors:
        return
    total = torch.nn.utils.get_total_norm(tensors, foreach=True)
    coef = torch.clamp(max_norm / (total + CLIP_EPS), max=1.0)
    torch._foreach_mul_(tensors, coef.to(tensors[0].device))


def _average(tensors: list[torch.Tensor]) -> None:
    """Replace every tensor by its mean over the replicas, in place: one all-reduce per (device, dtype) of the
    tensors flattened together (the official code all-reduces each parameter's gradient on its own)."""
    if not tensors or not D.is_distributed():
        return
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    world = D.world_size()
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        D.all_reduce_sum(flat)
        flat.div_(world)
        torch._foreach_copy_(group, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in group]), group)])
