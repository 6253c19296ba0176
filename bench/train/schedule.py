"""Where a run spends the second pass: `--sam-from X` (late-phase SAM) and `--sam-every K` (a two-pass step every
K-th step), for any minimizer whose step is a two-pass perturbation (`Minimizer.schedulable`).

Every other step is the base optimizer's plain step (`Minimizer.plain_step`: one pass at w, the base step), so no
minimizer holds code for it. Whether a step takes two passes is a function of the run's epoch and its step count
(`Cost.steps`, both checkpointed): a resumed run takes exactly the steps an uninterrupted one takes, and every DDP
rank decides alike without a word between them.

- `--sam-from X`: plain steps in epochs 0 .. s-1, the minimizer from epoch s (0-based) on, with s = X for an
  integer X >= 1 and s = floor(X * epochs) for 0 < X < 1 (0.875 of 200 epochs: the last 25; of 4: the last one). As in the late-phase
  paper's official script (Zhou et al., ICLR 2025; zzp1012/SAM-in-Late-Phase `script/ERM_to_SAM.py`), the
  two-pass phase starts with a fresh base optimizer: that script steps a second SGD (its SAM's own) from the
  switch, so the momentum of the plain phase does not carry over; here the one base optimizer's state (momentum
  buffers, Adam's moments) is cleared at the first step of epoch s, and the learning-rate schedule runs on
  unchanged, as the script's one scheduler drives both optimizers. Differences from that script: it switches
  with `start_SAM <= epoch <= end_SAM` and can switch back (`end_SAM` < epochs), which this does not; its SAM is
  davda54/sam with BatchNorm's running statistics frozen in the second pass, which here is the run's
  `--bn-second-pass` (default `update`, the SAM paper's official code); its default rho (2.0, with `adaptive`)
  is its own experiment's, not a default here: the minimizer's options are the run's.
- `--sam-every K`: the step whose 0-based index t has (t + 1) % K == 0 takes two passes, the others one: the
  K-th, 2K-th, ... steps of the run (counted over the whole run, not per epoch), as Composer's SAM `interval`
  (mosaicml/composer `composer/algorithms/sam/sam.py`: `(global_step + 1) % interval == 0`). Like Composer, the
  plain steps step the same base optimizer (one momentum). Composer advises scaling rho with the interval; this
  does not (rho is the run's option). Differences: Composer's epsilon is 1e-12 where the minimizers here add their
  official codes' own; Composer skips a step whose closure returns no loss (its AMP path), here fp16 overflow is
  the loss scaler's (`skip_if_overflow`).
- Both together: two passes at every K-th step from epoch s on.
"""
from __future__ import annotations

from bench.config import RunConfig, sam_start_epoch


def two_pass(cfg: RunConfig, epoch: int, step: int) -> bool:
    """Whether step `step` (0-based, counted over the run) of 0-based epoch `epoch` takes the minimizer's step."""
    return epoch >= sam_start_epoch(cfg.sam_from, cfg.epochs) and (step + 1) % cfg.sam_every == 0


def switches_now(cfg: RunConfig, epoch: int) -> bool:
    """Whether epoch `epoch` (0-based) opens the two-pass phase of a --sam-from run (the base optimizer's state is
    then dropped, see the module docstring)."""
    return bool(cfg.sam_from) and epoch == sam_start_epoch(cfg.sam_from, cfg.epochs)
