"""One run end to end: config -> task job -> engine -> results row. Plain functions, no CLI."""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import torch

from bench import distributed as D
from bench.config import RunConfig
from bench.errors import UserError
from bench.registry import get_task
from bench.store.files import atomic_write, read_header, write_csv
from bench.store.history import target_fields
from bench.store.provenance import provenance
from bench.store.records import FINISHED, read_record, rebuild_csv, result_rows, run_folder, write_record
from bench.train.control import StopFlag
from bench.train.loop import Reporter, train
from bench.train.runtime import (
    deterministic_mode,
    device_name,
    numerics_flags,
    precision_note,
    resolve_device,
    seed_everything,
)


def results_csv(cfg: RunConfig) -> Path:
    return Path(cfg.results_dir) / f"{cfg.task}.csv"


def run_dir(cfg: RunConfig) -> Path:
    return run_folder(cfg.results_dir, cfg.run_id)


def results_csv_problem(path: Path) -> str:
    """Why `path` is not a results CSV we can rebuild ('' when it is one, is empty or is absent)."""
    if not path.exists() or path.stat().st_size == 0:
        return ""
    try:
        header = read_header(path)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return type(e).__name__
    return "" if "run_id" in header else "no run_id column"


def check_results_csv(path: Path) -> None:
    """Refuse to train into a results file we could not rebuild (before spending hours on the run)."""
    reason = results_csv_problem(path)
    if reason:
        raise UserError(f"{path} is not a sambench results CSV ({reason}); move it away or pass another "
                        "--results-dir")


class AlreadyDone(Exception):
    """The run id already has a finished record; `row` is that record."""

    def __init__(self, row: dict[str, Any]):
        super().__init__(row["run_id"])
        self.row = row


def finished_record(cfg: RunConfig) -> dict[str, Any] | None:
    record = read_record(cfg.results_dir, cfg.run_id)
    return record if record is not None and record.get("status") in FINISHED else None


def execute(cfg: RunConfig, reporter: Reporter | None = None, *, restart: bool = False, force: bool = False,
            keep_checkpoint: bool = False, stop: StopFlag | None = None,
            log=lambda msg: None) -> dict[str, Any]:
    """Train one run, unless it is done already, and make its row the run id's one record; return the row.

    The run id is claimed first (see bench.store.claims): a run another live process trains is refused
    with one line. A run with an `ok` or `diverged` record raises AlreadyDone (`force`: train it again
    from scratch and replace the record). The run checkpoints after every epoch into
    runs/<run_id>/checkpoint.pt and resumes from it when started again (`restart` discards it). The
    checkpoint is deleted once the record is written, unless `keep_checkpoint`."""
    from bench.store.claims import claimed_by_me

    check_results_csv(results_csv(cfg))
    with claimed_by_me(cfg.results_dir, cfg.run_id, log, D.is_main(), D.broadcast_object):
        done = finished_record(cfg) if D.is_main() else None
        if D.broadcast_object(done is not None) and not force:
            rebuild_csv(cfg.results_dir, cfg.task)  # repairs a CSV a crash left one run behind
            raise AlreadyDone(done or {"run_id": cfg.run_id})
        with deterministic_mode(cfg.deterministic):
            return _train_and_record(cfg, reporter, restart=restart or force, keep_checkpoint=keep_checkpoint,
                                     stop=stop, log=log)


def _train_and_record(cfg: RunConfig, reporter, *, restart: bool, keep_checkpoint: bool, stop, log) -> dict:
    task = get_task(cfg.task)
    ckpt = run_dir(cfg) / "checkpoint.pt"
    if restart and ckpt.exists() and D.is_main():
        ckpt.unlink()
    D.barrier()
    if ckpt.exists():
        log(f"resuming {cfg.run_id} from its checkpoint {ckpt} (--restart starts over)")
    if cfg.world_size != D.world_size():
        raise UserError(f"the config says world_size={cfg.world_size} but {D.world_size()} processes run; "
                        "leave world_size to torchrun")
    device = prepare_device(cfg, log)
    seed_everything(cfg.seed)  # before the task builds the model: the same initialisation on every rank
    t0 = time.perf_counter()
    job = task.build(cfg, device)
    if D.is_distributed():  # dropout / ShakeDrop / in-process augmentation: a different stream per rank
        torch.manual_seed(cfg.seed + 1_000_003 * D.rank())

    def log_epochs(history):
        if D.is_main():
            write_csv(run_dir(cfg) / "epochs.csv", history)

    tracker = open_tracker(cfg) if D.is_main() else None
    summary: dict[str, Any] = {}
    try:
        summary = train(cfg, job, device, reporter if D.is_main() else None, checkpoint=ckpt, on_epoch=log_epochs,
                        stop=stop, tracker=tracker)
    finally:
        if tracker is not None:
            tracker.close({k: v for k, v in summary.items() if k != "epochs"})
    wall = time.perf_counter() - t0
    if summary["resumed_from"]:
        log(f"resumed after epoch {summary['resumed_from']} of {cfg.epochs}")

    history = summary.pop("epochs")  # already in runs/<run_id>/epochs.csv
    row: dict[str, Any] = {"run_id": cfg.run_id, "status": summary.pop("status"),
                           "synthetic": job.synthetic, **cfg.to_row(), **job.info,
                           "per_replica_batch": cfg.per_replica_batch, "global_batch": cfg.batch_size,
                           **summary, "wall_time_s": wall, "peak_mem_mib": peak_memory_mib(device),
                           **numerics_flags(), **provenance(device_name(device))}
    if "test_acc" in job.track:  # --target-acc's time to accuracy; "x SGD's compute" is the report's, from the logs
        row.update(target_fields(history, cfg.target_acc if cfg.target_acc > 0 else None))
    if D.is_main():  # only rank 0 writes results
        if cfg.keep_weights and row["status"] == "ok":  # before the record: a finished run's weights are whole
            save_weights(cfg, job.model)
        write_record(cfg.results_dir, row)
        if not keep_checkpoint and ckpt.exists():
            ckpt.unlink()
    D.barrier()
    return row


def prepare_device(cfg: RunConfig, log) -> torch.device:
    """The run's device, made current (libraries that allocate on "the" GPU use ours), a line for a precision
    this GPU emulates, and its peak-memory counter reset (the row's peak_mem_mib)."""
    device = resolve_device(cfg.device, D.local_rank())
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    note = precision_note(cfg.precision, device)
    if note and D.is_main():
        log(note)
    return device


def peak_memory_mib(device: torch.device) -> float | None:
    """The most memory tensors held on the run's GPU at once since prepare_device, in MiB, the largest over the
    ranks (None on the CPU). This process's share only: a resumed run reports its last session's peak."""
    if device.type != "cuda":
        return None
    peak = float(torch.cuda.max_memory_allocated(device))
    if D.is_distributed():
        largest = torch.tensor([peak], device=device)
        torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
        peak = largest.item()
    return peak / 2**20


def open_tracker(cfg: RunConfig):
    """The run's live tracker (--log tensorboard|wandb; bench.tracking), None for --log none."""
    if cfg.log == "none":
        return None
    from bench.train.tracking import check_tracking, make_tracker
    check_tracking(cfg.log)
    return make_tracker(cfg.log, cfg, run_dir(cfg))


WEIGHTS = "weights.pt"


def save_weights(cfg: RunConfig, model) -> Path:
    """runs/<run_id>/weights.pt: the final weights (and buffers) with the run's settings, for `bench
    sharpness`; tensors and plain values only (read back with weights_only=True)."""
    from dataclasses import asdict

    from bench.train import checkpoint as ckpt
    path = run_dir(cfg) / WEIGHTS
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt.save(path, {"version": ckpt.VERSION, "run_id": cfg.run_id, "epoch": cfg.epochs, "model": state,
                     "config": asdict(cfg)})
    return path


def oom_hint(cfg: RunConfig, error: BaseException) -> str:
    """What to lower when a run ran out of memory ('' for other errors)."""
    text = f"{type(error).__name__} {error}".lower()
    if "out of memory" not in text and "outofmemory" not in text and "can't allocate memory" not in text:
        return ""
    return (f"out of memory: lower batch_size (now {cfg.per_replica_batch} per replica, e.g. --batch-size "
            f"{max(cfg.batch_size // 2, 1)}), or use --precision bf16, or spread the run over more GPUs")


def record_failure(cfg: RunConfig, error: BaseException | str, traceback_text: str = "") -> dict[str, Any]:
    """Write a `failed` record (the error's first line; the whole traceback in runs/<run_id>/error.log) so
    a sweep can go on and the report can list it. A finished record is never replaced by a failure."""
    done = finished_record(cfg)
    if done is not None:
        return done
    if isinstance(error, BaseException):
        first = (str(error).strip().splitlines() or [""])[0]
        message = f"{type(error).__name__}: {first}" if first else type(error).__name__
        hint = oom_hint(cfg, error)
    else:
        message, hint = error, ""
    note = message[:300] + (f"; {hint}" if hint else "")
    if traceback_text:
        log = run_dir(cfg) / "error.log"
        atomic_write(log, traceback_text)
        note += f" (traceback: {log})"
    row: dict[str, Any] = {"run_id": cfg.run_id, "status": "failed", **cfg.to_row(), "note": note,
                           **provenance("n/a")}
    write_record(cfg.results_dir, row)
    return row


def completed_run_ids(results_dir: str | Path) -> set[str]:
    """run_ids that already have an `ok` or `diverged` row in the results folder."""
    return {r["run_id"] for r in result_rows(results_dir) if r.get("status") in FINISHED and r.get("run_id")}
