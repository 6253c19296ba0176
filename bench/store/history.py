"""A run's epoch history: its per-epoch log (runs/<run_id>/epochs.csv, written by the runner after every epoch)
read back, and what it says: the accuracy reached with a given compute, the compute it took to reach an accuracy.

Each epoch carries its test accuracy and the compute spent so far, cumulative: `passes` (forward+backward passes
over a batch, a forward alone counting 1/3: the number of SGD steps of equal compute, bench.train.batch.Cost),
`steps` and `wall_s` (training seconds). The one reader of epochs.csv; no torch: the runner (a row's
`--target-acc` columns) and the report (equal compute, curves) both use it. A history is one run's: pairing a
run with the SGD run of its cell is the report's business (bench.report.compute), never a row's.
"""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping

TARGET_FIELDS = ("target_acc_used", "target_epoch", "target_wall_s", "target_passes")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def read_history(path: str | Path) -> list[dict[str, float]]:
    """An epochs.csv as rows of numbers, by epoch (a cell that is no number is left out); [] without a
    readable file. An epoch logged twice counts once, its last line."""
    try:
        with open(path, newline="") as f:
            lines = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []
    rows = [{k: v for k, v in ((k, _number(t)) for k, t in line.items() if k) if v is not None} for line in lines]
    by_epoch = {r["epoch"]: r for r in rows if "epoch" in r}
    return [by_epoch[e] for e in sorted(by_epoch)]


def run_history(results_dir: str | Path, run_id: str) -> list[dict[str, float]]:
    """The epoch log of one run of a results folder ([] if it has none)."""
    return read_history(Path(results_dir) / "runs" / str(run_id) / "epochs.csv")


def _evaluated(history: Iterable[Mapping[str, float]]) -> list[Mapping[str, float]]:
    """Epochs with a test accuracy (a diverged epoch has none)."""
    return [h for h in history if math.isfinite(h.get("test_acc", math.nan))]


def final_acc(history: list[Mapping[str, float]]) -> float | None:
    """The test accuracy of the last evaluated epoch (the row's final_test_acc)."""
    done = _evaluated(history)
    return done[-1]["test_acc"] if done else None


def spent(history: list[Mapping[str, float]]) -> dict[str, float] | None:
    """The compute of the whole run: its last epoch's cumulative passes, steps, wall_s, the epochs, and its
    typical epoch's training seconds (`epoch_s`, see `epoch_seconds`); None for a log without compute counts
    (written before they existed)."""
    last = history[-1] if history else {}
    if "passes" not in last or not last.get("steps"):
        return None
    wall = last.get("wall_s", math.nan)
    return {"passes": last["passes"], "steps": last["steps"], "wall_s": wall, "epochs": last["epoch"],
            "epoch_s": epoch_seconds(history, wall / last["epoch"])}


def epoch_seconds(history: list[Mapping[str, float]], fallback: float = math.nan) -> float:
    """The training seconds of the run's typical epoch: the median of its epochs' `epoch_time_s`. Not the
    mean: on a CPU that another process shares for a moment, torch's threads wait on each other and one epoch
    of a small model can take 100 times its usual time (seen: 6.4 s beside a median of 0.23 s), and the first
    epoch carries one-time costs; the median says what an epoch costs on this machine. `fallback` for a log
    without per-epoch times."""
    times = [h["epoch_time_s"] for h in history if math.isfinite(h.get("epoch_time_s", math.nan))]
    return statistics.median(times) if times else fallback


def time_to_target(history: list[Mapping[str, float]], target: float | None) -> dict[str, Any]:
    """The first epoch whose test accuracy is >= `target` (percent), with the training seconds and passes
    spent by its end; every value None when the run never got there (or there is no target)."""
    if target is not None and math.isfinite(target):
        for h in _evaluated(history):
            if h["test_acc"] >= target:
                return {"target_epoch": int(h["epoch"]), "target_wall_s": h.get("wall_s"),
                        "target_passes": h.get("passes")}
    return {"target_epoch": None, "target_wall_s": None, "target_passes": None}


def acc_at_compute(history: list[Mapping[str, float]], passes: float) -> float | None:
    """The test accuracy the run had reached having spent `passes`: that of the last epoch whose cumulative
    passes are <= `passes` (a float printed and read back still counts as equal); None if its first
    epoch already cost more, or the log has no compute counts."""
    reached = None
    for h in _evaluated(history):
        if "passes" not in h or h["passes"] > passes + 1e-9 * max(1.0, abs(passes)):
            break  # cumulative: every later epoch cost more still
        reached = h["test_acc"]
    return reached


def target_fields(history: list[Mapping[str, float]], target: float | None) -> dict[str, Any]:
    """The row's time-to-accuracy columns (TARGET_FIELDS) for `target`; all None without a target."""
    if target is None or not math.isfinite(target):
        return dict.fromkeys(TARGET_FIELDS)
    return {"target_acc_used": target, **time_to_target(history, target)}
