"""`bench doctor --full`: what only running on the node shows, before a sweep trusts it (~5-8 min on one H100).

1. host syncs: the training step of sgd and every minimizer through the engine's own `loop_step` on an
   `setup` state of the real CIFAR-10 job (fp32; --accumulate 2; --m for those that take chunks), under
   `torch.cuda.set_sync_debug_mode("error")` after one warm-up step (cuDNN's autotuning syncs once per run).
   fp16 is left out: its overflow check syncs once per step on purpose, as torch's GradScaler does.
2. loop timings: WRN-28-10, batch 128, sgd / sam / asam in fp32, bf16 and bf16 + channels_last + compile,
   through `bench perf --what loop`'s own measurement (`perf_loop.measure_loop`).
3. interrupt and resume: `bench run` in subprocesses on synthetic CIFAR-10, a 2-epoch run stopped by one SIGINT
   during epoch 1 (it finishes the epoch, checkpoints, exits 130) and started again (it resumes), against the
   same command run uninterrupted alongside in another folder: with --fast, whether rows and weights agree
   (reported, not asserted: cudnn.benchmark and compile agree up to rounding); with --deterministic, whether
   they are bit-identical.
4. `bench sharpness` (make_request + measure_run) on the resumed run's kept weights, timed.

Every part takes its device, models, batch and step counts from a FullPlan, so the whole sequence also runs on
a CPU at a tiny size (the CLI's hidden --device/--model/--batch-size/--steps; tests). There a dispatch-mode
stand-in flags what would sync on CUDA, and bf16, compile and --fast (CUDA only) are left out. A part that
raises is a fail line; the next part runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bench
from bench.doctor.report import FAIL, INFO, OK, WARN, Check, Context, Section, first_line
from bench.errors import UserError

ROOT = Path(bench.__file__).resolve().parent.parent  # the checkout: the runs' `python -m bench` imports it from here
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "fp32"}, "bf16": {"precision": "bf16"},
    "bf16+channels_last+compile": {"precision": "bf16", "channels_last": True, "compile": True}}
ON_A_GPU = ("On a CUDA GPU --full also runs (~5-8 min on one H100/H200): every minimizer's training step under "
            "CUDA's sync debug mode, WRN-28-10 loop timings of sgd/sam/asam in fp32, bf16 and bf16 + channels_last "
            "+ compile, a --fast and a --deterministic run interrupted and resumed against uninterrupted ones, and "
            "bench sharpness on the kept weights")


@dataclass(frozen=True)
class FullPlan:
    """Device and sizes of every part (defaults: the GPU check; `make_plan` shrinks them for a CPU)."""
    device: str = "cuda"
    model: str = "resnet20"           # the sync checks, the interrupted runs, sharpness: what is tested is the code
    perf_model: str = "wrn28_10"      # the model timed
    batch_size: int = 128             # every part's batch (even, >= 4: --accumulate 2 and --m batch/4)
    steps: int = 30                   # timed steps per minimizer (whole chunks)
    warmup: int = 2                   # untimed rounds of `chunk` steps
    chunk: int = 5
    variants: tuple[str, ...] = tuple(VARIANTS)
    sync_steps: int = 5               # guarded steps: LookSAM's reuse steps and its next full step (k = 5)
    train: int = 4096                 # synthetic CIFAR-10 training images (test: an eighth)
    examples: int = 256               # bench sharpness --examples
    measures: tuple[str, ...] = ("worst_l2", "hessian_top")
    iters: int = 10                   # sharpness: ascent steps
    power_iters: int = 20             # sharpness: hessian_top's power iterations at most
    workers: int = 4                  # data-loader workers (the device loader needs none)
    timeout_s: float = 600.0          # per subprocess

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def make_plan(device: str | None = None, model: str | None = None, batch_size: int | None = None,
              steps: int | None = None) -> FullPlan | None:
    """The plan from the CLI's hidden options; None where no device was named and no GPU is usable. Bad
    values are one-line UserErrors, raised before any check runs."""
    from bench.registry import get_task
    from bench.train.runtime import resolve_device
    if batch_size is not None and (batch_size < 4 or batch_size % 2):
        raise UserError(f"--batch-size must be even and >= 4 for --full (--accumulate 2, --m batch/4); got "
                        f"{batch_size}")
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if model is not None and not get_task("cifar10").has_model(model):
        raise UserError(f"unknown model {model!r}; choose one of: {', '.join(get_task('cifar10').models())}")
    if device is None and not torch.cuda.is_available():
        return None
    dev = resolve_device(device or "cuda")  # `cuda` without a usable GPU: one line
    plan = FullPlan(device=str(dev)) if dev.type == "cuda" else FullPlan(
        device=str(dev), model="resnet20", perf_model="resnet20", batch_size=8, steps=2, warmup=0, chunk=1,
        variants=("fp32",), sync_steps=3, train=64, examples=16, iters=2, power_iters=3, workers=0, timeout_s=180)
    given = {"model": model, "perf_model": model, "batch_size": batch_size, "steps": steps}
    return dataclasses.replace(plan, **{k: v for k, v in given.items() if v is not None})


def run_full(plan: FullPlan | None, ctx: Context, show: Callable[[Section], None],
             say: Callable[[str], None]) -> list[Section]:
    """The four parts in order on synthetic CIFAR-10 written to a temporary folder; each part's section is shown
    when it is done. Without a plan, one line saying what a GPU would run."""
    if plan is None:
        why = "torch cannot use the GPU here (see CUDA above)" if _gpu_present() else "no usable CUDA GPU here"
        sections = [Section("--full", [Check("--full", INFO, f"{why}; only the checks above ran. {ON_A_GPU}")])]
        show(sections[0])
        return sections
    from tasks.cifar import write_fake_cifar
    sections: list[Section] = []
    with tempfile.TemporaryDirectory(prefix="sambench-doctor-") as tmp:
        data = Path(tmp) / "data"
        write_fake_cifar(data, "cifar10", plan.train, max(plan.train // 8, 16), seed=0)
        say(f"--full on {plan.device}: synthetic CIFAR-10 ({plan.train} images) in {data}")
        kept: list[tuple[Path, str]] = []
        parts = [("--full: host syncs in a training step", lambda: sync_checks(plan, data)),
                 ("--full: loop timings", lambda: perf_checks(plan, data)),
                 ("--full: interrupt and resume", lambda: resume_checks(plan, data, Path(tmp), kept)),
                 ("--full: bench sharpness", lambda: sharpness_checks(plan, kept))]
        for title, body in parts:
            sections.append(run_part(title, body))
            show(sections[-1])
    return sections


def _gpu_present() -> bool:
    from bench import gpu
    return gpu.gpu_present()


def run_part(title: str, body: Callable[[], tuple[list[Check], str]]) -> Section:
    """One part as a section: its checks and table, or a fail line naming what raised; then its time."""
    t0 = time.perf_counter()
    try:
        checks, table = body()
    except Exception as e:  # a part that breaks is the finding; the next part still runs
        checks, table = [Check("error", FAIL, first_line(e), "run this part's command by hand to see the whole "
                               "error")], ""
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return Section(title, checks + [Check("time", INFO, f"{time.perf_counter() - t0:.1f} s")], table)


# -- 1. host syncs ----------------------------------------------------------------------------------------------

class HostSync(RuntimeError):
    """What would be a host sync on CUDA, found on the CPU."""


SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
                      "unique_dim", "unique_consecutive", "equal", "is_nonzero", "allclose"})


class HostReads(TorchDispatchMode):
    """The CPU's stand-in for `set_sync_debug_mode("error")`: raises HostSync on the aten ops whose result the
    host must read (`.item()`, `bool()`, nonzero, boolean-mask indexing...), where CUDA would sync."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS or _mask_indexing(name, args):
            raise HostSync(f"aten.{name} reads a device value on the host (a sync on CUDA)")
        return func(*args, **(kwargs or {}))


def _mask_indexing(name: str, args: tuple) -> bool:
    """x[mask] (its size depends on the mask's values); `x[mask] = scalar` is masked_fill_, no sync."""
    if name not in ("index", "index_put", "index_put_", "_index_put_impl_"):
        return False
    masks = [i for i in args[1] if i is not None and i.dtype in (torch.bool, torch.uint8)]
    return bool(masks) and not (name != "index" and len(args[1]) == 1 and args[2].numel() == 1)


@contextlib.contextmanager
def sync_guard(device: torch.device):
    """Inside the block a host sync raises: CUDA's own debug mode, or HostReads on the CPU."""
    if device.type != "cuda":
        with HostReads():
            yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def sync_cases(batch: int) -> list[tuple[str, str, dict[str, int]]]:
    """(minimizer, label, settings): sgd and every minimizer in fp32 and with --accumulate 2; those that take
    chunks with --m a quarter batch too."""
    from bench.minimizers import MINIMIZERS
    cases = []
    for name in ["sgd", *MINIMIZERS]:
        cases += [(name, "fp32", {}), (name, "accumulate=2", {"accumulate": 2})]
        if name in MINIMIZERS and MINIMIZERS[name].supports_chunks:
            cases.append((name, f"m={batch // 4}", {"m": batch // 4}))
    return cases


def first_sync(plan: FullPlan, data: Path, minimizer: str, settings: dict[str, int]) -> str:
    """'' when `plan.sync_steps` steps ran without a host sync, else the first sync's message."""
    from bench.data import to_device
    from bench.recipes import make_config
    from bench.registry import get_task
    from bench.train.runtime import autocast_for, resolve_device, seed_everything
    from bench.train.state import setup
    from bench.train.step import loop_step
    cfg = make_config("cifar10", model=plan.model, minimizer=minimizer, batch_size=plan.batch_size, epochs=2,
                      device=plan.device, workers=0, data_dir=str(data), schedule="cosine-step", **settings)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    st = setup(cfg, get_task("cifar10").build(cfg, device), device)  # the per-step scheduler runs in the step
    x, y = (to_device(t, device) for t in next(iter(st.job.train_loader)))
    sums = torch.zeros(5, device=device, dtype=torch.float64)
    autocast, count = autocast_for("fp32", device), st.job.count or (lambda t: t.shape[0])
    st.net.train()
    if device.type == "cuda":  # cuDNN's algorithm search and lazy initialisation sync once per run
        loop_step(st, x, y, autocast, sums, count)
        torch.cuda.synchronize(device)
    try:
        with sync_guard(device):
            for _ in range(plan.sync_steps):
                loop_step(st, x, y, autocast, sums, count)
    except RuntimeError as e:
        if isinstance(e, HostSync) or "synchroniz" in str(e):
            return " ".join(str(e).split())[:240]
        raise
    return ""


def sync_checks(plan: FullPlan, data: Path) -> tuple[list[Check], str]:
    """Part 1: a line per minimizer, ok or its first sync (a warning: a sync per step stalls the GPU's queue,
    the results stay right), or the error a case raised (a fail; the other minimizers still run)."""
    by_name: dict[str, list[tuple[str, str, str]]] = {}
    for name, label, settings in sync_cases(plan.batch_size):
        try:
            by_name.setdefault(name, []).append((label, first_sync(plan, data, name, settings), ""))
        except Exception as e:
            by_name.setdefault(name, []).append((label, "", first_line(e)))
    guard = "CUDA's sync debug mode" if plan.cuda else "a CPU stand-in for CUDA's sync debug mode"
    out = []
    for name, found in by_name.items():
        errors = [(label, err) for label, _, err in found if err]
        syncs = [(label, msg) for label, msg, _ in found if msg]
        if errors:
            out.append(Check(name, FAIL, f"{errors[0][0]}: the step raised {errors[0][1]}", "run `bench run cifar10 "
                             f"--minimizer {name}` with these settings to see the whole error"))
        elif syncs:
            out.append(Check(name, WARN, f"{syncs[0][0]}: host sync: {syncs[0][1]}", "a host sync per step stalls "
                             "the GPU; report it with this line"))
        else:
            out.append(Check(name, OK, f"{', '.join(label for label, _, _ in found)}: no host sync in "
                                       f"{plan.sync_steps} steps under {guard}"))
    return out + [Check("fp16", INFO, "not checked: its overflow check syncs once per step on purpose (as torch's "
                        "GradScaler)")], ""


# -- 2. loop timings -------------------------------------------------------------------------------------------

def perf_checks(plan: FullPlan, data: Path) -> tuple[list[Check], str]:
    """Part 2: each variant through perf_loop.measure_loop (sgd, sam, asam interleaved); a line per variant and
    one table. A variant the GPU cannot run (bf16 before Ampere: a UserError) is a warning; the others run."""
    from bench.perf import loop as perf_loop
    out, rows = [], []
    for variant in plan.variants:
        settings = {"model": plan.perf_model, "batch_size": plan.batch_size, "device": plan.device,
                    "workers": plan.workers, "data_dir": str(data), **VARIANTS[variant]}
        try:
            got = perf_loop.measure_loop("cifar10", settings, ["sam", "asam"], steps=plan.steps,
                                         warmup=plan.warmup, chunk=plan.chunk)
        except UserError as e:
            out.append(Check(variant, WARN, f"skipped: {e}"))
            continue
        except Exception as e:
            out.append(Check(variant, FAIL, first_line(e), "run `bench perf --what loop` with these options to see "
                             "the whole error"))
            continue
        rows += [(variant, r) for r in got]
        ratios = ", ".join(f"{r['minimizer']} {num(r.get('ratio_to_sgd'), '.2f')}x" for r in got[1:])
        out.append(Check(variant, OK, f"sgd {num(got[0].get('ms_median'), '.1f')} ms/step, {ratios}"))
    if not plan.cuda:
        out.append(Check("bf16, compile", INFO, "timed on a GPU only"))
    return out, perf_table(rows, plan)


def num(v: Any, fmt: str) -> str:
    """A perf row's number, or – where the row has none (peak_mem_mib on a CPU, compile_s without compile)."""
    return "–" if v is None or v == "" else format(v, fmt)


def perf_table(rows: list[tuple[str, dict]], plan: FullPlan) -> str:
    if not rows:
        return ""
    lines = [f"{plan.perf_model}, batch {plan.batch_size}, {plan.steps} timed steps per minimizer, synthetic "
             "CIFAR-10, `bench perf --what loop`:", "",
             "| variant | minimizer | ms/step | × SGD | images/s | peak MiB | compile s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for variant, r in rows:
        lines.append(f"| {variant} | {r['minimizer']} | {num(r.get('ms_median'), '.1f')} | "
                     f"{num(r.get('ratio_to_sgd'), '.3f')} | {num(r.get('items_per_s'), '.0f')} | "
                     f"{num(r.get('peak_mem_mib'), '.0f')} | {num(r.get('compile_s'), '.1f')} |")
    return "\n".join(lines)


# -- 3. interrupt and resume -----------------------------------------------------------------------------------

def run_command(plan: FullPlan, data: Path, results: Path, flags: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "bench", "run", "cifar10", "--model", plan.model, "--minimizer", "sam",
            "--epochs", "2", "--batch-size", str(plan.batch_size), "--workers", str(plan.workers), "--device",
            plan.device, "--data-dir", str(data), "--results-dir", str(results), "--keep-weights", *flags]


def start(cmd: list[str], plan: FullPlan, log: Path) -> subprocess.Popen:
    """The checkout first on the path (it runs uninstalled); on a CPU one thread each (two runs overlap)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if not plan.cuda:
        env["OMP_NUM_THREADS"] = "1"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def interrupt_in_epoch_one(proc: subprocess.Popen, results: Path, timeout_s: float) -> bool:
    """One SIGINT as soon as the run has claimed its id (runs/<id>/claim.json): bench run's handler is in place
    by then and epoch 1 has not ended, so the run finishes epoch 1, checkpoints and stops. (A signal after
    "epoch 1" is printed would land in epoch 2, the last, which then ends the run.) False if it exited first."""
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < timeout_s:
        if any((results / "runs").glob("*/claim.json")):
            proc.send_signal(signal.SIGINT)
            return True
        time.sleep(0.02)
    return False


def finish(proc: subprocess.Popen, log: Path, timeout_s: float) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode, log.read_text(errors="replace")


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def record(results: Path) -> dict[str, Any]:
    from bench.store.records import records
    return next(records(results, "cifar10"), {})


def weights_diff(a: Path, b: Path, run_id: str) -> float:
    """The largest |difference| between two runs' kept weights (0.0: bit-identical)."""
    from bench.store.records import run_folder
    from bench.train import checkpoint as ckpt
    wa, wb = (ckpt.load(run_folder(p, run_id) / "weights.pt", run_id)["model"] for p in (a, b))
    return max((0.0 if torch.equal(wa[k], wb[k]) else (wa[k].double() - wb[k].double()).abs().max().item()
                for k in wa), default=0.0)


def compare(label: str, whole: Path, cut: Path, exact: bool) -> Check:
    """The resumed run's row and weights against the uninterrupted run's: a fail only where bit-identity is
    promised (--deterministic on a GPU, any run on the CPU); otherwise what was seen."""
    a, b = record(whole), record(cut)
    keys = ("final_test_acc", "final_train_loss")
    diff = weights_diff(whole, cut, a["run_id"])
    same = all(a.get(k) == b.get(k) for k in keys) and diff == 0
    detail = ("resumed vs uninterrupted: " + ", ".join(f"{k} {b.get(k)} vs {a.get(k)}" for k in keys)
              + f"; weights {'bit-identical' if diff == 0 else f'differ by up to {diff:.3g}'}")
    if same:
        return Check(f"{label}: result", OK, detail)
    if exact:
        return Check(f"{label}: result", FAIL, detail, "bit-identity is promised here (docs/reliability.md: 'Determinism'): "
                     "compare the two runs' epochs.csv and report it")
    return Check(f"{label}: result", INFO, detail + " (equal up to rounding is what this loop promises)")


def resume_pair(plan: FullPlan, data: Path, root: Path, label: str, flags: tuple[str, ...],
                exact: bool) -> tuple[list[Check], Path | None]:
    """The uninterrupted run (alongside), the run stopped in epoch 1 by SIGINT, its resume; the checks and
    the resumed run's results folder (None where a step failed)."""
    whole_dir, cut_dir = root / "uninterrupted", root / "interrupted"
    whole = start(run_command(plan, data, whole_dir, flags), plan, root / "uninterrupted.log")
    cut = start(run_command(plan, data, cut_dir, flags), plan, root / "interrupted.log")
    interrupt_in_epoch_one(cut, cut_dir, plan.timeout_s)
    rc, text = finish(cut, root / "interrupted.log", plan.timeout_s)
    if rc != 130 or "stopped after epoch 1 of 2" not in text:
        finish(whole, root / "uninterrupted.log", plan.timeout_s)
        verdict = WARN if rc == 0 else FAIL
        return [Check(f"{label}: interrupt", verdict, f"exit {rc}, not 130 after epoch 1: {last_line(text)}",
                      "run by hand: " + " ".join(run_command(plan, data, cut_dir, flags)[1:]))], None
    checks = [Check(f"{label}: interrupt", OK, "one SIGINT in epoch 1: finished the epoch, checkpointed, exit 130")]
    rc, text = finish(start(run_command(plan, data, cut_dir, flags), plan, root / "resumed.log"),
                      root / "resumed.log", plan.timeout_s)
    resumed = rc == 0 and record(cut_dir).get("resumed_from") == 1
    checks.append(Check(f"{label}: resume", OK, "the same command resumed after epoch 1 and finished") if resumed
                  else Check(f"{label}: resume", FAIL, f"exit {rc}, no resume: {last_line(text)}"))
    rc_whole, text = finish(whole, root / "uninterrupted.log", plan.timeout_s)
    if rc_whole != 0:
        return checks + [Check(f"{label}: uninterrupted", FAIL, f"exit {rc_whole}: {last_line(text)}")], None
    if not resumed:
        return checks, None
    return checks + [compare(label, whole_dir, cut_dir, exact)], cut_dir


def resume_checks(plan: FullPlan, data: Path, root: Path, kept: list[tuple[Path, str]]) -> tuple[list[Check], str]:
    """Part 3: the --fast pair (on a CPU the default loop, bit-identical there) and, on a GPU where bench run has
    it, the --deterministic pair. `kept` gets the first resumed run (results folder, run id) for part 4."""
    from bench.config import RunConfig
    pairs = [("--fast", ("--fast",), False)] if plan.cuda else [("default loop", (), True)]
    out = []
    if plan.cuda and "deterministic" in RunConfig.__dataclass_fields__:
        pairs.append(("--deterministic", ("--deterministic",), True))
    elif not plan.cuda:
        out.append(Check("--deterministic", INFO, "paired on a GPU only (on the CPU the default loop is already "
                         "bit-identical)"))
    for label, flags, exact in pairs:
        t0 = time.perf_counter()
        checks, folder = resume_pair(plan, data, root / label.strip("-").replace(" ", "-"), label, flags, exact)
        out += checks + [Check(f"{label}: time", INFO, f"{time.perf_counter() - t0:.1f} s for the three runs")]
        if folder is not None and not kept:
            kept.append((folder, record(folder)["run_id"]))
    return out, ""


# -- 4. sharpness ----------------------------------------------------------------------------------------------

def sharpness_checks(plan: FullPlan, kept: list[tuple[Path, str]]) -> tuple[list[Check], str]:
    """Part 4: bench sharpness's own measure_run on the resumed run's kept weights; a line per measure."""
    from bench.sharpness.run import make_request, measure_run
    if not kept:
        return [Check("bench sharpness", INFO, "skipped: no resumed run finished (see above)")], ""
    results, run_id = kept[0]
    examples = min(plan.examples, plan.train)
    request = make_request(list(plan.measures), None, plan.device, examples=examples, m=min(128, examples),
                           iters=plan.iters, power_iters=plan.power_iters)
    rows = measure_run(results, run_id, request)
    out = [Check(r["measure"] + ("" if r["rho"] is None else f" rho={r['rho']:g}"), OK,
                 f"{r['value']:.6g} in {r['measure_s']:.1f} s") for r in rows]
    first = rows[0]
    return out + [Check("protocol", INFO, f"{examples} examples, {plan.iters} iters; train acc "
                        f"{first['train_acc']:.2f}, test acc {first['test_acc']:.2f} on those")], ""
