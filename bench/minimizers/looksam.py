"""LookSAM (Liu et al., CVPR 2022): a full SAM step every k steps, which also records the part of SAM's gradient
orthogonal to the clean one; the steps in between take one plain pass and add that recorded part back.

There is no official code (the paper links none; the public implementations are third-party). This follows
the paper's Algorithm 1 and equations, treating all parameters as one vector as the paper's notation does:

    step t with t % k == 0 (2 passes):
        g   = grad L(w)                                   kind "ascent"
        e   = rho * g / (||g|| + 1e-16)                   (SAM's perturbation, as bench's SAM)
        g_s = grad L(w + e)                               kind "descent"
        g_v = g_s - (<g, g_s> / ||g||^2) g                g_s's component orthogonal to g; kept
        w  <- base_step(w, g_s)                           (a plain SAM update)
    other steps (1 pass):
        g   = grad L(w)                                   kind "plain"
        w  <- base_step(w, g + alpha * (||g|| / ||g_v||) * g_v)

The counter t starts at 0, so the first step is a SAM step (the paper's loop counts from 1, but its reuse
steps need a g_v, which only a SAM step provides); a step with no g_v yet (an fp16 step whose SAM passes
overflowed) is a SAM step too. t counts step() calls, skipped fp16 steps included, like the engine's steps.
Nominal cost: 1 + 1/k passes per step.

Choices the paper leaves open, and why:
- Norms and the projection are global (over all parameters), as the paper's vector notation; some
  third-party implementations project per parameter tensor instead. Norms and inner products are in fp32 at
  least (`global_norm`, `dot`).
- Degenerate cases give a zero correction instead of a NaN: g = 0 gives g_v = g_s (no projection), and
  g_v = 0 gives the plain gradient g. The perturbation adds SAM's 1e-16 to ||g||, as bench's SAM.
- g_v is kept per parameter name (checkpointed with the counter); a parameter that had no gradient at the
  last SAM step gets no correction.
- Data parallel: `ascent_sync` all-reduces the first gradient, so g, g_s and g_v are the global ones and
  every replica carries the same g_v (the checkpoint, written by rank 0, then resumes every replica).
- BatchNorm at w + e follows the engine's `bn_second_pass`, as every minimizer of the family. No m-sharpness
  chunks (`--m`).
- Look-LayerSAM (the paper's layer-wise rescaled perturbation for large batches) is not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from bench.minimizers.base import Switches, as_batch, dot, global_norm
from bench.minimizers.registry import register_minimizer
from bench.minimizers.sam import SAM
from bench.options import option


@dataclass(frozen=True)
class LookSAMHparams:
    """Liu, Mai, Chen, Hsieh and You, "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022
    (arXiv 2203.02714). No official code has been released; this implementation is derived from the paper's
    Algorithm 1. k 5 is the paper's main setting (its "LookSAM-5"); alpha 0.7 is the value third-party
    implementations give for the paper, and rho 0.05 SAM's CIFAR value: neither was checked against the
    paper's text."""
    rho: float = option(0.05, "radius of the L2 ball of the SAM steps' perturbation", ge=0)
    k: int = option(5, "a full SAM step every k steps (k = 1: SAM)", ge=1, integer=True)
    alpha: float = option(0.7, "weight of the reused orthogonal component, relative to ||g||", ge=0)


class _NominalPasses:
    """`passes` = 1 + 1/k: the instance's k, or the default k on the class (for listings)."""

    def __get__(self, obj, cls=None) -> float:
        k = obj.k if obj is not None else next(f.default for f in fields(LookSAMHparams) if f.name == "k")
        return 1 + 1 / k


@register_minimizer("looksam")
class LookSAM(SAM):
    """LookSAM (Liu et al., 2022), from the paper's Algorithm 1 (see the module docstring)."""

    Hparams = LookSAMHparams
    passes = _NominalPasses()
    ascent_sync = True      # the reuse steps' update contains g_v, built from the first gradient
    supports_chunks = False
    schedulable = False     # its own every-k schedule: plain steps between would stall its reuse steps' g_v
    citation = "Liu et al., CVPR 2022 (arXiv 2203.02714); no official code (from the paper's Algorithm 1)"

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module, switches: Switches | None = None,
                 **options):
        super().__init__(base_optimizer, model, switches, **options)
        self._t = 0                                  # steps taken (step() calls)
        self._gv: dict[str, torch.Tensor] = {}       # g_v by parameter name; empty until the first SAM step
        self._clean: list[torch.Tensor] = []         # g of the running SAM step
        self._clean_names: list[str] = []
        self._clean_params: list[torch.Tensor] = []

    def step(self, batch):
        batch = as_batch(batch)
        t, self._t = self._t, self._t + 1
        if t % self.k == 0 or not self._gv:
            return self._sam_step(batch)
        out = batch("plain")
        self.reuse()
        self._base_step(batch)  # under fp16 an overflow drops the gradients here: g_v is untouched
        return out

    def _sam_step(self, batch):
        first, rng = self.first_pass(batch)
        if self.skip_if_overflow(batch):
            return first
        self.ascent_step()
        self.perturbed_pass(batch, rng)
        if self.skip_if_overflow(batch):  # g_s is kept (as g_v): it must be finite
            self._restore()
            self._clean, self._clean_names, self._clean_params = [], [], []
            return first
        self.record()
        self.descent_step(batch)  # w restored, base step on g_s: the plain SAM update
        return first

    @torch.no_grad()
    def ascent_step(self) -> None:
        """After the first backward: keep g, w += rho g / (||g|| + 1e-16), clear the gradients."""
        self._clean_names, self._clean_params, self._clean = self.perturb_keeping_gradient()

    @torch.no_grad()
    def record(self) -> None:
        """After the second backward (p.grad = g_s): g_v = g_s - (<g, g_s> / ||g||^2) g, kept by name. g_s stays in
        p.grad for the SAM update."""
        triples = [(n, p.grad, g) for n, p, g in zip(self._clean_names, self._clean_params, self._clean)
                   if p.grad is not None]
        self._clean, self._clean_names, self._clean_params = [], [], []
        if not triples:
            return
        names, gs, g = [t[0] for t in triples], [t[1] for t in triples], [t[2] for t in triples]
        n_g = global_norm(g)
        coef = torch.where(n_g > 0, dot(g, gs) / (n_g * n_g), torch.zeros_like(n_g))
        torch._foreach_mul_(g, -coef)       # g's buffers (ours now) become g_v = g_s - coef * g
        torch._foreach_add_(g, gs)
        self._gv = dict(zip(names, g))

    @torch.no_grad()
    def reuse(self) -> None:
        """After a plain backward (p.grad = g): p.grad <- g + alpha * (||g|| / ||g_v||) * g_v."""
        names, params = self._with_grad()
        pairs = [(p.grad, self._gv[n]) for n, p in zip(names, params) if n in self._gv]
        if not pairs:
            return
        grads = [p.grad for p in params]
        n_g, n_v = global_norm(grads), global_norm(list(self._gv.values()))
        scale = torch.where(n_v > 0, self.alpha * n_g / n_v, torch.zeros_like(n_v))
        torch._foreach_add_([a for a, _ in pairs], torch._foreach_mul([v for _, v in pairs], scale))

    def extra_state(self) -> dict:
        return {"t": self._t, "gv": {n: v.detach().clone() for n, v in self._gv.items()}}

    def load_extra_state(self, state: dict) -> None:
        self._t = int(state.get("t", 0))
        self._gv = self.on_params(state.get("gv", {}))
