"""`bench perf --what loop`: `bench run`'s own training loop, timed for the base optimizer and each minimizer.

Each contestant is what `bench run` would train: a RunConfig from `runner.make_config(task, ...)` (the recipe
with the options given: model, minimizer, batch size, precision, channels_last, compile, loader, workers,
data_dir, device; epochs=1), the task's real Job (`task.build(cfg, device)`: its loader, augmentation and
loss) and `setup` -> TrainState, built after `seed_everything(cfg.seed)`, so every contestant
starts from the same weights. A step is what `bench.train.loop.run_epoch` does per batch: the batch from the loader,
`engine.to_device`, `train_step`, and `scheduler.step()` where the scheduler is stepped per step
(`sched_unit == "step"`; one stepped per epoch is left alone: it does not run inside an epoch).

Order of work, in one process:

    build   every contestant (configs first: bad options fail before any data is read)
    first   one step per contestant, timed alone (device sync at both ends): with --compile, the compilation
            (torch.compiler.reset() before each: every contestant compiles afresh, as its own run would),
            then, with --compile, one untimed step each (recompiling what the resets dropped)
    warm-up `warmup` rounds, untimed
    timed   `rounds` rounds; a round is `chunk` steps of each contestant in turn: base, sam, asam, ...

Each contestant pulls batches from its own loader iterator; at its end the iterator restarts at the next
epoch (`bench.data.set_epoch`), as the next epoch of a run would. A chunk is timed with `time.perf_counter`
and a device sync (`torch.cuda.synchronize` on CUDA) at both ends: the CPU may queue work ahead inside a
chunk, as in training. The time spent waiting for data inside a chunk (in `next(iterator)` and
`to_device`, as run_epoch's `data_time`) is measured apart; it is part of the step time too.

Per minimizer (one row each, the base optimizer first):

    steps                       timed steps (rounds * chunk)
    ms_median, ms_p10, ms_p90   per-step time of a chunk (chunk wall time / chunk steps): median and spread
    ms_mean                     all timed chunks' wall time / timed steps
    ratio_to_sgd                ms_median / the base optimizer's ms_median (SGD, or Adam for translation)
    items_per_s, items_unit     median over chunks of the items trained per second: images/s, or tokens/s
                                for a task whose Job counts its targets (`Job.count`: target tokens)
    data_ms                     data wait per timed step (mean)
    first_step_ms               the first step's wall time (built, not yet warm)
    compile_s                   with --compile: first step's wall time - ms_median (None without)
    passes_per_step             forward+backward passes per timed step, as the state's Cost counted them
    peak_mem_mib                CUDA: the memory its build left allocated plus the rise during its first step
                                (weights, data on the device, optimizer state, SAM's copy, activations): the
                                footprint of training it alone, as `bench run`'s row reports (None on CPU)
    loader, workers             the loader the task built (device | torchvision | its class) and its workers

Data: with `--data-dir` the task's data there (its errors are the task's one-line errors). Without it, the
`bench run` default folder (`data`) when it holds the task's data, else the task's synthetic data
(`task.make_fake`), written to a temporary folder and removed afterwards; the output says so.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from bench.data import set_epoch, to_device
from bench.errors import UserError
from bench.perf.common import Timer, markdown_rows, percentile
from bench.train.runtime import autocast_for, device_name, numerics_flags, resolve_device, seed_everything
from bench.train.state import TrainState, setup
from bench.train.step import train_step

DEFAULT_CHUNK = 5
DEFAULT_STEPS = 50
DEFAULT_MINIMIZERS = ("sam", "asam")
DEFAULT_DATA_DIR = "data"   # where `bench run` looks by default
LOOP_COLUMNS = ["task", "model", "minimizer", "what", "optimizer", "rho", "eta", "batch_size", "precision",
                "channels_last", "compile", "loader", "workers", "steps", "chunk", "warmup", "ms_median",
                "ms_p10", "ms_p90", "ms_mean", "ratio_to_sgd", "items_per_s", "items_unit", "data_ms",
                "first_step_ms", "compile_s", "passes_per_step", "peak_mem_mib", "synthetic", "data_dir", "seed",
                "tf32_matmul", "tf32_cudnn", "cudnn_benchmark", "deterministic_algorithms", "device_name",
                "torch_version"]


# -- timing ------------------------------------------------------------------------------------------------


@dataclass
class Chunk:
    wall_s: float      # the chunk, device-synced at both ends
    data_s: float      # inside it, waiting for batches (next(iterator) + to_device)
    steps: int
    items: float       # images, or target tokens, trained on


class LoopContestant:
    """One TrainState with its own loader iterator; `fetch()` a batch on the device, `step(x, y)` train on it."""

    def __init__(self, name: str, st: TrainState):
        self.name, self.st = name, st
        self.built_bytes = 0     # device memory its build left allocated (weights, device-resident data)
        self.peak_bytes = None   # its footprint at its first step's peak (CUDA; see `first_steps`)
        self.autocast = autocast_for(st.cfg.precision, st.device)
        self.count = st.job.count or (lambda y: y.shape[0])
        self.epoch = 0
        st.net.train()
        set_epoch(st.job.train_loader, 0)
        self.it = iter(st.job.train_loader)

    def fetch(self):
        """(x, y, items): the next batch, moved to the device; a new epoch when the loader is done."""
        try:
            x, y = next(self.it)
        except StopIteration:
            self.epoch += 1
            set_epoch(self.st.job.train_loader, self.epoch)
            self.it = iter(self.st.job.train_loader)
            x, y = next(self.it)
        items = self.count(y)  # before the copy: a CPU tensor's count needs no device sync
        return to_device(x, self.st.device), to_device(y, self.st.device), items

    def step(self, x, y) -> None:
        train_step(self.st, x, y, self.autocast)
        if self.st.sched_unit == "step":
            self.st.scheduler.step()


def time_chunk(c, steps: int, timer) -> Chunk:
    """`steps` steps of contestant `c`, timed as one; the data wait inside measured apart."""
    timer.sync()
    t0 = timer.now()
    data, items = 0.0, 0
    for _ in range(steps):
        t_data = timer.now()
        x, y, n = c.fetch()
        data += timer.now() - t_data
        items = items + n
        c.step(x, y)
    timer.sync()
    return Chunk(timer.now() - t0, data, steps, float(items))


def run_rounds(contestants: Sequence, rounds: int, chunk: int, timer,
               trace: list | None = None) -> dict[str, list[Chunk]]:
    """`rounds` rounds of `chunk` steps of every contestant in turn; `trace` gets (round, name) per chunk."""
    out: dict[str, list[Chunk]] = {c.name: [] for c in contestants}
    for r in range(rounds):
        for c in contestants:
            if trace is not None:
                trace.append((r, c.name))
            out[c.name].append(time_chunk(c, chunk, timer))
    return out


def first_steps(contestants: Sequence, timer, compiled: bool = False) -> dict[str, float]:
    """Each contestant's first step alone (seconds). With torch.compile, the compilation and one step: the
    compiler's in-memory caches are reset before each, so that a contestant does not reuse the graphs of the
    one before (the models are alike) and pays what its own `bench run` process would; each contestant then
    takes one more untimed step, recompiling what the resets dropped."""
    out = {}
    for c in contestants:
        if compiled:
            torch.compiler.reset()
        before = device_memory(c.st.device, reset_peak=True)
        out[c.name] = time_chunk(c, 1, timer).wall_s
        if before is not None:  # the others sit idle meanwhile: the rise above `before` is this one's alone
            c.peak_bytes = c.built_bytes + torch.cuda.max_memory_allocated(c.st.device) - before
    if compiled:
        run_rounds(contestants, 1, 1, timer)
    return out


# -- the numbers -------------------------------------------------------------------------------------------

def summarize_loop(chunks: dict[str, list[Chunk]], first_s: dict[str, float], base: str,
                   compiled: bool) -> dict[str, dict]:
    """The per-minimizer numbers of the module docstring from the timed chunks and the first steps."""
    med = {n: percentile([1e3 * c.wall_s / c.steps for c in cs], 50) for n, cs in chunks.items()}
    out = {}
    for name, cs in chunks.items():
        per_step = [1e3 * c.wall_s / c.steps for c in cs]
        steps = sum(c.steps for c in cs)
        rates = [c.items / c.wall_s for c in cs if c.wall_s > 0]
        first = first_s.get(name)
        out[name] = {
            "steps": steps,
            "ms_median": med[name],
            "ms_p10": percentile(per_step, 10),
            "ms_p90": percentile(per_step, 90),
            "ms_mean": 1e3 * sum(c.wall_s for c in cs) / steps,
            "ratio_to_sgd": med[name] / med[base] if med.get(base) else None,
            "items_per_s": percentile(rates, 50) if rates else None,
            "data_ms": 1e3 * sum(c.data_s for c in cs) / steps,
            "first_step_ms": 1e3 * first if first is not None else None,
            "compile_s": first - med[name] / 1e3 if compiled and first is not None else None,
        }
    return out


def passes_per_step(before: Any, after: Any) -> float | None:
    """Passes per step between two snapshots of a state's Cost (the timed steps only)."""
    steps = after.steps - before.steps
    return (after.passes() - before.passes()) / steps if steps else None


def minimizer_names(task, asked: Sequence[str] | None) -> list[str]:
    """The task's base optimizer first, then those asked for (default: sam, asam), each once."""
    base = task.base_optimizer
    return [base] + [m for m in dict.fromkeys(asked or DEFAULT_MINIMIZERS) if m != base]


def loader_kind(loader) -> tuple[str, int]:
    """(device | torchvision | the loader's class name, its worker processes)."""
    from bench.augment import DeviceCifarLoader
    if isinstance(loader, DeviceCifarLoader):
        return "device", 0
    if isinstance(loader, torch.utils.data.DataLoader):
        return "torchvision", loader.num_workers
    return type(loader).__name__, 0


# -- building the contestants ------------------------------------------------------------------------------

def write_synthetic(task, out_dir: Path, batch_size: int, steps: int) -> str:
    """The task's synthetic data, enough for `steps` batches (2,000 to 20,000 examples); its summary line."""
    n = int(min(max(batch_size * steps, 2000), 20000))
    per_class = int(min(max(-(-2 * batch_size // 10), 8), 200))  # ImageNet: 10 classes, two batches
    return task.make_fake(str(out_dir), train=n, test=100, classes=10, per_class=per_class, seed=0)


def device_memory(device: torch.device, reset_peak: bool = False) -> int | None:
    """Bytes allocated on a CUDA device now (after a sync), its peak counter reset if asked; None on the CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    if reset_peak:
        torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def build_contestant(task, cfg, device: torch.device) -> LoopContestant:
    """One contestant, built as `bench run` builds its run; on CUDA it notes the memory its build left
    allocated. A contestant's `peak_mem_mib` is that plus the rise of allocated memory during its first step
    (momentum, SAM's copy of the weights, activations, gradients): what training it alone holds at its peak, as
    the row of `bench run` reports it, however many contestants share the GPU."""
    seed_everything(cfg.seed)  # the same initial weights for every minimizer
    before = device_memory(device)
    job = task.build(cfg, device)
    c = LoopContestant(cfg.minimizer, setup(cfg, job, device))
    if before is not None:
        c.built_bytes = device_memory(device) - before
    return c


def build_all(task, cfgs: list, device: torch.device, data_given: bool, tmp: Callable[[], Path],
              steps: int, log: Callable[[str], None]) -> tuple[list[LoopContestant], list, bool]:
    """The contestants, on the configs' data, or (data_dir not given and not there) the task's synthetic
    data written into `tmp()`; (contestants, the configs used, whether synthetic data was written)."""
    written = False
    try:
        first = build_contestant(task, cfgs[0], device)
    except UserError:
        if data_given:
            raise
        out, written = tmp(), True
        msg = write_synthetic(task, out, cfgs[0].batch_size, steps)
        log(f"timed on synthetic data: no {task.name} data in {cfgs[0].data_dir}/; {msg} (removed afterwards)")
        cfgs = [dataclasses.replace(c, data_dir=str(out)) for c in cfgs]
        first = build_contestant(task, cfgs[0], device)
    job = first.st.job
    if job.synthetic and not written:
        log(f"timed on synthetic data: {cfgs[0].data_dir}/ holds synthetic {task.name} data (bench data fake)")
    if "tgt_vocab" in job.info and job.synthetic:
        log(f"synthetic corpus vocabularies: {job.info.get('src_vocab')} source / {job.info['tgt_vocab']} target "
            "types (the real corpus: ~8,800 / ~6,600, fairseq's dictionaries): the output layer is cheaper here")
    return [first] + [build_contestant(task, c, device) for c in cfgs[1:]], cfgs, written


def check_loop_args(steps: int, warmup: int, chunk: int) -> None:
    if steps < 1 or warmup < 0 or chunk < 1:
        raise UserError(f"need --steps >= 1, --warmup >= 0 and --chunk >= 1 (got {steps}, {warmup}, {chunk})")


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"bf16 is not supported on {torch.cuda.get_device_name(device)}; use --precision fp32")


# -- the entry point ---------------------------------------------------------------------------------------

def measure_loop(task_name: str, settings: dict[str, Any], minimizers: Sequence[str] | None = None,
                 steps: int = DEFAULT_STEPS, warmup: int = 3, chunk: int = DEFAULT_CHUNK,
                 timer=None, trace: list | None = None, log: Callable[[str], None] = lambda m: None) -> list[dict]:
    """Time `bench run`'s loop for the base optimizer and each minimizer (see the module docstring); one row
    per minimizer. `settings`: make_config's (model, batch_size, precision, channels_last, compile, loader,
    data_dir, device, workers; None: the recipe's). `steps` is rounded up to whole chunks; `warmup` counts
    rounds. `timer` (now(), sync()) replaces the wall clock (tests); `trace` gets (round, name) per chunk."""
    from bench.recipes import make_config
    from bench.registry import get_task

    check_loop_args(steps, warmup, chunk)
    task = get_task(task_name)
    names = minimizer_names(task, minimizers)
    data_given = settings.get("data_dir") is not None
    settings = {**settings, "data_dir": settings.get("data_dir") or DEFAULT_DATA_DIR, "epochs": 1}
    cfgs = [make_config(task.name, **settings, minimizer=m) for m in names]  # every option checked first
    device = resolve_device(cfgs[0].device)
    check_precision(cfgs[0].precision, device)
    rounds = -(-steps // chunk)
    timer = timer or Timer(device)
    with contextlib.ExitStack() as stack:
        tmp = lambda: Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sambench-perf-")))  # noqa: E731
        contestants, cfgs, written = build_all(task, cfgs, device, data_given, tmp, 1 + (warmup + rounds) * chunk,
                                               log)
        first = first_steps(contestants, timer, cfgs[0].compile)
        run_rounds(contestants, warmup, chunk, timer)
        before = {c.name: copy.copy(c.st.cost) for c in contestants}
        chunks = run_rounds(contestants, rounds, chunk, timer, trace)
        stats = summarize_loop(chunks, first, names[0], cfgs[0].compile)
        rows = [loop_row(c, cfg, stats[c.name], passes_per_step(before[c.name], c.st.cost), warmup, chunk,
                         written) for c, cfg in zip(contestants, cfgs)]
        del contestants  # the loaders' workers stop before the synthetic data goes
    return rows


def loop_row(c: LoopContestant, cfg, stats: dict, passes: float | None, warmup: int, chunk: int,
             written: bool) -> dict:
    """One perf.csv row (LOOP_COLUMNS, then the minimizer's other options as m_<option>)."""
    job = c.st.job
    loader, workers = loader_kind(job.train_loader)
    row = {"task": cfg.task, "model": cfg.model, "minimizer": cfg.minimizer, "what": "loop",
           "optimizer": cfg.optimizer, "rho": cfg.rho, "eta": cfg.eta, "batch_size": cfg.batch_size,
           "precision": cfg.precision, "channels_last": cfg.channels_last, "compile": cfg.compile, "loader": loader,
           "workers": workers, "chunk": chunk, "warmup": warmup, **stats,
           "items_unit": "tokens/s" if job.count is not None else "images/s", "passes_per_step": passes,
           "synthetic": bool(job.synthetic), "data_dir": "" if written else cfg.data_dir,
           "seed": cfg.seed, "peak_mem_mib": None if c.peak_bytes is None else c.peak_bytes / 2**20,
           **numerics_flags(), "device_name": device_name(c.st.device),
           "torch_version": torch.__version__}
    return {k: row.get(k) for k in LOOP_COLUMNS} | {f"m_{k}": v for k, v in sorted(cfg.mopts.items())}


# -- output ------------------------------------------------------------------------------------------------

def format_loop_table(rows: Sequence[dict]) -> str:
    """A markdown table of measure_loop's rows, with what they share (task, model, options...) as a caption."""
    if not rows:
        return "(no measurements)"
    shared = ["task", "model", "batch_size", "precision", "channels_last", "compile", "loader", "workers", "steps",
              "chunk", "warmup", "device_name", "torch_version"]
    constant = [k for k in shared if len({str(r.get(k)) for r in rows}) == 1]
    caption = "what loop, " + ", ".join(f"{k} {rows[0].get(k)}" for k in constant)
    unit = rows[0].get("items_unit") or "items/s"
    cols = [(k, k) for k in shared if k not in constant] + [
        ("minimizer", "minimizer"), ("ms/step", "ms_median"), ("p10–p90", None), (f"× {rows[0]['minimizer']}",
                                                                                  "ratio_to_sgd"),
        ("ms/step (mean)", "ms_mean"), (unit, "items_per_s"), ("data ms/step", "data_ms"),
        ("passes/step", "passes_per_step"), ("first step ms", "first_step_ms")]
    if any(r.get("peak_mem_mib") is not None for r in rows):
        cols.append(("peak MiB", "peak_mem_mib"))
    if any(r.get("compile_s") is not None for r in rows):
        cols.append(("compile s", "compile_s"))
    lines = markdown_rows(rows, cols)
    return caption + "\n\n" + "\n".join(lines)


def spread_note(rows: Sequence[dict]) -> str:
    """One line on how far apart the base optimizer's chunks were (ratios within that are noise)."""
    base = rows[0] if rows else None
    if not base or not base.get("ms_median"):
        return ""
    width = (base["ms_p90"] - base["ms_p10"]) / base["ms_median"] * 100
    return f"{base['minimizer']}'s p10–p90 spread is {width:.1f} % of its median: ratios closer than that are noise"
