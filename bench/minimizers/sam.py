"""SAM (Foret et al., ICLR 2021): the two-pass step every member of the family builds on.

The update rule follows the official code exactly (google-research/sam; SamsungLabs/ASAM `asam.py`):

    e = rho * g / (||g||_2 + 1e-16)        (global L2 norm over all parameters)

One step: first forward/backward at w (kind "ascent") -> ascent_step() (w += e, grads cleared) -> second
forward/backward at w + e (kind "descent") -> descent_step() (w restored, base optimizer step with the
second gradient, grads cleared).

Everything is done with fused `torch._foreach_*` kernels: a handful of launches per step whatever the
number of parameters. The perturbation is computed in place in the first-pass gradient buffers (dead after
the ascent) and the unperturbed weights are kept in one persistent parameter-sized buffer: SAM holds one
copy of the parameters more than the base optimizer.

Subclasses change what they need: `_scaled_grads` (the direction and its norm: ASAM, SAM-ON, adaptive-all),
`radius()` (GSAM's scheduled rho) or `step` itself (GSAM, ESAM, LookSAM, F-SAM).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from bench.minimizers.base import Minimizer, Switches, as_batch, global_norm
from bench.minimizers.registry import register_minimizer
from bench.options import option

EPS = 1e-16  # added to the norm, as in the official code


@dataclass(frozen=True)
class SAMHparams:
    """Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021
    (arXiv 2010.01412); official code github.com/google-research/sam. rho 0.05 is the paper's CIFAR value."""
    rho: float = option(0.05, "radius of the L2 ball the weights are perturbed in", ge=0)


@register_minimizer("sam")
class SAM(Minimizer):
    """Sharpness-Aware Minimization (Foret et al., 2021)."""

    Hparams = SAMHparams
    passes = 2
    supports_chunks = True
    schedulable = True  # every step is a perturbation from the step's own gradient: a plain step may replace one
    eps = EPS  # added to the perturbation's norm; a subclass following another official code sets its own
    citation = "Foret et al., ICLR 2021 (arXiv 2010.01412); code: google-research/sam"

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module, switches: Switches | None = None,
                 **options):
        super().__init__(base_optimizer, model, switches, **options)
        self.bn_second_pass = self.switches.bn_second_pass
        self.second_pass_rng = self.switches.second_pass_rng
        self._perturbed: list[torch.Tensor] = []  # parameters moved by the last ascent
        self._backup: dict[torch.Tensor, torch.Tensor] = {}  # their unperturbed values (persistent buffers)

    def hparams(self) -> dict:
        return {**super().hparams(), "bn_second_pass": self.bn_second_pass, "second_pass_rng": self.second_pass_rng}

    def radius(self) -> float:
        """The perturbation radius of this step."""
        return self.rho

    def _with_grad(self) -> tuple[list[str], list[torch.Tensor]]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
        return [n for n, _ in named], [p for _, p in named]

    def _scaled_grads(self, names: list[str], params: list[torch.Tensor]) -> tuple[list, torch.Tensor]:
        """Return (direction d, norm n) such that e = rho * d / n. d may alias the gradients."""
        grads = [p.grad for p in params]
        return grads, global_norm(grads)

    def ascent_params(self) -> tuple[list[str], list[torch.Tensor]]:
        """(names, parameters) with a gradient, for an ascent; an ascent before the last one's descent is a bug."""
        if self._perturbed:
            raise RuntimeError("ascent_step() called twice without descent_step()")
        return self._with_grad()

    @torch.no_grad()
    def perturb_keeping_gradient(self) -> tuple[list[str], list, list]:
        """w += radius * g / (||g|| + eps) without touching g, which is handed back (names, params, g) for
        an update that uses it (GSAM, LookSAM); the parameters' .grad is cleared for the next pass."""
        names, params = self.ascent_params()
        if not params:
            return [], [], []
        grads = [p.grad for p in params]
        self.perturb(params, torch._foreach_mul(grads, self.radius() / (global_norm(grads) + self.eps)))
        for p in params:
            p.grad = None
        return names, params, grads

    @torch.no_grad()
    def ascent_step(self) -> None:
        """After the first backward: w += e, then clear the gradients."""
        names, params = self.ascent_params()
        if not params:
            return
        direction, norm = self._scaled_grads(names, params)
        scale = self.radius() / (norm + self.eps)  # rho / norm first, then times g: the official order of operations
        torch._foreach_mul_(direction, scale)
        self.perturb(params, direction)
        for p in params:  # e is no longer needed: the second backward allocates fresh gradients
            p.grad = None

    @torch.no_grad()
    def perturb(self, params: list[torch.Tensor], e: list[torch.Tensor]) -> None:
        """w += e on `params`, keeping w to be restored by descent_step()."""
        for p in params:
            if p not in self._backup:  # allocated once, reused every step
                self._backup[p] = torch.empty_like(p)
        torch._foreach_copy_([self._backup[p] for p in params], params)
        torch._foreach_add_(params, e)  # w + e
        self._perturbed = params

    @torch.no_grad()
    def descent_step(self, batch=None) -> None:
        """After the second backward: restore w, step the base optimizer on the second gradient.

        w is restored by copying it back, not by subtracting e (the official code's w + e - e): the
        same value up to one rounding, but exact, so data-parallel replicas whose perturbations differ
        (m-sharpness) stay bit-identical."""
        self._restore()
        self._base_step(batch)

    @torch.no_grad()
    def _restore(self) -> None:
        """w + e -> w, by copying the saved w back."""
        if self._perturbed:
            torch._foreach_copy_(self._perturbed, [self._backup[p] for p in self._perturbed])
        self._perturbed = []

    @contextlib.contextmanager
    def second_pass(self) -> Iterator[None]:
        """Context for the passes at w + e: with bn_second_pass='freeze', BatchNorm running statistics are
        restored afterwards, so only the first (unperturbed) pass updates them."""
        if self.bn_second_pass == "update":
            yield
            return
        buffers = [b for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                   for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        saved = [b.clone() for b in buffers]
        try:
            yield
        finally:
            with torch.no_grad():
                for b, s in zip(buffers, saved):
                    b.copy_(s)

    def first_pass(self, batch, **kw):
        """The pass at w whose gradient perturbs; returns (its result, the RNG state to replay or None)."""
        rng = _rng_state(self.model) if self.second_pass_rng == "reuse" else None
        return batch("ascent", **kw), rng

    def perturbed_pass(self, batch, rng=None, **kw):
        """A pass at w + e. Stochastic layers (dropout, ShakeDrop) draw fresh randomness, as the official code
        does; with second_pass_rng='reuse' torch's RNG is rewound so they draw exactly the masks of the first."""
        if rng is not None:
            _set_rng_state(rng)
        with torch.enable_grad(), self.second_pass():
            return batch("descent", **kw)

    def step(self, batch):
        """Both passes on the same batch; returns the first pass's result (the training metrics)."""
        batch = as_batch(batch)
        first, rng = self.first_pass(batch)
        if self.skip_if_overflow(batch):
            return first
        self.ascent_step()
        self.perturbed_pass(batch, rng)
        self.descent_step(batch)
        return first

    def step_chunks(self, batches: list) -> list:
        """m-sharpness on one device: each batch is one chunk of the step's examples (its loss weighted by the
        chunk's share, the engine's `Batch.chunks`); every chunk perturbs the weights with its own first
        gradient, and the chunks' second gradients are summed into one base step. Only the last chunk's
        second backward may all-reduce under DDP, so replicas reduce the summed gradient once. Only for a
        minimizer whose step is this plain two-pass perturbation (`supports_chunks`)."""
        if not self.supports_chunks:
            raise NotImplementedError(f"{self.name} has no m-sharpness chunks (--m)")
        outs, acc = [], None
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            out, rng = self.first_pass(batch)
            outs.append(out)
            if self.skip_if_overflow(batch):
                return outs
            self.ascent_step()
            if last and acc is not None:  # the last backward adds onto the sum (and DDP reduces it)
                scale = batch.scaler.scale if batch.scaler is not None else 1.0  # re-scaled: the batch unscales all
                for p, a in acc.items():
                    p.grad = a.mul_(scale) if scale != 1.0 else a
            self.perturbed_pass(batch, rng)
            if last:
                self.descent_step(batch)
                break
            self._restore()
            with torch.no_grad():  # set the chunk's second gradient aside: the next first pass needs clean grads
                acc = acc if acc is not None else {}
                for p in self.model.parameters():
                    if p.grad is not None:
                        acc[p] = acc[p].add_(p.grad) if p in acc else p.grad
                        p.grad = None
        return outs


def _rng_state(model: nn.Module):
    """What the first pass's stochastic layers draw from: torch's CPU generator and, for a model on a GPU, that
    GPU's generator (only that one: the others are not drawn from, and there may be many)."""
    device = next(model.parameters()).device
    index = device.index if device.index is not None else torch.cuda.current_device() if device.type == "cuda" else None
    return torch.get_rng_state(), (index, torch.cuda.get_rng_state(index)) if index is not None else None


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda[1], cuda[0])
