"""The timing core of `bench perf`: the cost of a SAM/ASAM step against a plain SGD step, measured fairly.

`measure(...)` builds one model per minimizer from the same initial weights (deep copies of one seeded
model), each with its own base `torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)`, and feeds them
all the same fixed synthetic batch (standard-normal images (B, 3, 32, 32), random labels; cross entropy).
It then times rounds: `warmup` untimed rounds, then `steps` timed ones. A round is, in this fixed order,

    pass  sgd  sam  asam  [peer-sam]

so that whatever the machine does (clock changes, other processes, thermal state) hits every minimizer
alike. `pass` is one plain forward + backward (the closure) and a zero_grad, on its own copy of the model,
never stepped: the price of one pass.

Each step is the real `minimizer.step(batch)` of training (SGD: `bench.minimizers.Minimizer`, the base
step; SAM, ASAM and the variants: `bench.minimizers`; the peer: pytorch-optimizer's `SAM.step`) on the
engine's own `bench.train.batch.Batch`, timed as a whole. The batch also records a mark when each pass starts and
ends, which splits the step into its passes and what lies between them: for SAM/ASAM `ascent_step()`
(after the first pass) and `descent_step()` (after the second: restore the weights, base step, zero_grad);
for SGD the base step and zero_grad. `passes` is what the batch counted per step (bench.train.batch.Cost: a
forward alone counts 1/3, a pass over part of the batch its share; LookSAM's average over its cycle needs
a multiple of k steps). Hence per minimizer

    ms_median, ms_p10, ms_p90   step time: median and spread over the timed steps
    ratio_to_sgd                ms_median / ms_median of sgd (sgd: 1.0)
    ms_mean, mean_ratio_to_sgd  the mean step time and its ratio to sgd's mean: the cost of a minimizer whose
                                steps differ (LookSAM: one SAM step in k), where the median is one kind's
    images_per_s                batch_size / ms_median
    pass_ms                     median time of the plain forward + backward (the `pass` entries)
    opt_ms                      median time spent outside the passes (ascent + descent, or base step)
    minimizer_ms                opt_ms - opt_ms of sgd: SAM's own work beyond the base step (sgd: 0.0)
    overhead_pct                minimizer_ms / ms_median * 100: the share of a step that is SAM's own work
    overhead_ms                 ms_median - passes * pass_ms: the same quantity measured the other way
                                (it also holds the base step, and noise in the pass time, times `passes`)

Timing: on CUDA, `torch.cuda.Event(enable_timing=True)` marks on the current stream, with no
synchronisation inside the timed rounds (the CPU queues work ahead, as in training; the events time the
GPU's stream) and one `torch.cuda.synchronize` before reading them. On CPU, `time.perf_counter`.
bf16: `torch.autocast(device_type, dtype=torch.bfloat16)` around forward + loss only (weights, gradients and
the minimizers stay fp32).

Peak memory (CUDA only; `None` on CPU, where torch has no allocator statistics and the process's RSS
would mix in everything else): after the timing rounds every model is freed, then each minimizer in turn
gets a fresh copy of the model and optimizer, `torch.cuda.reset_peak_memory_stats`, and `memory_steps`
steps; `peak_mem_mib` = `max_memory_allocated` minus what was allocated before the copy was made, i.e. the
whole footprint of training with that minimizer: weights, momentum, gradients, activations and SAM's
perturbation. `param_mib` is the weights' own size, so "SAM peak <= SGD peak + one copy of the parameters"
reads `peak_mem_mib(sam) <= peak_mem_mib(sgd) + param_mib`.

The peer (`peer=True`) is `pytorch_optimizer.SAM` (PyPI `pytorch-optimizer`) with the same base SGD,
rho = `sam_rho` and adaptive=False, used as its documentation says: one closure call at the current
weights, then `SAM.step(closure)` (first_step(zero_grad=True), closure at the perturbed weights,
second_step(): restore + base step), then `zero_grad()`. With `wsam` among the minimizers the peers include
`pytorch_optimizer.WSAM` too (`peer-wsam`: the official defaults ours has, gamma 0.9, decoupled, no clipping;
its `step(closure)` runs both passes), the same options as our `wsam` (tests/minimizers/test_wsam.py checks
the two agree step for step).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from bench.errors import UserError
from bench.minimizers import MINIMIZERS, create_minimizer
from bench.perf.common import Timer, markdown_rows, percentile
from bench.train.batch import Batch, Cost
from bench.train.runtime import autocast_for, numerics_flags, training_flags

PRECISIONS = ("fp32", "bf16")
PEER = "peer-sam"
PEER_WSAM = "peer-wsam"
PASS = "pass"
BASE_SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
PEER_HINT = "pip install pytorch-optimizer (or: pip install 'sambench[peer]')"

COLUMNS = ["minimizer", "impl", "model", "batch_size", "steps", "warmup", "precision", "device_name",
           "ms_median", "ms_p10", "ms_p90", "ratio_to_sgd", "ms_mean", "mean_ratio_to_sgd", "images_per_s", "passes", "pass_ms", "opt_ms",
           "minimizer_ms", "overhead_ms", "overhead_pct", "peak_mem_mib", "param_mib", "rho", "eta", "seed",
           "torch_version", "tf32_matmul", "tf32_cudnn", "cudnn_benchmark", "deterministic_algorithms"]


# -- timers ------------------------------------------------------------------------------------------------


# -- contestants -------------------------------------------------------------------------------------------

@dataclass
class Contestant:
    """One model with its optimizer. `step(closure)` is one full training step; `passes` closures per step."""
    name: str
    impl: str
    model: nn.Module
    step: Callable[[Callable[[], Any]], Any]
    passes: float                 # nominal; the row's `passes` is what the steps' batches counted (Cost)
    hparams: dict = field(default_factory=dict)
    optimizer: Any = None
    cost: Cost = field(default_factory=Cost)


def import_peer(what: str = "SAM"):
    """pytorch_optimizer.<what> and the package's version; a UserError that says how to install it if absent."""
    try:
        module = importlib.import_module("pytorch_optimizer")
        cls = getattr(module, what)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--peer needs the pytorch-optimizer package ({e}); {PEER_HINT}") from None
    try:
        from importlib.metadata import version
        ver = version("pytorch-optimizer")
    except Exception:  # noqa: BLE001 - metadata missing (vendored copy): the version is only informative
        ver = getattr(module, "__version__", "unknown")
    return cls, ver


def base_sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), **BASE_SGD)


def schedule_of(name: str) -> tuple[str, int] | None:
    """"sam@every5" -> ("sam", 5): a two-pass step every 5th step; "sam@from0.875" -> ("sam", 8): late-phase SAM's
    average step, the last 1/8 of training, timed as one two-pass step in 8 (its ms_mean is the run's mean step;
    the order of its steps within a run does not change their cost). None for a name without a schedule."""
    if "@" not in name:
        return None
    base, _, what = name.partition("@")
    try:
        if what.startswith("every"):
            k = int(what[5:])
        elif what.startswith("from"):
            share = 1 - float(what[4:])
            k = round(1 / share) if 0 < share < 1 else 0
            if k < 1 or abs(k * share - 1) > 1e-9:
                raise ValueError
        else:
            raise ValueError
    except ValueError:
        raise UserError(f"{name!r}: a schedule is MINIMIZER@everyK or MINIMIZER@fromX with 1 - X = 1/K "
                        "(sam@every5, sam@from0.875)") from None
    if base not in MINIMIZERS or not MINIMIZERS[base].schedulable or k < 1:
        able = ", ".join(n for n, c in MINIMIZERS.items() if c.schedulable)
        raise UserError(f"{name!r}: schedules apply to a two-pass minimizer ({able}) every K >= 1 steps")
    return base, k


def build_contestant(name: str, model: nn.Module, hparams: dict | None = None) -> Contestant:
    """`name`: "sgd", a registered minimizer ("sam", "asam", ...), one under a schedule ("sam@every5",
    "sam@from0.875": `schedule_of`), "pass", "peer-sam" or "peer-wsam"."""
    hparams = dict(hparams or {})
    if schedule_of(name) is not None:
        base, k = schedule_of(name)
        minimizer = create_minimizer(base, base_sgd(model), model, **hparams)
        count = iter(range(1 << 62))

        def step(batch):  # the engine's rule (bench.train.schedule): two passes at the k-th, 2k-th, ... step
            return minimizer.step(batch) if (next(count) + 1) % k == 0 else minimizer.plain_step(batch)
        return Contestant(name, "sambench", model, step, passes=1 + 1 / k, hparams=minimizer.hparams(),
                          optimizer=minimizer)
    if name == PASS:
        def step(closure):
            closure()
            model.zero_grad(set_to_none=True)
        return Contestant(PASS, "forward+backward", model, step, passes=1)
    if name == PEER:
        cls, ver = import_peer()
        opt = cls(model.parameters(), torch.optim.SGD, rho=hparams.get("rho", 0.05), adaptive=False, **BASE_SGD)

        def step(closure):
            closure()           # gradients at w
            opt.step(closure)   # first_step(zero_grad=True) -> closure at w + e -> second_step()
            opt.zero_grad()
        return Contestant(PEER, f"pytorch-optimizer {ver}", model, step, passes=2,
                          hparams={"rho": hparams.get("rho", 0.05)}, optimizer=opt)
    if name == PEER_WSAM:
        cls, ver = import_peer("WSAM")
        hp = {"rho": 0.05, "gamma": 0.9, "decouple": True, **{k: v for k, v in hparams.items() if k != "clip_norm"}}
        opt = cls(model, model.parameters(), torch.optim.SGD, **hp, **BASE_SGD)

        def step(closure):
            opt.step(closure)   # closure at w, first_step, closure at w + e, second_step
            opt.zero_grad()
        return Contestant(PEER_WSAM, f"pytorch-optimizer {ver}", model, step, passes=2, hparams=hp, optimizer=opt)
    minimizer = create_minimizer(name, base_sgd(model), model, **hparams)
    return Contestant(name, "sambench", model, minimizer.step, passes=minimizer.passes,
                      hparams=minimizer.hparams(), optimizer=minimizer)


def make_batch(batch_size: int, num_classes: int, device: torch.device, seed: int = 0):
    """The fixed synthetic batch: drawn on the CPU from `seed`, so every device sees the same numbers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, num_classes, (batch_size,), generator=g)
    return x.to(device), y.to(device)


def make_initial_model(builder: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """The one initial model every contestant copies. `builder` comes from the task (bench knows no task)."""
    torch.manual_seed(seed)
    try:
        return builder()
    except KeyError as e:
        raise UserError(e.args[0] if e.args else "unknown model") from None


def build_contestants(initial: nn.Module, names: Sequence[str], hparams: dict[str, dict],
                      device: torch.device) -> list[Contestant]:
    """One contestant per name, each on its own deep copy of `initial` (same weights, same buffers)."""
    out = []
    for name in names:
        model = copy.deepcopy(initial).to(device)
        model.train()
        out.append(build_contestant(name, model, hparams.get(name)))
    return out


# -- the timed rounds --------------------------------------------------------------------------------------

class TimedBatch(Batch):
    """The engine's batch (bench.train.batch), with a timer mark before and after every pass a minimizer runs."""

    def __init__(self, *args, marks: list, timer, **kwargs):
        super().__init__(*args, **kwargs)
        self.marks, self.timer = marks, timer

    def __call__(self, *args, **kwargs):
        self.marks.append(self.timer.mark())
        out = super().__call__(*args, **kwargs)
        self.marks.append(self.timer.mark())
        return out


def run_rounds(contestants: Sequence[Contestant], x: torch.Tensor, y: torch.Tensor, rounds: int, timer,
               precision: str = "fp32", trace: list | None = None) -> dict[str, list[list]]:
    """`rounds` rounds; in each, every contestant in order does one step on the engine's Batch of (x, y)
    (cross entropy). Returns per contestant the marks of each step: [start, (pass start, pass end) per pass,
    end]. Marks are timer-specific (CUDA events must be read after timer.sync()). `trace`, if given,
    receives (round, name) in execution order."""
    autocast = autocast_for(precision, x.device)
    marks: dict[str, list[list]] = {c.name: [] for c in contestants}
    for r in range(rounds):
        for c in contestants:
            if trace is not None:
                trace.append((r, c.name))
            m = [timer.mark()]
            c.cost.steps += 1
            c.step(TimedBatch(c.model, c.model, x, y, nn.functional.cross_entropy, cost=c.cost, autocast=autocast,
                              marks=m, timer=timer))
            m.append(timer.mark())
            marks[c.name].append(m)
    return marks


@dataclass
class StepTiming:
    step_ms: float              # the whole step
    pass_ms: list[float]        # each closure (forward + backward)
    opt_ms: float               # after each closure until the next mark: ascent/descent, or the base step


def to_timings(marks: list, timer) -> StepTiming:
    """[start, c1s, c1e, ..., cks, cke, end] -> StepTiming (after timer.sync())."""
    passes = (len(marks) - 2) // 2
    if len(marks) != 2 * passes + 2:
        raise ValueError(f"malformed marks: {len(marks)} entries")
    closures = [timer.ms(marks[1 + 2 * k], marks[2 + 2 * k]) for k in range(passes)]
    after = [timer.ms(marks[2 + 2 * k], marks[3 + 2 * k]) for k in range(passes)]
    return StepTiming(timer.ms(marks[0], marks[-1]), closures, sum(after))


def summarize(timings: dict[str, list[StepTiming]], passes: dict[str, int], batch_size: int) -> dict[str, dict]:
    """The numbers of the module docstring, per contestant other than "pass", from per-step timings."""
    pass_ms = percentile([t.step_ms for t in timings[PASS]], 50) if PASS in timings else None
    med = {n: percentile([t.step_ms for t in ts], 50) for n, ts in timings.items()}
    mean = {n: float(np.mean([t.step_ms for t in ts])) for n, ts in timings.items()}
    opt = {n: percentile([t.opt_ms for t in ts], 50) for n, ts in timings.items()}
    out = {}
    for name, ts in timings.items():
        if name == PASS:
            continue
        steps = [t.step_ms for t in ts]
        minimizer_ms = opt[name] - opt["sgd"] if "sgd" in opt else None
        out[name] = {
            "ms_median": med[name],
            "ms_p10": percentile(steps, 10),
            "ms_p90": percentile(steps, 90),
            "ratio_to_sgd": med[name] / med["sgd"] if "sgd" in med else None,
            "ms_mean": mean[name],
            "mean_ratio_to_sgd": mean[name] / mean["sgd"] if "sgd" in mean else None,
            "images_per_s": batch_size * 1e3 / med[name] if med[name] > 0 else None,
            "passes": passes[name],
            "pass_ms": pass_ms,
            "opt_ms": opt[name],
            "minimizer_ms": minimizer_ms,
            "overhead_ms": med[name] - passes[name] * pass_ms if pass_ms is not None else None,
            "overhead_pct": (minimizer_ms / med[name] * 100
                             if minimizer_ms is not None and med[name] > 0 else None),
        }
    return out


def param_mib(model: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def peak_memory_mb(initial: nn.Module, name: str, hparams: dict | None, x, y, device: torch.device,
                   precision: str, steps: int = 2) -> float:
    """CUDA: the peak allocated memory of training `name` for `steps` steps on a fresh copy of the model,
    above what was allocated before the copy was made (see the module docstring)."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    contestant = build_contestants(initial, [name], {name: hparams or {}}, device)[0]
    run_rounds([contestant], x, y, steps, Timer(), precision)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del contestant
    gc.collect()
    torch.cuda.empty_cache()
    return peak / 2**20


# -- the entry point ---------------------------------------------------------------------------------------

def check_step_task(task) -> None:
    """`--what step` times one random batch of 3x32x32 images with integer labels (make_batch): refuse, in
    one line, a task whose model takes anything else (translation, ImageNet, Fashion-MNIST, digits)."""
    spec = getattr(type(task), "spec", None) and task.spec
    shape = (spec.get("channels"), spec.get("size")) if isinstance(spec, dict) else None
    if not hasattr(type(task), "num_classes") or shape != (3, 32):
        raise UserError(f"bench perf --what step times a random batch of 3x32x32 images, which task {task.name} "
                        f"does not take; use --what loop (bench run's loop on the task's own data)")


def measure(model_name: str, num_classes: int, batch_size: int, steps: int, device: torch.device | str,
            precision: str = "fp32", minimizers: Iterable[str] | None = ("sgd", "sam", "asam"),
            sam_rho: float = 0.05, asam_rho: float = 0.5, asam_eta: float = 0.01, warmup: int = 3,
            peer: bool = False, seed: int = 0, memory_steps: int = 2, timer=None,
            trace: list | None = None, builder: Callable[[], nn.Module] | None = None,
            options: dict[str, dict] | None = None) -> list[dict]:
    """Time `steps` interleaved steps of each minimizer (plus the plain pass) after `warmup` untimed
    rounds; one row per minimizer (sgd first, always measured: it is the reference), the peer last.

    `minimizers`: None for every registered one. sam_rho: SAM's (and the peer's) rho; asam_rho, asam_eta:
    ASAM's; `options`: the other minimizers' options ({name: {option: value}}, their defaults otherwise). `timer` replaces the device's timer
    (tests); `trace` receives (round, name) of every step run, warm-up included. `builder()` makes the
    model (the CLI passes the task's `make_model(model_name)`)."""
    if builder is None:
        raise UserError("measure() needs a model builder (e.g. lambda: task.make_model(name))")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise UserError(f"need steps >= 1, warmup >= 0 and batch size >= 1 (got {steps}, {warmup}, {batch_size})")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"bf16 is not supported on {torch.cuda.get_device_name(device)}; use --precision fp32")
    known = ["sgd", *MINIMIZERS]
    names = ["sgd"] + [m for m in dict.fromkeys(minimizers or MINIMIZERS) if m != "sgd"]
    unknown = [m for m in names if m not in known and schedule_of(m) is None]
    if unknown:
        raise UserError(f"unknown minimizer {unknown[0]!r}; choose from {', '.join(known)}")
    if peer:
        import_peer()  # fail before any work
        names.append(PEER)
        if "wsam" in names:
            import_peer("WSAM")
            names.append(PEER_WSAM)
    hparams = {**{n: dict(o) for n, o in (options or {}).items()},
               "sam": {"rho": sam_rho}, "asam": {"rho": asam_rho, "eta": asam_eta}, PEER: {"rho": sam_rho}}
    hparams.update({n: hparams.get(schedule_of(n)[0], {}) for n in names if schedule_of(n) is not None})
    if PEER_WSAM in names:  # the same options as our wsam: the task's recipe's, else both sides' defaults
        hparams[PEER_WSAM] = {k: v for k, v in hparams.get("wsam", {}).items() if k in ("rho", "gamma", "decouple")}

    from bench.train.runtime import device_name as describe
    dev_name = describe(device)
    initial = make_initial_model(builder, seed)
    x, y = make_batch(batch_size, num_classes, device, seed)
    timer = timer or Timer(device)

    cuda = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with cuda, training_flags(device):  # cudnn.benchmark as in training: convolutions timed as they would run
        flags = numerics_flags()
        contestants = build_contestants(initial, [PASS, *names], hparams, device)
        run_rounds(contestants, x, y, warmup, timer, precision, trace)
        timer.sync()
        marks = run_rounds(contestants, x, y, steps, timer, precision, trace)
        timer.sync()
        timings = {n: [to_timings(m, timer) for m in ms] for n, ms in marks.items()}
        info = {c.name: (c.impl, c.hparams) for c in contestants}
        stats = summarize(timings, {c.name: c.cost.passes() / c.cost.steps for c in contestants}, batch_size)
        del contestants, marks  # free every model before the memory measurements
        peaks = {n: None for n in names}
        if device.type == "cuda" and memory_steps > 0:
            for n in names:
                peaks[n] = peak_memory_mb(initial, n, hparams.get(n), x, y, device, precision, memory_steps)

    rows = []
    for n in names:
        impl, hp = info[n]
        rows.append({
            "minimizer": n, "impl": impl, "model": model_name, "batch_size": batch_size,
            "steps": steps, "warmup": warmup, "precision": precision, "device_name": dev_name,
            **stats[n], "peak_mem_mib": peaks[n], "param_mib": param_mib(initial),
            "rho": hp.get("rho"), "eta": hp.get("eta"), "seed": seed, "torch_version": torch.__version__, **flags,
        })
    return [{k: row[k] for k in COLUMNS} for row in rows]


def measure_task(task, model: str | None, batch_size: int | None, steps: int | None, device: torch.device,
                 precision: str | None, warmup: int, peer: bool, minimizers: Sequence[str] | None) -> list[dict]:
    """`bench perf --what step` for a task: its model (default wrn28_10) and minimizer options; rows with
    `task` and `what` first. A task the random 3x32x32 batch does not fit is refused (check_step_task)."""
    check_step_task(task)
    model = model or "wrn28_10"
    if not task.has_model(model):
        raise UserError(f"unknown model {model!r} for task {task.name}; choose one of: {', '.join(task.models())}")
    opts = task.recipe(model).get("minimizers", {})
    rows = measure(model, task.num_classes, 128 if batch_size is None else batch_size, 20 if steps is None else steps,
                   device, precision=precision or "fp32", warmup=warmup, peer=peer, minimizers=minimizers,
                   options=opts, sam_rho=opts.get("sam", {}).get("rho", 0.05),
                   asam_rho=opts.get("asam", {}).get("rho", 0.5), asam_eta=opts.get("asam", {}).get("eta", 0.01),
                   builder=lambda: task.make_model(model))
    return [{"task": task.name, "what": "step", **row} for row in rows]


# -- output ------------------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table of measure()'s rows, with what they share (model, batch, device...) as a caption."""
    if not rows:
        return "(no measurements)"
    shared = ["model", "batch_size", "precision", "steps", "warmup", "device_name", "torch_version"]
    constant = [k for k in shared if len({r.get(k) for r in rows}) == 1]
    caption = ", ".join(f"{k} {rows[0].get(k)}" for k in constant)
    cols = [(k, k) for k in shared if k not in constant] + [
        ("minimizer", "minimizer"), ("ms/step", "ms_median"), ("p10–p90", None), ("× sgd", "ratio_to_sgd"),
        ("× sgd (mean)", "mean_ratio_to_sgd"), ("passes/step", "passes"),
        ("img/s", "images_per_s"), ("pass ms", "pass_ms"), ("SAM's own ms", "minimizer_ms"),
        ("own %", "overhead_pct"), ("step − passes ms", "overhead_ms"), ("peak MiB", "peak_mem_mib"),
        ("params MiB", "param_mib")]
    label = lambda r: f"{r['minimizer']} ({r['impl']})" if r.get("impl") not in (None, "sambench") else r["minimizer"]  # noqa: E731
    lines = markdown_rows(rows, cols, ratios=("ratio_to_sgd", "mean_ratio_to_sgd"), label=label)
    return caption + "\n\n" + "\n".join(lines) if caption else "\n".join(lines)
