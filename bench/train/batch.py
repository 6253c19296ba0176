"""The engine's side of the step contract (bench/minimizers/base.py): one optimizer step's examples as a
callable a minimizer runs passes with.

    batch(kind, index=None, backward=True, per_sample=False) -> Pass(loss, out, per_sample)

It does what no minimizer should have to know: the forward under autocast, the task's loss (and the SAM
code's L2 term), gradient accumulation over micro-batches, DDP's no_sync, the fp16 loss scale and the
unscale + overflow check after each pass, Shake-Shake's true_gradient switch, and the cost accounting:
every forward and backward is counted in examples where it runs (`Cost`). It also keeps the loss of the step's
first whole-batch pass of each kind, so the engine can log the surrogate gap L(w + e) - L(w) that a two-pass
step measures anyway (`surrogate_gap`).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from bench import distributed as D
from bench.errors import UserError
from bench.minimizers.base import KINDS, Pass
from bench.task import cross_entropy_per_example


@dataclass
class Cost:
    """What the steps ran, summed over steps (per replica): forward and backward passes in units of the
    step's batch (a pass over half the batch counts 0.5), the same in examples, and the steps taken."""
    fwd: float = 0.0
    bwd: float = 0.0
    fwd_examples: int = 0
    bwd_examples: int = 0
    steps: int = 0

    def passes(self) -> float:
        """Forward+backward passes, a forward alone counting one third (a backward costs about two forwards):
        the number of SGD steps of the same compute (SGD: one per step, SAM: two)."""
        return (self.fwd + 2 * self.bwd) / 3


def take(x, index):
    """The examples `index` (or the slice) of a batch: tensors, or tuples/lists/dicts of them."""
    if isinstance(x, torch.Tensor):
        return x[index]
    if isinstance(x, (tuple, list)):
        return type(x)(take(v, index) for v in x)
    if isinstance(x, dict):
        return {k: take(v, index) for k, v in x.items()}
    return x


def default_per_sample(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.dim() == 2 and y.dim() == 1:
        return cross_entropy_per_example()(out, y)
    raise UserError("this minimizer needs every example's loss, which this task does not provide "
                    "(Job.loss_per_sample); use sam, asam or another minimizer")


def micro_slices(n: int, k: int) -> list[slice]:
    """n examples as min(k, n) contiguous micro-batches, the first n % k one longer (torch.tensor_split's
    split). Slices, not index tensors: a slice of a device tensor is a view, where an index tensor built on
    the host would be copied to the device for every micro-batch of every pass."""
    k = min(k, n)
    size, extra = divmod(n, k)
    bounds = [i * size + min(i, extra) for i in range(k + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def forward(model: nn.Module, x):
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


class Batch:
    def __init__(self, net: nn.Module, model: nn.Module, x, y, loss_fn: Callable, *, cost: Cost,
                 per_sample_fn: Callable | None = None, autocast: Callable = contextlib.nullcontext,
                 scaler=None, micro: int = 1, weight: float = 1.0, no_sync: Callable | None = None,
                 local_ascent: bool = True, reduce: bool = True, shakes: tuple = (),
                 extra_loss: Callable[[], torch.Tensor] | None = None, step_n: int | None = None):
        self.net, self.model, self.x, self.y, self.loss_fn = net, model, x, y, loss_fn
        self.cost, self.per_sample_fn, self.autocast, self.scaler = cost, per_sample_fn, autocast, scaler
        self.micro, self.weight, self.no_sync = micro, weight, no_sync or contextlib.nullcontext
        self.local_ascent, self.reduce, self.shakes, self.extra_loss = local_ascent, reduce, shakes, extra_loss
        self.n = y.shape[0]
        self.step_n = step_n or self.n  # the step's whole batch: passes are counted in its units
        self._found = None
        self.measured: dict[str, torch.Tensor] = {}  # kind -> loss of the step's first whole-batch pass of it

    def chunks(self, m: int) -> list["Batch"]:
        """The batch as chunks of m examples (m-sharpness): each a Batch of its own whose loss is weighted by
        its share, all counting into the same Cost; only the last may all-reduce under DDP."""
        starts = list(range(0, self.n, m))
        out = []
        for i, s in enumerate(starts):
            sl = slice(s, min(s + m, self.n))
            b = copy.copy(self)  # the same model, loss, cost, scaler, contexts; its own examples and overflow flag
            b.x, b.y, b.n, b.micro, b._found = take(self.x, sl), take(self.y, sl), sl.stop - sl.start, 1, None
            b.measured = {}  # its own losses (copy.copy would share the dict)
            b.weight = self.weight * b.n / self.n
            b.reduce = self.reduce and i == len(starts) - 1
            out.append(b)
        return out

    def surrogate_gap(self) -> torch.Tensor | None:
        """L(w + e) - L(w) of this step, in float64 on the device (no host sync): the loss of the first
        whole-batch "descent" pass (forward-only probes count: ESAM's probe at w + e) minus that of the first
        whole-batch "ascent" pass; None unless both ran (a one-pass step, an fp16 step abandoned after its
        first pass). Subset passes (ESAM's second pass on its selection) are not the batch's loss and never
        count. The losses are the task's loss as train_loss reports it: mean over the batch (micro-batches
        averaged), unscaled, without the L2 term of weight_decay_style='loss'."""
        if "ascent" not in self.measured or "descent" not in self.measured:
            return None
        return self.measured["descent"].double() - self.measured["ascent"].double()

    def found_inf(self) -> bool:
        """Whether a pass of this step overflowed (fp16) on any replica. A host sync, as GradScaler's step has.

        Under DDP an ascent pass runs locally (no_sync): one replica's first gradient can overflow while the
        others' do not. Were each rank to decide alone, that one would skip the step and halve its scale while
        the others step: their next all-reduces would pair gradients of different steps, then a collective
        would wait forever. So the flag is summed over the ranks first (one all-reduce of one number, fp16
        under DDP only), and every rank skips, and rescales, together."""
        if not D.is_distributed():
            return self._found is not None and bool(self._found.item())
        found = (self._found.clone() if self._found is not None
                 else torch.zeros(1, device=next(self.model.parameters()).device))
        D.all_reduce_sum(found)
        return bool(found.item())

    def __call__(self, kind: str = "plain", index=None, backward: bool = True, per_sample: bool = False) -> Pass:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        x, y = (self.x, self.y) if index is None else (take(self.x, index), take(self.y, index))
        n = y.shape[0]
        if n == 0:
            raise ValueError("a pass over no examples")
        for module in self.shakes:  # SAM code: true_gradient in the pass whose gradient perturbs
            module.true_gradient = kind == "ascent"
        pieces = micro_slices(n, self.micro)
        losses, outs, per = [], [], []
        for i, piece in enumerate(pieces):
            xs, ys = (x, y) if len(pieces) == 1 else (take(x, piece), take(y, piece))
            last = i == len(pieces) - 1
            sync = last and self.reduce and not (kind == "ascent" and self.local_ascent)
            share = (piece.stop - piece.start) / n
            with (contextlib.nullcontext() if sync or not backward else self.no_sync()):
                loss, out, ps = self._run(xs, ys, share, backward, per_sample)
            losses.append(loss * share if len(pieces) > 1 else loss)
            outs.append(out)
            per.append(ps)
        if backward and self.scaler is not None:
            self._unscale()
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        if index is None and kind != "plain":
            self.measured.setdefault(kind, loss)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return Pass(loss, out, (per[0] if len(per) == 1 else torch.cat(per)) if per_sample else None)

    def _run(self, x, y, share: float, backward: bool, per_sample: bool):
        self.cost.fwd += y.shape[0] / self.step_n
        self.cost.fwd_examples += y.shape[0]
        with (contextlib.nullcontext() if backward else torch.no_grad()), self.autocast():
            out = forward(self.net, x)
            loss = self.loss_fn(out, y)
            total = loss if self.extra_loss is None else loss + self.extra_loss()
        ps = None
        if per_sample:
            with torch.no_grad():
                ps = (self.per_sample_fn or default_per_sample)(out.detach(), y).detach().float()
        if backward:
            self.cost.bwd += y.shape[0] / self.step_n
            self.cost.bwd_examples += y.shape[0]
            w = share * self.weight  # a device tensor under DDP for a task that counts tokens (no host sync)
            total = total if isinstance(w, float) and w == 1.0 else total * w
            (total * self.scaler.scale if self.scaler is not None else total).backward()
        return loss.detach(), out.detach(), ps

    def _unscale(self) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self._found is None:
            device = grads[0].device if grads else torch.device("cpu")
            self._found = torch.zeros(1, device=device)
        self.scaler.unscale_(grads, self._found)
