"""SAM and ASAM as wrappers around any torch.optim optimizer.

The update rules follow the official code exactly (SamsungLabs/ASAM `asam.py`, google-research/sam):

SAM   e = rho * g / (||g||_2 + 1e-16)                       (global L2 norm over all parameters)
ASAM  T = |w| + eta on parameters whose *name* contains "weight", T = 1 elsewhere
      e = rho * T^2 g / (||T g||_2 + 1e-16)

One step: first forward/backward -> ascent_step() (w += e, grads cleared) -> second forward/backward at
w + e -> descent_step() (w -= e, base optimizer step with the second gradient, grads cleared).

Everything is done with fused `torch._foreach_*` kernels: a handful of launches per step whatever the
number of parameters. The perturbation is computed in place in the first-pass gradient buffers (dead after
the ascent) and the unperturbed weights are kept in one persistent parameter-sized buffer: SAM/ASAM hold
one copy of the parameters more than the base optimizer.

This module depends on torch only (and bench.errors): minimizers see parameters and gradients, never data
or files.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator

import torch
from torch import nn

from bench.errors import UserError

BN_SECOND_PASS = ("update", "freeze")
SECOND_PASS_RNG = ("fresh", "reuse")
EPS = 1e-16  # added to the norm, as in the official code


class Minimizer:
    """Plain base-optimizer training: one forward/backward per step.

    SGD and Adam runs go through this class so that every minimizer offers the same interface:
    `step(closure)` where `closure()` runs forward + backward and returns whatever the caller wants back
    (the engine returns the loss and the outputs of the first pass).
    """

    passes = 1

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module, clip_norm: float = 0.0):
        if not clip_norm >= 0:
            raise ValueError(f"clip_norm must be >= 0, got {clip_norm}")
        self.base_optimizer = base_optimizer
        self.model = model
        self.clip_norm = float(clip_norm)  # 0: no clipping; else the update's gradient norm is clipped

    @property
    def param_groups(self):  # lets torch.optim.lr_scheduler drive the base optimizer through us
        return self.base_optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable, first_pass_context: Callable = contextlib.nullcontext):
        """One pass; `first_pass_context` matters only to two-pass minimizers (see SAM.step)."""
        out = closure()
        self._base_step()
        return out

    def _base_step(self) -> None:
        if self.clip_norm > 0:
            params = [p for g in self.base_optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.clip_norm, foreach=True)
        self.base_optimizer.step()
        self.base_optimizer.zero_grad()

    def hparams(self) -> dict:
        return {"clip_norm": self.clip_norm}

    def state_dict(self) -> dict:
        return {"base": self.base_optimizer.state_dict(), "hparams": self.hparams()}

    def load_state_dict(self, state: dict) -> None:
        self.base_optimizer.load_state_dict(state["base"])
        for key, value in state.get("hparams", {}).items():
            setattr(self, key, value)


class SAM(Minimizer):
    """Sharpness-Aware Minimization (Foret et al., 2021)."""

    passes = 2

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module, rho: float = 0.05,
                 bn_second_pass: str = "update", second_pass_rng: str = "fresh", clip_norm: float = 0.0):
        super().__init__(base_optimizer, model, clip_norm=clip_norm)
        if not rho >= 0:  # also refuses NaN
            raise ValueError(f"rho must be >= 0, got {rho}")
        if bn_second_pass not in BN_SECOND_PASS:
            raise ValueError(f"bn_second_pass must be one of {BN_SECOND_PASS}, got {bn_second_pass!r}")
        if second_pass_rng not in SECOND_PASS_RNG:
            raise ValueError(f"second_pass_rng must be one of {SECOND_PASS_RNG}, got {second_pass_rng!r}")
        self.rho = float(rho)
        self.bn_second_pass = bn_second_pass
        self.second_pass_rng = second_pass_rng
        self._perturbed: list[torch.Tensor] = []  # parameters moved by the last ascent
        self._backup: dict[torch.Tensor, torch.Tensor] = {}  # their unperturbed values (persistent buffers)

    def hparams(self) -> dict:
        return {**super().hparams(), "rho": self.rho, "bn_second_pass": self.bn_second_pass,
                "second_pass_rng": self.second_pass_rng}

    def _with_grad(self) -> tuple[list[str], list[torch.Tensor]]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
        return [n for n, _ in named], [p for _, p in named]

    def _scaled_grads(self, names: list[str], params: list[torch.Tensor]) -> tuple[list, torch.Tensor]:
        """Return (direction d, norm n) such that e = rho * d / n. d may alias the gradients."""
        grads = [p.grad for p in params]
        return grads, _global_norm(grads)

    @torch.no_grad()
    def ascent_step(self) -> None:
        """After the first backward: w += e, then clear the gradients."""
        if self._perturbed:
            raise RuntimeError("ascent_step() called twice without descent_step()")
        names, params = self._with_grad()
        if not params:
            return
        direction, norm = self._scaled_grads(names, params)
        scale = self.rho / (norm + EPS)  # rho / norm first, then times g: the official order of operations
        torch._foreach_mul_(direction, scale)
        for p in params:
            if p not in self._backup:  # allocated once, reused every step
                self._backup[p] = torch.empty_like(p)
        torch._foreach_copy_([self._backup[p] for p in params], params)
        torch._foreach_add_(params, direction)  # w + e
        self._perturbed = params
        for p in params:  # e is no longer needed: the second backward allocates fresh gradients
            p.grad = None

    @torch.no_grad()
    def descent_step(self) -> None:
        """After the second backward: restore w, step the base optimizer on the second gradient.

        w is restored by copying it back, not by subtracting e (the official code's w + e - e): the
        same value up to one rounding, but exact, so data-parallel replicas whose perturbations differ
        (m-sharpness) stay bit-identical."""
        self._restore()
        self._base_step()

    @torch.no_grad()
    def _restore(self) -> None:
        """w + e -> w, by copying the saved w back."""
        if self._perturbed:
            torch._foreach_copy_(self._perturbed, [self._backup[p] for p in self._perturbed])
        self._perturbed = []

    @contextlib.contextmanager
    def second_pass(self) -> Iterator[None]:
        """Context for the second forward/backward: with bn_second_pass='freeze', BatchNorm running
        statistics are restored afterwards, so only the first (unperturbed) pass updates them."""
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

    def step(self, closure: Callable, first_pass_context: Callable = contextlib.nullcontext):
        """Both passes on the same batch. Stochastic layers (dropout, ShakeDrop) draw fresh randomness in
        the second pass, as the official code does; with second_pass_rng='reuse' torch's RNG is rewound
        so the second pass draws exactly the masks of the first. `first_pass_context` wraps the first
        forward + backward: DistributedDataParallel's `no_sync` there keeps the ascent gradient local."""
        return self.step_chunks([closure], first_pass_context)[0]

    def step_chunks(self, closures: list[Callable], first_pass_context: Callable = contextlib.nullcontext,
                    accumulate_context: Callable = contextlib.nullcontext) -> list:
        """m-sharpness on one device: each closure runs one chunk of the batch (its loss weighted by the
        chunk's share); every chunk perturbs the weights with its own first gradient, and the chunks' second
        gradients are summed into one base step. `accumulate_context` (DDP's no_sync) wraps every second
        backward but the last, so replicas all-reduce the summed gradient once."""
        outs, acc = [], None
        for i, closure in enumerate(closures):
            last = i == len(closures) - 1
            rng = _rng_state() if self.second_pass_rng == "reuse" else None
            with first_pass_context():
                outs.append(closure())
            self.ascent_step()
            if rng is not None:
                _set_rng_state(rng)
            if last and acc is not None:  # the last backward adds onto the sum (and DDP reduces it)
                for p, a in acc.items():
                    p.grad = a
            with torch.enable_grad(), self.second_pass(), (contextlib.nullcontext() if last else accumulate_context()):
                closure()
            if last:
                self.descent_step()
                break
            self._restore()
            with torch.no_grad():  # set the chunk's second gradient aside: the next first pass needs clean grads
                acc = acc if acc is not None else {}
                for p in self.model.parameters():
                    if p.grad is not None:
                        acc[p] = acc[p].add_(p.grad) if p in acc else p.grad
                        p.grad = None
        return outs


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class ASAM(SAM):
    """Adaptive SAM (Kwon et al., 2021), element-wise normalisation with p = 2, as the official code."""

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module, rho: float = 0.5,
                 eta: float = 0.01, bn_second_pass: str = "update", second_pass_rng: str = "fresh",
                 clip_norm: float = 0.0):
        super().__init__(base_optimizer, model, rho=rho, bn_second_pass=bn_second_pass,
                         second_pass_rng=second_pass_rng, clip_norm=clip_norm)
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)

    def hparams(self) -> dict:
        return {**super().hparams(), "eta": self.eta}

    def _scaled_grads(self, names, params):
        grads = [p.grad for p in params]
        w_idx = [i for i, n in enumerate(names) if "weight" in n]
        if w_idx:
            w_grads = [grads[i] for i in w_idx]
            t = torch._foreach_abs([params[i] for i in w_idx])
            torch._foreach_add_(t, self.eta)        # T = |w| + eta
            torch._foreach_mul_(w_grads, t)         # T g   (T = 1 on the other parameters)
            norm = _global_norm(grads)              # ||T g||
            torch._foreach_mul_(w_grads, t)         # T^2 g
        else:
            norm = _global_norm(grads)
        return grads, norm


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """|| (||t||_2 for t in tensors) ||_2, in fp32 at least (fp16/bf16 gradients are upcast)."""
    norms = torch._foreach_norm(tensors)
    dtype = torch.promote_types(norms[0].dtype, torch.float32)
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]))


# The registry: a new minimizer is one class with the SAM interface plus `@register_minimizer("name")`.
MINIMIZERS: dict[str, type[Minimizer]] = {}
# Names that mean "the base optimizer alone" (bench.config.OPTIMIZERS; tasks name theirs in base_optimizer).
BASE_NAMES = ("sgd", "adam", "adamw")


def register_minimizer(name: str):
    def deco(cls):
        MINIMIZERS[name] = cls
        return cls
    return deco


register_minimizer("sam")(SAM)
register_minimizer("asam")(ASAM)


def create_minimizer(name: str, base_optimizer: torch.optim.Optimizer, model: nn.Module, *,
                     base_names: tuple[str, ...] = BASE_NAMES, **hparams) -> Minimizer:
    """Build a minimizer by name, passing only the hyperparameters its constructor takes.

    A name in `base_names` (a task's base optimizer: "sgd", "adam") means the base optimizer alone; any
    other name must be registered: a typo must not silently train without SAM."""
    if name in MINIMIZERS:
        cls = MINIMIZERS[name]
    elif name in base_names:
        cls = Minimizer
    else:
        raise UserError(f"unknown minimizer {name!r}; choose one of: {', '.join(MINIMIZERS)}, or a base "
                        f"optimizer alone: {', '.join(base_names)}")
    accepted = inspect.signature(cls.__init__).parameters
    return cls(base_optimizer, model, **{k: v for k, v in hparams.items() if k in accepted})
