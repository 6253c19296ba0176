"""Live tracking of a run: `--log tensorboard|wandb|none` (default none).

What is logged: every optimizer step's first-pass training loss and learning rate (x axis: the global step),
every epoch's numeric metrics (x axis: the epoch; `surrogate_gap` where the minimizer measures one), the run's
settings as hyperparameters, and the run's final summary. The CSVs (epochs.csv, the results row) stay the source
of truth: a tracker only mirrors them, and a backend that fails during training is switched off with one line on
stderr instead of ending the run.

No host sync per step: `Tracker.step` keeps the step's loss as a device tensor (detached, copied) and the step
number and learning rate as Python numbers; `Tracker.epoch` brings the epoch's losses to the host with one
`.tolist()` and writes everything. Both backends are optional dependencies (`pip install 'sambench[tracking]'`);
`check_tracking` refuses a missing one in one line before training starts.

TensorBoard: event files in `runs/<run_id>/tensorboard/`. The settings go in as a text table ("settings") and as
the HParams plugin's summaries written into that same run (not through `SummaryWriter.add_hparams`, which makes a
sub-run in a folder of its own per call: a second run per run id, and a third after a resume), so
`tensorboard --logdir <results>/runs` lists one run per run id, with its hyperparameters beside its metrics. A
resumed run (same run id, a new process) writes a new event file in the same folder; its writer's `purge_step` is
the first step it logs, so TensorBoard drops the steps an earlier process logged after its last checkpoint.

W&B: `wandb.init(id=run_id, name=run_id, resume="allow", dir=runs/<run_id>/)`, project `$WANDB_PROJECT` else
"sambench"; mode: the user's own choice (`WANDB_MODE`, or the mode `wandb offline` / `wandb online` stored in
wandb's settings files) if any, else "online" when the user is logged in (`WANDB_API_KEY` or
`WANDB_IDENTITY_TOKEN_FILE` set, or an API key for the W&B host in the netrc file `wandb login` writes; read
locally, no network), else "offline" (`wandb sync runs/<run_id>/wandb/offline-run-*` uploads it later). W&B's
own step is the global optimizer step for every row, so it keeps increasing across resumes; step metrics are
plotted against `global_step`, epoch metrics against `epoch` (`define_metric`).
"""
from __future__ import annotations

import configparser
import importlib
import math
import netrc
import numbers
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from bench.errors import UserError

KINDS = ("none", "tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --log kind -> the package it needs
WANDB_HOST = "https://api.wandb.ai"
WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")
CHUNK = 1024  # steps whose buffered losses are stacked into one device tensor (bounds the Python objects held)


def check_tracking(kind: str) -> None:
    """Refuse, in one line, an unknown `--log` kind or one whose package cannot be imported."""
    if kind not in KINDS:
        raise UserError(f"unknown --log {kind!r}: choose one of {', '.join(KINDS)}")
    if kind == "none":
        return
    package = PACKAGES[kind]
    try:
        importlib.import_module(package)
        if kind == "tensorboard":
            importlib.import_module("torch.utils.tensorboard")  # what SummaryWriter needs on top of the package
    except ImportError:
        raise UserError(f"--log {kind} needs the {package} package: pip install 'sambench[tracking]' "
                        f"(or pip install {package})") from None
    except Exception as e:  # installed but broken (a conflicting protobuf, say): still one line
        raise UserError(f"--log {kind}: the {package} package failed to import ({_one_line(e)}); reinstall it: "
                        f"pip install 'sambench[tracking]'") from None


class Tracker:
    """No tracking (`--log none`); the base of the real trackers. The engine calls `step` after every optimizer
    step, `epoch` at the end of every epoch and `close` once at the end of the run (also after a failure)."""

    kind = "none"

    def step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        pass

    def epoch(self, epoch: int, metrics: dict) -> None:
        pass

    def close(self, summary: dict) -> None:
        pass


def make_tracker(kind: str, cfg, folder: Path) -> Tracker:
    """The tracker of `--log kind` for the run `cfg` (a RunConfig), writing under `folder` (runs/<run_id>/)."""
    check_tracking(kind)
    if kind == "none":
        return Tracker()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return TensorBoardTracker(cfg, folder) if kind == "tensorboard" else WandbTracker(cfg, folder)
    except UserError:
        raise
    except Exception as e:  # W&B online with no network, a bad API key, an unwritable folder...
        hint = " (WANDB_MODE=offline logs without the network)" if kind == "wandb" else ""
        raise UserError(f"--log {kind}: could not start tracking: {_one_line(e)}{hint}") from None


# ---------------------------------------------------------------------------------------------- the settings


def hparams(cfg) -> dict[str, str | int | float | bool]:
    """The run's settings (`RunConfig.to_row()`, the run id first) as scalars: anything else becomes a string."""
    row = {"run_id": cfg.run_id, **cfg.to_row()}
    return {k: v if isinstance(v, (str, bool, int, float)) else str(v) for k, v in row.items()}


def table(values: dict) -> str:
    """A markdown table of name/value pairs (TensorBoard's text plugin renders it)."""
    lines = ["| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {str(v).replace('|', '&#124;')} |" for k, v in values.items()]
    return "\n".join(lines)


def numbers_of(metrics: dict, skip: tuple[str, ...] = ()) -> dict[str, float | int]:
    """The finite numeric values of a metrics dict (bools, strings, None, lists, NaN and infinities left out)."""
    out: dict[str, float | int] = {}
    for k, v in metrics.items():
        if k in skip or isinstance(v, bool):
            continue
        if isinstance(v, torch.Tensor):  # at an epoch's end, not per step: a sync here is fine
            if v.numel() != 1 or v.dtype == torch.bool:
                continue
            v = v.item()
        if not isinstance(v, numbers.Real):
            continue
        v = int(v) if isinstance(v, numbers.Integral) else float(v)
        if isinstance(v, float) and not math.isfinite(v):
            continue
        out[str(k)] = v
    return out


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ------------------------------------------------------------------------------------- the buffered trackers


class BufferedTracker(Tracker):
    """Buffers the steps on the device and hands whole epochs to a backend (`_write`, `_summary`, `_finish`).
    A backend error switches the tracker off (one line on stderr; `failed` keeps it): training goes on."""

    def __init__(self) -> None:
        self._steps: list[int] = []
        self._lrs: list[Any] = []
        self._losses: list[torch.Tensor | float] = []  # 0-dim tensors, stacked chunks of CHUNK of them, floats
        self._since_stack = 0
        self.last_step: int | None = None
        self.last_epoch: int | None = None
        self.failed: str | None = None
        self.closed = False

    def step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        if self.failed or self.closed:
            return
        try:
            self._steps.append(step)
            self._lrs.append(lr)
            if isinstance(loss, torch.Tensor):  # a copy: the caller may reuse the tensor; no sync
                self._losses.append(loss.detach().to(torch.float32, copy=True).reshape(()))
            else:
                self._losses.append(loss)
            self._since_stack += 1
            if self._since_stack >= CHUNK:
                self._stack()
        except Exception as e:
            self._fail(e)

    def epoch(self, epoch: int, metrics: dict) -> None:
        if self.failed or self.closed:
            return
        try:
            rows = self._flush()
            self._write(rows, epoch, numbers_of(metrics, skip=("epoch",)))
            self.last_epoch = epoch
        except Exception as e:
            self._fail(e)

    def close(self, summary: dict) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.failed:
            try:
                rows = self._flush()  # steps of an epoch that did not end (a failure): still logged
                if rows:
                    self._write(rows, None, {})
                self._summary(summary)
            except Exception as e:
                self._fail(e)
        try:  # also after a failure: close the files, end the W&B run
            self._finish(summary)
        except Exception as e:
            self._fail(e)

    # the buffer

    def _stack(self) -> None:
        """Stack the last chunk of 0-dim tensors into one tensor (a device op, no sync), if they share a device."""
        tail = self._losses[-self._since_stack:]
        if all(isinstance(t, torch.Tensor) and t.dim() == 0 for t in tail) and len({t.device for t in tail}) == 1:
            self._losses[-self._since_stack:] = [torch.stack(tail)]
        self._since_stack = 0

    def _flush(self) -> list[tuple[int, float, float]]:
        """The buffered steps as (step, loss, lr) on the host: one `.tolist()` per device (one sync)."""
        if not self._steps:
            return []
        losses = host_values(self._losses)
        rows = [(int(s), v, float(lr)) for s, v, lr in zip(self._steps, losses, self._lrs)]
        self._steps, self._lrs, self._losses, self._since_stack = [], [], [], 0
        self.last_step = rows[-1][0]
        return rows

    def _fail(self, e: Exception) -> None:
        if self.failed:
            return
        self.failed = _one_line(e)
        print(f"sambench: --log {self.kind} switched off: {self.failed} (training goes on; the CSVs are "
              f"unaffected)", file=sys.stderr)

    # the backend

    def _write(self, rows: list[tuple[int, float, float]], epoch: int | None, metrics: dict) -> None:
        raise NotImplementedError

    def _summary(self, summary: dict) -> None:
        raise NotImplementedError

    def _finish(self, summary: dict) -> None:
        raise NotImplementedError


def host_values(items: list) -> list[float]:
    """Flatten 0-dim / 1-D tensors and floats, in order, to Python floats: one cat + tolist per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in items:
        if isinstance(t, torch.Tensor):
            by_device.setdefault(t.device, []).append(t.reshape(-1))
    host = {d: iter(torch.cat(ts).tolist()) for d, ts in by_device.items()}
    out: list[float] = []
    for t in items:
        if isinstance(t, torch.Tensor):
            it = host[t.device]
            out.extend(next(it) for _ in range(t.numel()))
        else:
            out.append(float(t))
    return out


class TensorBoardTracker(BufferedTracker):
    """Tags: step/loss, step/lr (global step); epoch/<metric> (epoch); summary/<value> and the text tables
    "settings" and "summary". The writer opens at the first write, with purge_step = the first step logged."""

    kind = "tensorboard"

    def __init__(self, cfg, folder: Path) -> None:
        super().__init__()
        from torch.utils.tensorboard import SummaryWriter
        self._writer_class = SummaryWriter
        self.log_dir = Path(folder) / "tensorboard"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.hparams = hparams(cfg)
        self.writer = None

    def _open(self, purge_step: int | None, metric_tags: list[str]) -> None:
        self.writer = w = self._writer_class(log_dir=str(self.log_dir), purge_step=purge_step, flush_secs=30)
        w.add_text("settings", table(self.hparams), global_step=0)
        try:  # the HParams dashboard: its three summaries in this run, not in a sub-run as add_hparams does
            from torch.utils.tensorboard.summary import hparams as hparams_summaries
            file_writer = w._get_file_writer()
            for s in hparams_summaries(self.hparams, {t: 0.0 for t in metric_tags}):
                file_writer.add_summary(s, 0)
        except Exception:
            pass  # the text table has the settings anyway

    def _write(self, rows, epoch, metrics) -> None:
        if self.writer is None:
            self._open(rows[0][0] if rows else None, [f"epoch/{k}" for k in metrics])
        w = self.writer
        for step, loss, lr in rows:
            w.add_scalar("step/loss", loss, step)
            w.add_scalar("step/lr", lr, step)
        if epoch is not None:
            for k, v in metrics.items():
                w.add_scalar(f"epoch/{k}", v, epoch)
        w.flush()

    def _summary(self, summary: dict) -> None:
        if self.writer is None:
            self._open(None, [])
        at = self.last_epoch if self.last_epoch is not None else 0
        values = numbers_of(summary)
        for k, v in values.items():
            self.writer.add_scalar(f"summary/{k}", v, at)
        shown = {k: v for k, v in summary.items() if isinstance(v, (str, bool, int, float))}
        self.writer.add_text("summary", table(shown), global_step=at)

    def _finish(self, summary: dict) -> None:
        if self.writer is not None:
            self.writer.close()


# ------------------------------------------------------------------------------------------------------- W&B


def wandb_settings() -> dict[str, str]:
    """wandb's stored settings (`[default]` of its global settings file, then ./wandb/settings), as wandb reads
    them; {} when there are none."""
    config_dir = os.environ.get("WANDB_CONFIG_DIR")
    stored = Path(config_dir).expanduser() if config_dir else Path("~/.config/wandb").expanduser()
    paths = [stored / "settings", Path("wandb") / "settings"]
    out: dict[str, str] = {}
    for path in paths:
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
            out.update(parser.items("default"))
        except (OSError, configparser.Error):
            continue
    return out


def wandb_logged_in() -> bool:
    """Whether wandb would find credentials, read locally (no network): WANDB_API_KEY or WANDB_IDENTITY_TOKEN_FILE,
    or an API key for the W&B host ($WANDB_BASE_URL, else the stored base_url, else api.wandb.ai) in the netrc file
    (`$NETRC`, else ~/.netrc, else ~/_netrc), where `wandb login` keeps it."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base = os.environ.get("WANDB_BASE_URL") or wandb_settings().get("base_url") or WANDB_HOST
    host = urlsplit(base).netloc or base
    if os.environ.get("NETRC"):
        path = Path(os.environ["NETRC"]).expanduser()
    else:
        path = next((p for p in (Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()) if p.exists()),
                    Path("~/.netrc").expanduser())
    try:
        creds = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(creds and creds[2])


def wandb_mode() -> str:
    """The user's own choice (WANDB_MODE; a true WANDB_DISABLED; a mode stored by `wandb offline`), else online
    when logged in, else offline."""
    explicit = os.environ.get("WANDB_MODE", "").strip().lower()
    if explicit in WANDB_MODES:
        return explicit
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        return "disabled"
    stored = wandb_settings().get("mode", "").strip().lower()
    if stored in WANDB_MODES:
        return stored
    return "online" if wandb_logged_in() else "offline"


class WandbTracker(BufferedTracker):
    """Keys: step/loss, step/lr against global_step; epoch/<metric> against epoch; the summary in run.summary
    (summary/<value>, status and note as they are). Every row's W&B step is the global optimizer step."""

    kind = "wandb"

    def __init__(self, cfg, folder: Path) -> None:
        super().__init__()
        import wandb
        self.mode = wandb_mode()
        if getattr(wandb, "run", None) is not None:  # an earlier run of this process left open: never log into it
            wandb.run.finish()
        kwargs: dict[str, Any] = {}
        if not os.environ.get("WANDB_CONSOLE"):  # progress bars are not worth capturing; the user may ask
            kwargs["settings"] = wandb.Settings(console="off")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "sambench", name=cfg.run_id, id=cfg.run_id,
                              resume="allow", dir=str(folder), mode=self.mode, config=hparams(cfg), **kwargs)
        # a resumed online run continues at the server's step: steps below it were logged already
        self._floor = int(getattr(self.run, "step", 0) or 0)
        self.run.define_metric("global_step")
        self.run.define_metric("step/*", step_metric="global_step")
        self.run.define_metric("epoch")
        self.run.define_metric("epoch/*", step_metric="epoch")

    def _write(self, rows, epoch, metrics) -> None:
        for step, loss, lr in rows:
            if step >= self._floor:
                self.run.log({"global_step": step, "step/loss": loss, "step/lr": lr}, step=step)
        if epoch is not None:
            at = self.last_step if self.last_step is not None else self._floor
            if at >= self._floor:
                self.run.log({"epoch": epoch, **{f"epoch/{k}": v for k, v in metrics.items()}}, step=at)

    def _summary(self, summary: dict) -> None:
        values: dict[str, Any] = {f"summary/{k}": v for k, v in numbers_of(summary).items()}
        values.update({k: summary[k] for k in ("status", "note") if isinstance(summary.get(k), str)})
        self.run.summary.update(values)

    def _finish(self, summary: dict) -> None:
        self.run.finish(exit_code=0 if summary.get("status", "ok") in ("ok", "diverged") else 1)
