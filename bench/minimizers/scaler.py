"""A dynamic loss scaler for fp16 that a two-pass step can use.

torch's `GradScaler` unscales each optimizer's gradients at most once per `update()` ("unscale_() has already
been called on this optimizer since the last update()"), so it cannot unscale SAM's first gradient (needed
for the perturbation's norm) and then the second one in the same step. This scaler is the same algorithm
with the bookkeeping per *pass* instead of per optimizer:

- every backward pass of a step multiplies its loss by the same `scale`;
- after each pass the gradients are unscaled in place and checked (one fused kernel,
  `torch._amp_foreach_non_finite_check_and_unscale_`, the one GradScaler uses); a non-finite value in any
  pass marks the step;
- a marked step is skipped (no base step) and the scale is multiplied by `backoff`; after `interval`
  unmarked steps in a row it is multiplied by `growth`: GradScaler's defaults and rules, so a one-pass step
  scales exactly as GradScaler does (tests/train/test_precision_accumulate.py compares the two).
"""
from __future__ import annotations

import torch


class LossScaler:
    def __init__(self, init_scale: float = 2.0 ** 16, growth: float = 2.0, backoff: float = 0.5,
                 interval: int = 2000):
        self.scale = float(init_scale)
        self.growth, self.backoff, self.interval = float(growth), float(backoff), int(interval)
        self.good_steps = 0   # unmarked steps since the last change of scale
        self.skipped = 0      # steps skipped for an overflow, over the whole run

    @torch.no_grad()
    def unscale_(self, grads: list[torch.Tensor], found_inf: torch.Tensor) -> None:
        """grads /= scale in place; found_inf (a 1-element float tensor) is set to 1 if any is inf/nan."""
        if not grads:
            return
        by_device: dict = {}
        for g in grads:
            by_device.setdefault((g.device, g.dtype), []).append(g)
        for (device, _), group in by_device.items():
            inv = torch.full((), 1.0 / self.scale, dtype=torch.float32, device=device)
            found = torch.zeros(1, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv)
            found_inf += found.to(found_inf.device)

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale *= self.backoff
            self.good_steps = 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps == self.interval:
            self.scale *= self.growth
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps, self.skipped = state["scale"], state["good_steps"], state["skipped"]
