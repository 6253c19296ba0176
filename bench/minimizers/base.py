"""The step contract every minimizer follows, and the plain one-pass minimizer (SGD / Adam alone).

A minimizer gets, once per optimizer step, a *batch*: a callable that runs forward (and backward) on the
step's examples and adds the gradient to `.grad`:

    batch(kind="plain", index=None, backward=True, per_sample=False) -> Pass

- `kind` says what the pass is for, so the engine can treat it right: "ascent" (at w; its gradient makes
  the perturbation: under DDP it stays local unless the minimizer sets `ascent_sync`, and Shake-Shake's
  `true_gradient` is on), "descent" (at the perturbed weights), "plain" (a one-pass step at w).
- `index`: run only these examples of the batch (ESAM's data selection); the loss is their mean.
- `backward=False`: forward only, under no_grad (ESAM's loss probe).
- `per_sample=True`: the Pass carries every example's loss too (detached).

The batch hides gradient accumulation (`--accumulate K`: one call = K micro-batches, gradients summed),
mixed precision (under fp16 every backward is loss-scaled and the gradients are unscaled and checked
right after the call: minimizers always see true gradients) and the cost accounting (forward and backward
examples, counted where they run, so no minimizer can misreport its passes).

A minimizer's `step(batch)` returns the Pass (or, for a plain callable, its return value) of its
unperturbed pass: the training metrics come from it. Plain zero-argument callables (`closure()` that runs
forward + backward) are accepted too and wrapped by `as_batch`; they support full-batch passes only.

Hyperparameters: each minimizer declares a frozen dataclass `Hparams` whose fields carry their default,
range and meaning (`bench.options.option`); `bench list`, the CLI's `--mopt` and the recipes'
`[minimizers.<name>]` tables all read it. How the engine runs the passes (BatchNorm in the second pass, its
randomness, clipping, the fp16 scaler) reaches every minimizer as one `Switches` value.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import nn

from bench.minimizers.scaler import LossScaler
from bench.options import make_options

KINDS = ("ascent", "descent", "plain")


class Pass(NamedTuple):
    loss: torch.Tensor                  # mean loss over the examples run (detached)
    out: Any = None                     # the model's outputs (detached)
    per_sample: torch.Tensor | None = None  # each example's loss (detached), when asked


@dataclass(frozen=True)
class NoHparams:
    """The base optimizer alone has no minimizer options."""


BN_SECOND_PASS = ("update", "freeze")
SECOND_PASS_RNG = ("fresh", "reuse")


@dataclass(frozen=True)
class Switches:
    """How the engine has a minimizer run its passes, apart from what the minimizer computes (its options): the
    run's BatchNorm statistics in the second pass, the second pass's randomness, gradient clipping, and the fp16
    loss scaler. One typed value from the RunConfig to the minimizer (SAM's and the variants' read what they
    need; the base optimizer alone uses clip_norm and scaler)."""
    bn_second_pass: str = "update"   # update (official) | freeze: BatchNorm statistics of the first pass only
    second_pass_rng: str = "fresh"   # fresh (official) | reuse: dropout/ShakeDrop masks of pass 1 in pass 2
    clip_norm: float = 0.0           # clip the update's gradient to this global norm (0: off)
    scaler: LossScaler | None = None  # fp16's loss scaler

    def __post_init__(self):
        if self.bn_second_pass not in BN_SECOND_PASS:
            raise ValueError(f"bn_second_pass must be one of {BN_SECOND_PASS}, got {self.bn_second_pass!r}")
        if self.second_pass_rng not in SECOND_PASS_RNG:
            raise ValueError(f"second_pass_rng must be one of {SECOND_PASS_RNG}, got {self.second_pass_rng!r}")
        if not self.clip_norm >= 0:
            raise ValueError(f"clip_norm must be >= 0, got {self.clip_norm}")


class CallableBatch:
    """A zero-argument closure seen through the batch contract: full-batch passes with backward only."""

    def __init__(self, closure: Callable):
        self.closure = closure
        self.scaler = None

    def __call__(self, kind: str = "plain", index=None, backward: bool = True, per_sample: bool = False):
        if index is not None or not backward or per_sample:
            raise TypeError("this minimizer needs the engine's batch (subsets, probes or per-example losses); "
                            "a plain closure() cannot provide them")
        return self.closure()

    def found_inf(self) -> bool:
        return False


def as_batch(closure) -> Any:
    return closure if hasattr(closure, "found_inf") else CallableBatch(closure)


class Minimizer:
    """Plain base-optimizer training: one forward/backward per step (SGD and Adam runs)."""

    Hparams: type = NoHparams
    passes = 1            # nominal forward+backward passes of a step (the batch counts what really ran)
    ascent_sync = False   # True: under DDP the ascent gradient must be all-reduced (it enters the update)
    supports_chunks = False  # step_chunks (m-sharpness, --m) is available
    schedulable = False   # a two-pass step a plain base step may replace (--sam-from, --sam-every: train/schedule)
    reports_gap = True    # its ascent and descent passes are at w and w + e: their loss gap is SAM's surrogate gap
    citation = ""

    def __init__(self, base_optimizer: torch.optim.Optimizer, model: nn.Module, switches: Switches | None = None,
                 **options):
        self.base_optimizer = base_optimizer
        self.model = model
        self.switches = switches or Switches()
        self.clip_norm = float(self.switches.clip_norm)  # 0: no clipping; else the update's gradient norm is clipped
        self.scaler = self.switches.scaler
        owner = f"minimizer {type(self).name}" if hasattr(type(self), "name") else "the base optimizer alone"
        self.hp = make_options(owner, self.Hparams, options)  # an option it does not have is refused, never dropped
        for f in fields(self.hp):  # the live values (checkpointed in hparams())
            setattr(self, f.name, getattr(self.hp, f.name))

    @property
    def param_groups(self):  # lets torch.optim.lr_scheduler drive the base optimizer through us
        return self.base_optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, batch):
        """One pass at w, then the base step."""
        return self.plain_step(batch)

    def plain_step(self, batch):
        """One pass at w, then the base optimizer's step, whatever this minimizer's own step is: the steps a schedule
        (--sam-from, --sam-every) gives the base optimizer alone. fp16's overflow check and clipping as any step."""
        batch = as_batch(batch)
        out = batch("plain")
        Minimizer._base_step(self, batch)
        return out

    def skip_if_overflow(self, batch) -> bool:
        """fp16: True (and the step is abandoned: gradients cleared, scale lowered, skip counted) when a pass
        of this step overflowed. One host sync per call, as GradScaler's step has."""
        if batch.scaler is None or not batch.found_inf():
            return False
        self.base_optimizer.zero_grad()
        batch.scaler.update(overflow=True)
        return True

    def _base_step(self, batch=None) -> None:
        if batch is not None and self.skip_if_overflow(batch):
            return
        if self.clip_norm > 0:
            params = [p for g in self.base_optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.clip_norm, foreach=True)
        self.base_optimizer.step()
        self.base_optimizer.zero_grad()
        if batch is not None and batch.scaler is not None:
            batch.scaler.update(overflow=False)

    def hparams(self) -> dict:
        return {"clip_norm": self.clip_norm, **{f.name: getattr(self, f.name) for f in fields(self.hp)}}

    def extra_state(self) -> dict:
        """What a minimizer carries across steps (tensors and plain values): saved in checkpoints."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def on_params(self, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors an `extra_state` kept by parameter name, each copied onto its parameter's device and dtype
        (names the model no longer has are dropped)."""
        params = dict(self.model.named_parameters())
        return {n: t.detach().to(device=params[n].device, dtype=params[n].dtype, copy=True)
                for n, t in saved.items() if n in params}

    def state_dict(self) -> dict:
        return {"base": self.base_optimizer.state_dict(), "hparams": self.hparams(), "extra": self.extra_state(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.base_optimizer.load_state_dict(state["base"])
        for key, value in state.get("hparams", {}).items():
            setattr(self, key, value)
        if state.get("extra"):
            self.load_extra_state(state["extra"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """|| (||t||_2 for t in tensors) ||_2, in fp32 at least (fp16/bf16 gradients are upcast)."""
    norms = torch._foreach_norm(tensors)
    dtype = torch.promote_types(norms[0].dtype, torch.float32)
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]))


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """sum over tensors of <a_i, b_i>, in fp32 at least."""
    parts = [torch.sum(x.to(torch.promote_types(x.dtype, torch.float32)) * y) for x, y in zip(a, b)]
    return torch.stack(parts).sum()
