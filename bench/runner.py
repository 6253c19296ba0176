"""One run end to end: config -> task job -> engine -> results row. Plain functions, no CLI."""
from __future__ import annotations

import csv
import time
from pathlib import Path

import torch

from bench import distributed as D
from typing import Any

from bench.config import DEFAULTS, TASK_SETTINGS, RunConfig, build_config
from bench.engine import Reporter, StopFlag, device_name, resolve_device, seed_everything, train
from bench.errors import UserError
from bench.registry import get_task, task_names
from bench.results import append_row, provenance, read_header, result_rows, write_csv


def make_config(task_name: str, **overrides: Any) -> RunConfig:
    """The task's recipe defaults overridden by the given non-None settings, checked."""
    task = get_task(task_name)
    task_name = task.name  # an alias (e.g. a dataset name) runs as the task itself
    model = overrides.get("model") or task.recipe().get("model")
    if not task.has_model(model):
        raise UserError(f"unknown model {model!r} for task {task_name}; choose one of: "
                        f"{', '.join(task.models())}")
    minimizer = overrides.get("minimizer")
    if minimizer not in task.minimizers():
        raise UserError(f"unknown minimizer {minimizer!r} for task {task_name}; choose one of: "
                        f"{', '.join(task.minimizers())}")
    for name in TASK_SETTINGS:
        if name not in task.settings and overrides.get(name) not in (None, DEFAULTS[name]):
            users = [t for t in task_names() if name in get_task(t).settings]
            raise UserError(f"--{name.replace('_', '-')} does not apply to task {task_name}; it is a setting "
                            f"of: {', '.join(users) or 'no task'}")
    return build_config(task_name, task.recipe(model), overrides)


def results_csv(cfg: RunConfig) -> Path:
    return Path(cfg.results_dir) / f"{cfg.task}.csv"


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.results_dir) / "runs" / cfg.run_id


def check_results_csv(path: Path) -> None:
    """Refuse to train into a results file we could not append to (before spending hours on the run)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    try:
        header = read_header(path)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        header, reason = [], type(e).__name__
    else:
        reason = "no run_id column"
    if "run_id" not in header:
        raise UserError(f"{path} is not a sambench results CSV ({reason}); move it away or pass another "
                        "--results-dir")


def execute(cfg: RunConfig, reporter: Reporter | None = None, *, restart: bool = False,
            keep_checkpoint: bool = False, stop: StopFlag | None = None,
            log=lambda msg: None) -> dict[str, Any]:
    """Train one run and append its row to <results_dir>/<task>.csv; return the row.

    The run checkpoints after every epoch into runs/<run_id>/checkpoint.pt and resumes from it when the
    same run is started again (`restart` discards it). The checkpoint is deleted once the row is written,
    unless `keep_checkpoint`."""
    task = get_task(cfg.task)
    check_results_csv(results_csv(cfg))
    ckpt = run_dir(cfg) / "checkpoint.pt"
    if restart and ckpt.exists() and D.is_main():
        ckpt.unlink()
    D.barrier()
    if ckpt.exists():
        log(f"resuming {cfg.run_id} from its checkpoint {ckpt} (--restart starts over)")
    if cfg.world_size != D.world_size():
        raise UserError(f"the config says world_size={cfg.world_size} but {D.world_size()} processes run; "
                        "leave world_size to torchrun")
    device = resolve_device(cfg.device, D.local_rank())
    seed_everything(cfg.seed)  # before the task builds the model: the same initialisation on every rank
    t0 = time.perf_counter()
    job = task.build(cfg, device)
    if D.is_distributed():  # dropout / ShakeDrop / in-process augmentation: a different stream per rank
        torch.manual_seed(cfg.seed + 1_000_003 * D.rank())
    def log_epochs(history):
        if D.is_main():
            write_csv(run_dir(cfg) / "epochs.csv", history)

    summary = train(cfg, job, device, reporter if D.is_main() else None, checkpoint=ckpt, on_epoch=log_epochs,
                    stop=stop)
    wall = time.perf_counter() - t0
    if summary["resumed_from"]:
        log(f"resumed after epoch {summary['resumed_from']} of {cfg.epochs}")

    summary.pop("epochs")  # already in runs/<run_id>/epochs.csv
    row: dict[str, Any] = {"run_id": cfg.run_id, "status": summary.pop("status"),
                           "synthetic": job.synthetic, **cfg.to_row(), **job.info,
                           "per_replica_batch": cfg.batch_size, "global_batch": cfg.batch_size * cfg.world_size,
                           **summary, "wall_time_s": wall, **provenance(device_name(device))}
    if D.is_main():  # only rank 0 writes results
        append_row(results_csv(cfg), row)
        if not keep_checkpoint and ckpt.exists():
            ckpt.unlink()
    D.barrier()
    return row


def record_failure(cfg: RunConfig, error: BaseException) -> dict[str, Any]:
    """Append a `failed` row (with the error) so a sweep can go on and the report can list it."""
    message = " ".join(str(error).split()) or type(error).__name__
    row: dict[str, Any] = {"run_id": cfg.run_id, "status": "failed", **cfg.to_row(),
                           "note": f"{type(error).__name__}: {message}"[:500], **provenance("n/a")}
    append_row(results_csv(cfg), row)
    return row


def completed_run_ids(results_dir: str | Path) -> set[str]:
    """run_ids that already have an `ok` or `diverged` row in any results CSV of the folder."""
    return {r["run_id"] for r in result_rows(results_dir) if r.get("status") in ("ok", "diverged") and r.get("run_id")}
