"""Sharpness measures of a trained model (Keskar et al. 2017; Jiang et al. 2020; Kwon et al. 2021; Andriushchenko
et al. 2023), on a fixed set of training examples. Pure torch.

Notation: w = every parameter with requires_grad, in `model.named_parameters()` order, taken as one vector
(all norms are over ALL parameters jointly). L_B(w) = loss_fn(model(x_B), y_B), the mean loss of a batch B.
The examples (the caller's first `Protocol.examples` training examples, in a fixed order) are cut by
`batches_of` into consecutive batches of m (the last may be smaller).

Scaling T (ASAM's convention, exactly): T_w = |w| + eta on parameters whose name contains "weight",
T = 1 on the others (biases, BatchNorm shifts...). Plain measures use T = 1 everywhere. A perturbation is
d = T * delta (element-wise), and delta is what is constrained: ||delta||_p <= rho, i.e. ||d / T||_p <= rho.

- worst_l2, worst_adaptive_l2 (p = 2), worst_linf, worst_adaptive_linf (p = inf):
  per batch, max over ||delta||_p <= rho of L_B(w + T delta) - L_B(w), by projected gradient ascent in delta
  (the gradient in delta is T * grad_w L_B(w + T delta)):
    start: delta = 0 (objective 0, the best so far: d = 0 is feasible, so the value is >= 0), alpha = 2 rho;
    each of the `iters` steps, from the best delta so far and its gradient g:
      l2:   candidate = project_l2ball(delta + alpha * g / ||g||_2)
      linf: candidate = clip(delta + alpha * sign(g), -rho, rho)
    evaluate the candidate (one forward + backward); if its objective beats the best (strictly), it becomes
    the best point, otherwise alpha is halved (and the next step leaves again from the best point).
  With alpha = 2 rho the first step from 0 lands exactly on the first-order solution (SAM's / ASAM's
  rho * T g / ||T g||_2 in T coordinates for l2, rho * sign(g) for linf); further steps at full alpha are
  power-iteration-like on a quadratic, and the halving is a backtracking in the spirit of Auto-PGD's step-size
  halving. If the gradient in delta is exactly zero (an exact critical point), a direction z ~ N(0, I) drawn
  from the batch's generator replaces it. The per-batch value is the BEST objective seen, not the last;
  the measure is the unweighted mean of the per-batch values over batches (m-sharpness).
- avg_l2, avg_adaptive_l2: per batch, `iters` draws z ~ N(0, I) over all parameters, delta = rho z / ||z||_2
  (uniform on the l2 sphere of radius rho in T coordinates), value = mean over draws, then over batches, of
  L_B(w + T delta) - L_B(w). (Average sharpness is l2 only.)
- hessian_top: the largest algebraic eigenvalue of the Hessian of the full loss L(w) = mean over all the given
  examples = sum_B (|B| / N) L_B(w); its Hessian-vector product is that weighted sum of the batches' HVPs
  (double backward with torch.autograd.grad). Power iteration from v ~ N(0, I) (the generator), the estimate
  being the Rayleigh quotient v^T H v of the unit vector v; stop when its relative change is below
  `power_tol`, or after `power_iters` HVPs. Power iteration finds the eigenvalue largest in MAGNITUDE: when
  that one is negative (lambda_dom < 0), a second power iteration on H - lambda_dom I (whose eigenvalues are
  all >= 0, the largest being lambda_max - lambda_dom) gives lambda_max.
- hessian_trace: Hutchinson's estimator, the mean over `iters` Rademacher probes v in {-1, +1}^P of v^T H v,
  with the same full loss.

Randomness: each batch b uses its own torch.Generator on the data's device, seeded with
seed * 1_000_003 + b (the Hessian measures use b = 0); the global RNG is never touched, so a fixed
protocol.seed gives the same value (up to non-deterministic GPU kernels). Computation is in the parameters'
dtype (fp32 in the benchmark) with autocast off. The model is put in eval mode (BatchNorm uses, and never
updates, its running statistics; no dropout); every module's training flag and every parameter are restored
bit-exactly afterwards, and no `.grad` is touched (torch.autograd.grad only).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench.minimizers.base import dot, global_norm

MEASURES = ("worst_l2", "worst_adaptive_l2", "worst_linf", "worst_adaptive_linf",
            "avg_l2", "avg_adaptive_l2", "hessian_top", "hessian_trace")
RHO_MEASURES = MEASURES[:6]      # the ones that take a radius rho; hessian_* take none


@dataclass(frozen=True)
class Protocol:
    examples: int = 1024     # the first N training examples, fixed order (the caller picks them)
    m: int = 128             # batch size of the worst/avg measures (m-sharpness) and of the HVP passes
    iters: int = 20          # ascent steps (worst_*), draws per batch (avg_*), Hutchinson probes (hessian_trace)
    seed: int = 0
    eta: float = 0.01        # adaptive measures: T_w = |w| + eta on parameters named "*weight*", T = 1 elsewhere
    power_iters: int = 100   # hessian_top: cap of power iterations
    power_tol: float = 1e-4  # hessian_top: stop when the relative change of the estimate is below this


def batches_of(x: Tensor, y: Tensor, m: int) -> list[tuple[Tensor, Tensor]]:
    """Consecutive chunks of m examples (the last may be smaller)."""
    if m < 1:
        raise ValueError(f"batch size m must be >= 1, got {m}")
    return [(x[i:i + m], y[i:i + m]) for i in range(0, len(x), m)]


def _check(name: str, rho: float | None, protocol: Protocol) -> None:
    if name not in MEASURES:
        raise ValueError(f"unknown sharpness measure {name!r}; known: {', '.join(MEASURES)}")
    if name in RHO_MEASURES and (rho is None or not rho > 0):
        raise ValueError(f"sharpness measure {name} needs a radius rho > 0, got {rho!r}")
    if protocol.iters < 1 or protocol.power_iters < 1 or protocol.m < 1:
        raise ValueError(f"protocol needs iters, power_iters and m >= 1, got {protocol}")


def _generator(device: torch.device, seed: int, index: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)


@contextmanager
def _evaluating(model: nn.Module):
    """Eval mode inside (BatchNorm reads its running stats, never updates them), every module's flag after:
    model.train(flag) would flatten a mixed-mode model."""
    modes = [(mod, mod.training) for mod in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for mod, flag in modes:
            mod.training = flag


def _loss(model, xb, yb, loss_fn) -> Tensor:
    return loss_fn(model(xb), yb)


def _loss_grad(model, params, xb, yb, loss_fn) -> tuple[float, list[Tensor]]:
    loss = _loss(model, xb, yb, loss_fn)
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    return loss.item(), list(grads)


def _restore(params, w0) -> None:
    """w <- w0 exactly (before each batch: the previous batch left its last perturbation in place)."""
    with torch.no_grad():
        for p, w in zip(params, w0):
            p.copy_(w)


def _place(params, w0, scale, delta) -> None:
    """w <- w0 + T * delta (T = None means 1), in place, from the saved weights (no drift across steps)."""
    with torch.no_grad():
        for p, w, t, d in zip(params, w0, scale, delta):
            p.copy_(w + (d if t is None else t * d))


def _in_delta(grads, scale) -> list[Tensor]:
    """The gradient in delta: T * grad_w."""
    return [g if t is None else t * g for g, t in zip(grads, scale)]


def _randn_like(tensors, gen) -> list[Tensor]:
    return [torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype) for t in tensors]


def _worst(model, params, w0, scale, batch, loss_fn, rho: float, p: str, iters: int, gen) -> float:
    """Per-batch max of L_B(w + T delta) - L_B(w) over ||delta||_p <= rho: projected ascent with halving."""
    xb, yb = batch
    _restore(params, w0)
    base, grads = _loss_grad(model, params, xb, yb, loss_fn)
    best, best_delta, best_g = 0.0, [torch.zeros_like(w) for w in w0], _in_delta(grads, scale)
    alpha = 2.0 * rho
    for _ in range(iters):
        g, norm = best_g, global_norm(best_g)
        if norm.item() == 0.0:                        # exact critical point: no ascent direction, draw one
            g = _randn_like(g, gen)
            norm = global_norm(g)
        if p == "l2":
            cand = [d + (alpha / norm) * t for d, t in zip(best_delta, g)]
            shrink = torch.clamp(rho / global_norm(cand), max=1.0)     # project onto the l2 ball
            cand = [c * shrink for c in cand]
        else:
            cand = [(d + alpha * t.sign()).clamp(-rho, rho) for d, t in zip(best_delta, g)]
        _place(params, w0, scale, cand)
        loss, grads = _loss_grad(model, params, xb, yb, loss_fn)
        if loss - base > best:
            best, best_delta, best_g = loss - base, cand, _in_delta(grads, scale)
        else:
            alpha /= 2.0
    return best


def _average(model, params, w0, scale, batch, loss_fn, rho: float, iters: int, gen) -> float:
    """Per-batch mean of L_B(w + T delta) - L_B(w) over delta uniform on the l2 sphere of radius rho."""
    xb, yb = batch
    _restore(params, w0)
    with torch.no_grad():
        base = _loss(model, xb, yb, loss_fn).item()
        total = 0.0
        for _ in range(iters):
            z = _randn_like(w0, gen)
            norm = global_norm(z)
            _place(params, w0, scale, [(rho / norm) * t for t in z])
            total += _loss(model, xb, yb, loss_fn).item() - base
    return total / iters


def _hvp(model, params, batches, loss_fn, v: list[Tensor]) -> list[Tensor]:
    """H v of the mean loss over all examples: sum_B (|B| / N) H_B v, each by double backward."""
    n = sum(len(xb) for xb, _ in batches)
    out = [torch.zeros_like(t) for t in v]
    for xb, yb in batches:
        loss = _loss(model, xb, yb, loss_fn)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)
        gv = dot(list(grads), v)
        if not gv.requires_grad:                      # the loss is at most linear in w here: H v = 0
            continue
        hv = torch.autograd.grad(gv, params, allow_unused=True, materialize_grads=True)
        for o, h in zip(out, hv):
            o.add_(h.detach(), alpha=len(xb) / n)
    return out


def _power(hvp, v: list[Tensor], iters: int, tol: float, shift: float = 0.0) -> float:
    """Dominant eigenvalue of H - shift I by power iteration; the estimate is the Rayleigh quotient."""
    norm = global_norm(v)
    v = [t / norm for t in v]
    lam = None
    for _ in range(iters):
        hv = [h - shift * t for h, t in zip(hvp(v), v)] if shift else hvp(v)
        new = dot(v, hv).item()
        norm = global_norm(hv)
        if norm.item() == 0.0:                        # H v = 0: v is in the null space, eigenvalue 0
            return new
        v = [t / norm for t in hv]
        if lam is not None and abs(new - lam) <= tol * abs(new):
            return new
        lam = new
    return lam


def _hessian_top(model, params, batches, loss_fn, protocol: Protocol, gen) -> float:
    hvp = lambda v: _hvp(model, params, batches, loss_fn, v)     # noqa: E731
    start = _randn_like(params, gen)
    lam = _power(hvp, start, protocol.power_iters, protocol.power_tol)
    if lam < 0:                 # the dominant eigenvalue is the most negative one: shift it to 0
        lam = lam + _power(hvp, start, protocol.power_iters, protocol.power_tol, shift=lam)
    return lam


def _hessian_trace(model, params, batches, loss_fn, probes: int, gen) -> float:
    total = 0.0
    for _ in range(probes):
        v = [torch.randint(0, 2, p.shape, generator=gen, device=p.device).to(p.dtype) * 2 - 1 for p in params]
        total += dot(v, _hvp(model, params, batches, loss_fn, v)).item()
    return total / probes


def _scales(named, eta: float, adaptive: bool) -> list[Tensor | None]:
    """T per parameter: |w| + eta on "*weight*" parameters of an adaptive measure, None (= 1) otherwise."""
    return [p.detach().abs() + eta if adaptive and "weight" in n else None for n, p in named]


def measure(model: nn.Module, x: Tensor, y: Tensor, loss_fn, name: str, rho: float | None,
            protocol: Protocol) -> float:
    """The sharpness measure `name` (see the module docstring) of `model` on ALL of (x, y) (the caller takes
    its first `protocol.examples`); `rho` is ignored by hessian_*. The model comes back exactly as it was."""
    _check(name, rho, protocol)
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"sharpness measure needs as many targets as examples, at least one: {len(x)}, {len(y)}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("sharpness measure needs a model with trainable parameters")
    params = [p for _, p in named]
    w0 = [p.detach().clone() for p in params]
    batches = batches_of(x, y, protocol.m)
    try:
        with _evaluating(model), torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            if name == "hessian_top":
                return float(_hessian_top(model, params, batches, loss_fn, protocol,
                                          _generator(x.device, protocol.seed, 0)))
            if name == "hessian_trace":
                return float(_hessian_trace(model, params, batches, loss_fn, protocol.iters,
                                            _generator(x.device, protocol.seed, 0)))
            scale = _scales(named, protocol.eta, "adaptive" in name)
            values = []
            for b, batch in enumerate(batches):
                gen = _generator(x.device, protocol.seed, b)
                if name.startswith("worst"):
                    p = "l2" if name.endswith("l2") else "linf"
                    values.append(_worst(model, params, w0, scale, batch, loss_fn, rho, p, protocol.iters, gen))
                else:
                    values.append(_average(model, params, w0, scale, batch, loss_fn, rho, protocol.iters, gen))
            return float(sum(values) / len(values))
    finally:
        _restore(params, w0)


def loss_and_accuracy(model: nn.Module, x: Tensor, y: Tensor, loss_fn, batch: int = 512) -> tuple[float, float]:
    """Mean loss (example-weighted over batches of `batch`) and accuracy % (argmax of the outputs), no grad."""
    total, correct = 0.0, 0
    with _evaluating(model), torch.no_grad():
        for xb, yb in batches_of(x, y, batch):
            out = model(xb)
            total += loss_fn(out, yb).item() * len(xb)
            correct += int((out.argmax(dim=-1) == yb).sum())
    return total / len(x), 100.0 * correct / len(x)
