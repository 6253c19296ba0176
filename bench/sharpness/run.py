"""`bench sharpness`: a finished run's final weights -> sharpness measures, one row each in sharpness.csv.

The measures themselves (bench.sharpness.measures) are pure optimisation code; this module finds the run,
rebuilds its model from the settings it ran with, loads the kept weights, takes the fixed examples from its
task and writes the rows. The protocol is fixed and written into every row (`sh_*` columns): the first
`examples` training examples in the dataset's order, no augmentation, the labels the run trained on (noisy
ones for a label-noise task), eval mode (BatchNorm running statistics, no dropout), fp32, plain cross
entropy (no label smoothing, whatever the run trained with), a fixed seed. Alongside every measure: the
train and test loss and accuracy on the first `examples` examples of each split, and the generalization gap
(`gap_acc` = train accuracy - test accuracy, in points; `gap_loss` = test loss - train loss).

`<results-dir>/sharpness.csv` has one row per (run id, measure, rho), replaced whole when measured again,
written under the results' file lock through an atomic rename; each row carries the run's own row (its
settings and results) after the measurement's columns.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from bench.errors import UserError
from bench.store.files import atomic_write, csv_rows, csv_text, locked, read_header
from bench.store.provenance import git_commit
from bench.store.records import read_record, run_folder

CSV_NAME = "sharpness.csv"
# Radii used when none is given, per measure: SAM's rho for the plain l2 ball, ASAM's for the adaptive one;
# the l-infinity balls bound every coordinate, so theirs are far smaller (the l2 ball of radius 0.05 holds
# an l-infinity ball of radius 0.05 / sqrt(#parameters)).
DEFAULT_RHO = {"worst_l2": 0.05, "avg_l2": 0.05, "worst_adaptive_l2": 0.5, "avg_adaptive_l2": 0.5,
               "worst_linf": 1e-3, "worst_adaptive_linf": 1e-2}
KEY = ("run_id", "measure", "rho")


@dataclass(frozen=True)
class Request:
    """What to measure on a run: measures, radii (empty: DEFAULT_RHO per measure) and the protocol."""
    measures: tuple[str, ...]
    rhos: tuple[float, ...] = ()
    protocol: Any = None                  # bench.sharpness.measures.Protocol (None: its defaults)
    device: str = "auto"

    def as_dict(self) -> dict[str, Any]:
        """As JSON-able values, for the run's process (bench.sweep.child --sharpness); `from_dict` reads it."""
        return {"measures": list(self.measures), "rhos": list(self.rhos), "device": self.device,
                "protocol": asdict(self.protocol)}

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> "Request":
        from bench.sharpness.measures import Protocol
        return cls(tuple(spec["measures"]), tuple(spec["rhos"]), Protocol(**spec["protocol"]), spec["device"])

    def pairs(self) -> list[tuple[str, float | None]]:
        """(measure, rho) of every row this request makes; rho None for the Hessian measures."""
        from bench.sharpness.measures import RHO_MEASURES
        out = []
        for name in self.measures:
            if name not in RHO_MEASURES:
                out.append((name, None))
            else:
                out += [(name, float(r)) for r in (self.rhos or (DEFAULT_RHO[name],))]
        return out


def make_request(measures: list[str] | None, rhos: list[float] | None, device: str = "auto",
                 **protocol: Any) -> Request:
    """A checked Request: unknown measures, rho <= 0 and protocol numbers out of range are one-line errors."""
    from bench.sharpness.measures import MEASURES, Protocol
    names = tuple(dict.fromkeys(measures or MEASURES))
    unknown = [n for n in names if n not in MEASURES]
    if unknown:
        raise UserError(f"unknown measure(s) {', '.join(unknown)}; choose from: {', '.join(MEASURES)}")
    bad = [r for r in rhos or () if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0)]
    if bad:
        raise UserError(f"--rho must be a number > 0, got {bad[0]}")
    for key in ("examples", "m", "iters", "power_iters"):
        if key in protocol and not (isinstance(protocol[key], int) and protocol[key] >= 1):
            raise UserError(f"--{key.replace('_', '-')} must be an integer >= 1, got {protocol[key]}")
    if "eta" in protocol and not (math.isfinite(protocol["eta"]) and protocol["eta"] >= 0):
        raise UserError(f"--eta must be >= 0, got {protocol['eta']}")
    if "seed" in protocol and protocol["seed"] < 0:
        raise UserError(f"--seed must be >= 0, got {protocol['seed']}")
    return Request(names, tuple(float(r) for r in rhos or ()), Protocol(**protocol), device)


@dataclass
class LoadedRun:
    record: dict[str, Any]
    cfg: Any                              # RunConfig
    state: dict[str, Any] = field(repr=False)  # the model's state_dict


def load_run(results_dir: str | Path, run_id: str) -> LoadedRun:
    """A finished run's record, settings and final weights; a one-line UserError for anything missing."""
    from bench.config import FIELD_NAMES, RunConfig
    from bench.train import checkpoint as ckpt
    folder = run_folder(results_dir, run_id)
    record = read_record(results_dir, run_id)
    if record is None:
        raise UserError(f"no run {run_id} in {Path(results_dir)} (looked for {folder / 'result.json'}); pass the "
                        "run id as its row in <results-dir>/<task>.csv spells it, and --results-dir")
    if record.get("status") != "ok":
        raise UserError(f"run {run_id} is {record.get('status')!r}, not finished ok; only a finished run's "
                        "weights can be measured")
    weights, checkpoint = folder / "weights.pt", folder / "checkpoint.pt"
    state = ckpt.load(weights, run_id) if weights.exists() else ckpt.load(checkpoint, run_id) if checkpoint.exists() else None
    if state is None or state["epoch"] < int(record.get("epochs", 0)):  # a checkpoint of an unfinished epoch won't do
        raise UserError(f"run {run_id} kept no weights (no {weights}, nor a final checkpoint.pt); train it again "
                        f"with --keep-weights (`bench run {record.get('task')} ... --keep-weights --force` with its "
                        "settings), or sweep a table that measures sharpness (its runs keep their weights)")
    values = state.get("config") or {k: record[k] for k in FIELD_NAMES if k in record}  # a checkpoint has no config
    cfg = RunConfig.of(**{k: v for k, v in values.items() if k in FIELD_NAMES})
    return LoadedRun(record, cfg, state["model"])


def _eval_loss(out, y):
    import torch.nn.functional as F
    return F.cross_entropy(out.float(), y)


def measure_run(results_dir: str | Path, run_id: str, request: Request, pairs: list | None = None,
                log: Callable[[str], None] = lambda m: None) -> list[dict[str, Any]]:
    """Measure `run_id` as `request` says (only `pairs` of it, when given); write the rows to sharpness.csv
    and return them. fp32 as the protocol says: TF32 off inside (torch's default allows it in convolutions)."""
    from bench.train.runtime import exact_fp32
    with exact_fp32():
        rows = _measure(results_dir, run_id, request, pairs, log)
    write_rows(results_dir, rows)
    return rows


def _measure(results_dir: str | Path, run_id: str, request: Request, pairs: list | None,
             log: Callable[[str], None]) -> list[dict[str, Any]]:
    import dataclasses

    from bench.registry import get_task
    from bench.sharpness import measures as sm
    from bench.train.runtime import device_name, resolve_device
    run = load_run(results_dir, run_id)
    device = resolve_device(request.device)
    cfg = dataclasses.replace(run.cfg, device=str(device), workers=0, loader="torchvision", compile=False,
                              channels_last=False, results_dir=str(results_dir))
    task = get_task(cfg.task)
    x, y, xt, yt = task.measure_examples(cfg, request.protocol.examples, device)
    model = task.build(cfg, device).model.to(device).float()
    model.load_state_dict(run.state)
    model.eval()
    train_loss, train_acc = sm.loss_and_accuracy(model, x, y, _eval_loss)
    test_loss, test_acc = sm.loss_and_accuracy(model, xt, yt, _eval_loss)
    common = {**{f"sh_{f.name}": getattr(request.protocol, f.name) for f in fields(request.protocol)},
              "sh_test_examples": len(yt), "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
              "test_acc": test_acc, "gap_acc": train_acc - test_acc, "gap_loss": test_loss - train_loss,
              "measure_device": device_name(device), "measure_git_commit": git_commit()}
    rows = []
    for name, rho in request.pairs() if pairs is None else pairs:
        t0 = time.perf_counter()
        value = sm.measure(model, x, y, _eval_loss, name, rho, request.protocol)
        seconds = time.perf_counter() - t0
        log(f"{run_id}  {name}{'' if rho is None else f' rho={rho:g}'}  {value:.6g}  ({seconds:.1f} s)")
        rows.append({"run_id": run_id, "measure": name, "rho": rho, "value": value, **common,
                     "measure_s": seconds, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     **{k: v for k, v in run.record.items() if k not in common and k not in KEY}})
    return rows


def _key(row: dict[str, Any]) -> tuple[str, str, str]:
    rho = row.get("rho")
    rho = "" if rho in (None, "") or (isinstance(rho, float) and math.isnan(rho)) else f"{float(rho):.12g}"
    return str(row["run_id"]), str(row["measure"]), rho


def read_rows(results_dir: str | Path) -> list[dict[str, str]]:
    """sharpness.csv's rows as text ([] when there is none)."""
    return csv_rows(Path(results_dir) / CSV_NAME)


def write_rows(results_dir: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Put `rows` into sharpness.csv, each replacing the row of its (run id, measure, rho): the file rewritten
    whole under the lock, through an atomic rename, so concurrent measurers lose nothing."""
    path = Path(results_dir) / CSV_NAME
    with locked(path):
        old = csv_rows(path)
        header = read_header(path)
        merged = {_key(r): r for r in old}
        merged.update({_key(r): r for r in rows})
        for row in merged.values():
            header += [k for k in row if k not in header]
        atomic_write(path, csv_text(header, merged.values(), with_header=True))
    return path


def missing_pairs(results_dir: str | Path, run_id: str, request: Request) -> list[tuple[str, float | None]]:
    """The (measure, rho) of `request` that sharpness.csv lacks for `run_id` under the request's protocol."""
    proto = {f"sh_{k}": v for k, v in asdict(request.protocol).items()}
    from bench.store.records import canon
    have = {_key(r) for r in read_rows(results_dir)
            if r.get("run_id") == run_id and all(canon(r.get(k, "")) == canon(v) for k, v in proto.items())}
    return [(m, r) for m, r in request.pairs() if _key({"run_id": run_id, "measure": m, "rho": r}) not in have]
