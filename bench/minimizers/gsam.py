"""GSAM (Zhuang et al., ICLR 2022): SAM's descent gradient minus a multiple of the clean gradient's component
orthogonal to it, with the radius scheduled proportionally to the learning rate.

One step, as Algorithm 1 of the paper and the official code (juntang-zhuang/GSAM `gsam/gsam.py`,
`gsam/scheduler.py`; the authors' JAX original google-research/big_vision `trainers/proj/gsam/gsam.py`):

    rho_t  = rho_min + (rho - rho_min) * (lr_t - lr_min) / (lr_max - lr_min)      (rho if lr_max == lr_min)
    g      = grad L(w)                                   first pass, kind "ascent"
    e      = rho_t * g / (||g|| + 1e-12)
    g_s    = grad L(w + e)                               second pass, kind "descent"
    c      = <g, g_s> / (||g|| ||g_s|| + 1e-12) * ||g|| / (||g_s|| + 1e-12)
    g_perp = g - c * g_s                                 g's component orthogonal to g_s
    w     <- base_step(w, g_s - alpha * g_perp)

So it is the *clean* gradient g that is projected onto the perturbed one g_s (not the reverse), and the sum
is not normalised. The 1e-12 is the official `perturb_eps`, used in the perturbation and in both
denominators of the decomposition exactly where the PyTorch code puts them (the JAX code divides by ||g_s||
without eps); with rho = rho_min and alpha = 0 GSAM is SAM (up to that eps).

`lr_t` is `base_optimizer.param_groups[0]["lr"]` when the step runs (the official ProportionScheduler
reads the lr scheduler's last lr of group 0 after every scheduler step: the same value), `lr_max` the
group's "initial_lr" (set by torch's schedulers: the schedule's peak for every schedule of the engine),
or the lr at construction when no scheduler set one. `lr_min` is an option: it must be the lr the schedule
ends at for rho_t to end at rho_min, and is 0 for all the engine's schedules.

Where ours differs from the official code, and why:
- The weights are restored by copying w back, not by subtracting e (SAM's descent_step): exact, so
  data-parallel replicas stay bit-identical.
- BatchNorm: the official step sets every BatchNorm's momentum to 0 for the second pass (running statistics
  unchanged, num_batches_tracked still counted). Ours follows the engine's `bn_second_pass` (default
  "update": both passes update them; "freeze" restores them), the one switch every minimizer of the family
  shares, so that rows compare.
- Data parallel: the official step keeps both passes local (no_sync), decomposes each worker's own pair of
  gradients and all-reduces the resulting GSAM gradient. Ours sets `ascent_sync`: the first gradient is
  all-reduced too (the engine always reduces the descent pass) and the decomposition is done once, on the
  global gradients, identically on every replica. The decomposition is not linear, so under DDP the two
  differ (ours perturbs with m = the global batch); on one device they are the same.
- The decomposition is computed as g_s * (1 + alpha * c) - alpha * g rather than g_s - alpha * (g - c g_s):
  the same value up to rounding, without a parameter-sized temporary. Norms and the inner product are
  accumulated in fp32 at least (`global_norm`, `dot`).
- Checks: the official ProportionScheduler asserts rho_max >= rho_min and lr_max >= lr_min; ours refuses
  rho_min > rho and lr_min above the lr at construction (option errors: ValueErrors), and does not clamp
  rho_t when the lr leaves [lr_min, lr_max] (neither does the official code).
- Not implemented: the official `adaptive=True` perturbation (e scaled by |w|; off by default, and off in
  every row of the paper's Table 4) and the JAX code's `minimize_fp=False` variant. No m-sharpness chunks
  (`--m`): the engine refuses them for this minimizer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.minimizers.base import Switches, dot, global_norm
from bench.minimizers.registry import register_minimizer
from bench.minimizers.sam import SAM
from bench.options import OptionError, option

PERTURB_EPS = 1e-12  # the official `perturb_eps` (PyTorch and JAX code alike)


@dataclass(frozen=True)
class GSAMHparams:
    """Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan and Liu, "Surrogate Gap Minimization Improves
    Sharpness-Aware Training", ICLR 2022 (arXiv 2203.08065); the method is "Surrogate Gap Guided
    Sharpness-Aware Minimization". Official code github.com/juntang-zhuang/GSAM (PyTorch re-implementation by
    the first author) and google-research/big_vision trainers/proj/gsam (JAX, the paper's).

    Defaults: rho (= the paper's rho_max) 0.04, rho_min 0.02 and alpha 0.01 are the paper's Table 4 values for
    its SGD-trained ResNet-50/101 (the only SGD rows; its ViT/Mixer rows with AdamW use rho_max 0.5-0.7,
    alpha 0.01-1.0). lr_min 0 is the official PyTorch example's (cosine decay to 0) and where every schedule
    of this engine ends; the paper's rows end their linear schedule at lr_max / 100 and set lr_min to that."""
    rho: float = option(0.04, "rho_max: the perturbation radius when the lr is at its peak", ge=0)
    rho_min: float = option(0.02, "the radius when the lr is at lr_min (must not exceed rho)", ge=0)
    alpha: float = option(0.01, "weight of the ascent along the clean gradient's part orthogonal to g_s", ge=0)
    lr_min: float = option(0.0, "the lr at which the radius reaches rho_min (the schedule's final lr)", ge=0)

    def __post_init__(self):
        if self.rho_min > self.rho:
            raise OptionError(f"minimizer GSAM: rho_min={self.rho_min!r} must not exceed rho={self.rho!r} "
                              "(the radius decays from rho at the peak lr to rho_min at lr_min)")


@register_minimizer("gsam")
class GSAM(SAM):
    """Surrogate Gap Guided SAM (Zhuang et al., 2022), as the official code (see the module docstring)."""

    Hparams = GSAMHparams
    passes = 2
    ascent_sync = True      # the update uses the first gradient: replicas must agree on it
    supports_chunks = False
    eps = PERTURB_EPS
    citation = "Zhuang et al., ICLR 2022 (arXiv 2203.08065); code: juntang-zhuang/GSAM, google-research/big_vision"

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module, switches: Switches | None = None,
                 **options):
        super().__init__(base_optimizer, model, switches, **options)
        self._lr0 = float(base_optimizer.param_groups[0]["lr"])  # lr_max when no scheduler sets "initial_lr"
        if self.lr_min > self._lr0:
            raise OptionError(f"minimizer GSAM: lr_min={self.lr_min!r} is above the learning rate {self._lr0!r}; "
                              "it must be the lr the schedule ends at")
        self._clean: list[torch.Tensor] = []  # g, the first gradient, held until the decomposition
        self._clean_params: list[torch.Tensor] = []

    def lr_range(self) -> tuple[float, float, float]:
        """(lr_t, lr_max, lr_min) of this step."""
        group = self.base_optimizer.param_groups[0]
        return float(group["lr"]), float(group.get("initial_lr", self._lr0)), float(self.lr_min)

    def radius(self) -> float:
        """rho_t: proportional to the learning rate between (lr_min, rho_min) and (lr_max, rho)."""
        lr, lr_max, lr_min = self.lr_range()
        if lr_max == lr_min:
            return self.rho
        return self.rho_min + (self.rho - self.rho_min) * (lr - lr_min) / (lr_max - lr_min)

    @torch.no_grad()
    def ascent_step(self) -> None:
        """After the first backward: keep g, w += rho_t g / (||g|| + 1e-12), clear the gradients."""
        _, self._clean_params, self._clean = self.perturb_keeping_gradient()

    @torch.no_grad()
    def decompose(self) -> None:
        """After the second backward: p.grad <- g_s - alpha * g_perp (g_perp: g's part orthogonal to g_s)."""
        pairs = [(p.grad, g) for p, g in zip(self._clean_params, self._clean) if p.grad is not None]
        self._clean, self._clean_params = [], []
        if not pairs:
            return
        gs, g = [a for a, _ in pairs], [b for _, b in pairs]
        n_s, n_g = global_norm(gs), global_norm(g)
        cosine = dot(g, gs) / (n_s * n_g + PERTURB_EPS)
        c = cosine * n_g / (n_s + PERTURB_EPS)          # g_perp = g - c g_s
        torch._foreach_mul_(gs, 1 + self.alpha * c)     # g_s - alpha (g - c g_s) = (1 + alpha c) g_s - alpha g
        torch._foreach_add_(gs, g, alpha=-self.alpha)

    @torch.no_grad()
    def descent_step(self, batch=None) -> None:
        """Decompose, restore w, step the base optimizer. (Under fp16 an overflow of the second pass is caught by
        the base step, which then drops the gradients: the decomposition of an inf is never applied.)"""
        self.decompose()
        super().descent_step(batch)

    def extra_state(self) -> dict:
        return {"lr0": self._lr0}

    def load_extra_state(self, state: dict) -> None:
        self._lr0 = float(state.get("lr0", self._lr0))
