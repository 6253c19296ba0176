"""`bench`: thin Typer commands that forward to plain functions (bench.runner, the task registry)."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.engine import Interrupted, Reporter, StopFlag, default_workers, handling_sigint
from bench.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Reproduce the SAM / ASAM papers' tables: SGD vs SAM vs ASAM, side by side.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: synthetic stand-ins in the real formats.")
app.add_typer(data_app, name="data")
# Wide enough for a results table when output goes to a file or a pipe (rich would assume 80 columns).
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 1000)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A UserError becomes one line on stderr and exit status 2 (no traceback)."""
    try:
        yield
    except UserError as e:
        msg = str(e)
        if "Original Traceback" in msg:  # raised in a DataLoader worker: keep the message, not the trace
            msg = msg.strip().rsplit("UserError: ", 1)[-1]
        err_console.print(f"error: {msg}", style="bold red", highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(2)


class RichReporter(Reporter):
    def __init__(self, console: Console):
        self.console = console
        self.progress: Progress | None = None
        self.bar = None

    def start_epoch(self, epoch, epochs, batches):
        self.progress = Progress(TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=True)
        self.progress.start()
        self.bar = self.progress.add_task("train", total=batches)

    def advance(self):
        if self.progress:
            self.progress.advance(self.bar)

    def end_epoch(self, m):
        if self.progress:
            self.progress.stop()
        shown = "  ".join(f"{k} {_fmt(v)}" for k, v in m.items() if k != "epoch")
        self.console.print(f"epoch {m['epoch']:>3}  {shown}", highlight=False)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    return str(v)


def _run_settings(ctx: typer.Context, config: Optional[str]) -> dict[str, Any]:
    """The RunConfig settings of `bench run`: its flags, with a --config file's values under them.

    A flag the user typed (or set through its environment variable) wins over the file whatever its value,
    even when it equals the default: `--seed 0` beside a file saying `seed = 3` means seed 0. Flags left
    out give way to the file, and then to the recipe (None)."""
    from bench.config import FIELD_NAMES, read_config_file

    settings = {k: v for k, v in ctx.params.items() if k in FIELD_NAMES and k != "task"}
    for key, value in (read_config_file(config) if config else {}).items():
        source = ctx.get_parameter_source(key)  # None for a setting with no flag (optimizer, beta2)
        # By name: typer >= 0.29 brings its own copy of click, whose ParameterSource is another enum class.
        if getattr(source, "name", None) not in ("COMMANDLINE", "ENVIRONMENT"):
            settings[key] = value
    return settings


@app.command("run")
def run_cmd(
    ctx: typer.Context,
    task: Annotated[str, typer.Argument(help="Task name (see `bench list`).")],
    model: Annotated[Optional[str], typer.Option(help="Model name; default: the task's.")] = None,
    minimizer: Annotated[Optional[str], typer.Option(help="sam, asam, gsam, ... (`bench list`), or the task's "
                                                          "base optimizer (sgd); default: the base optimizer.")] = None,
    mopt: Annotated[Optional[list[str]], typer.Option(
        "--mopt", help="A minimizer option KEY=VALUE (repeatable), e.g. --mopt alpha=0.02; `bench list` shows "
                       "every minimizer's options, defaults and ranges.")] = None,
    rho: Annotated[Optional[float], typer.Option(help="Radius (--mopt rho=...); default: the paper's for this "
                                                      "task.")] = None,
    eta: Annotated[Optional[float], typer.Option(help="ASAM's eta (T = |w| + eta; --mopt eta=...).")] = None,
    accumulate: Annotated[Optional[int], typer.Option(
        help="Micro-batches per optimizer step (gradient accumulation; one perturbation from the whole batch, "
             "or per micro-batch with --m <micro-batch size>).")] = None,
    target_acc: Annotated[Optional[float], typer.Option(
        help="Time-to-accuracy target (%); default: the final accuracy of SGD's run of the same cell and "
             "seed.")] = None,
    epochs: Annotated[Optional[int], typer.Option()] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    lr: Annotated[Optional[float], typer.Option()] = None,
    momentum: Annotated[Optional[float], typer.Option()] = None,
    weight_decay: Annotated[Optional[float], typer.Option()] = None,
    label_smoothing: Annotated[Optional[float], typer.Option()] = None,
    nesterov: Annotated[Optional[bool], typer.Option("--nesterov/--no-nesterov")] = None,
    weight_decay_style: Annotated[Optional[str], typer.Option(
        help="optimizer: the base optimizer decays (ASAM code); loss: 0.5 wd ||w||^2 in the loss, so it enters "
             "both SAM gradients (SAM code).")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="cosine (per epoch), cosine-step (per step, SAM code), "
                                                         "constant, inverse_sqrt (per step).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="inverse_sqrt warm-up steps.")] = None,
    clip_norm: Annotated[Optional[float], typer.Option(help="Clip the update's gradient norm (0: off).")] = None,
    sync_perturbation: Annotated[Optional[bool], typer.Option(
        "--sync-perturbation/--local-perturbation",
        help="Data parallel: all-reduce SAM's first gradient (m = global batch) instead of the default "
             "per-replica perturbation (m = per-replica batch, SAM paper).")] = None,
    m: Annotated[Optional[int], typer.Option("--m", help="m-sharpness: every chunk of m examples of a replica's "
                                                      "batch perturbs on its own (0: m = per-replica batch).")] = None,
    true_gradient: Annotated[Optional[bool], typer.Option(
        "--true-gradient/--no-true-gradient", help="Shake-Shake/ShakeDrop: SAM's first pass uses the forward "
                                                   "coefficient in the backward too (SAM code).")] = None,
    augment: Annotated[Optional[str], typer.Option(help="Image tasks: basic, cutout, autoaugment, "
                                                        "autoaugment-cutout, none.")] = None,
    bn_second_pass: Annotated[Optional[str], typer.Option(
        help="update: BatchNorm statistics update in both SAM passes (official); freeze: first pass only.")] = None,
    second_pass_rng: Annotated[Optional[str], typer.Option(
        help="fresh: dropout/ShakeDrop draw new masks in the second SAM pass (official); reuse: the same.")] = None,
    noise: Annotated[Optional[float], typer.Option(help="Label-noise tasks: symmetric noise rate.")] = None,
    noise_seed: Annotated[Optional[int], typer.Option(help="Label-noise tasks: seed of the corruption.")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout rate of models with dropout layers (mlp, "
                                                          "Wide ResNets); 0: none.")] = None,
    precision: Annotated[Optional[str], typer.Option(
        help="fp32 (faithful default), bf16 (autocast) or fp16 (autocast + loss scaling; overflowing steps are "
             "skipped and counted).")] = None,
    loader: Annotated[Optional[str], typer.Option(
        help="CIFAR data path: auto (device on CUDA, else torchvision), torchvision, device.")] = None,
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    workers: Annotated[Optional[int], typer.Option(help="Data-loader worker processes.")] = None,
    data_dir: Annotated[str, typer.Option(envvar="SAMBENCH_DATA_DIR", help="Dataset root.")] = "data",
    download: Annotated[bool, typer.Option(help="Download the dataset if it is missing.")] = False,
    results_dir: Annotated[str, typer.Option(help="Where <task>.csv and runs/ go.")] = "results",
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    config: Annotated[Optional[str], typer.Option(help="TOML file of settings (RunConfig field names); "
                                                       "flags given on the command line win.")] = None,
    restart: Annotated[bool, typer.Option(help="Discard this run's checkpoint and start over.")] = False,
    keep_checkpoint: Annotated[bool, typer.Option(help="Keep runs/<run_id>/checkpoint.pt after the run.")] = False,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        help="Write the resume checkpoint every N epochs (and after the last, and when stopped); 1: every epoch.")] = None,
    log: Annotated[Optional[str], typer.Option(
        help="Live tracking: none, tensorboard or wandb (pip install 'sambench[tracking]'); the CSVs stay the "
             "record.")] = None,
    fast: Annotated[bool, typer.Option(
        help="CUDA: bf16 autocast, channels_last, torch.compile and TF32 (numerics change slightly; recorded in the "
             "row). Without it every default is the faithful fp32 eager loop.")] = False,
    deterministic: Annotated[bool, typer.Option(
        help="Deterministic algorithms, cudnn.benchmark off, cuBLAS's fixed workspace: on a GPU a resumed run is "
             "then bit-identical to an uninterrupted one (slower; recorded in the row).")] = False,
    keep_weights: Annotated[Optional[bool], typer.Option(
        "--keep-weights/--no-keep-weights", help="Keep the final weights (runs/<run_id>/weights.pt) for `bench "
                                                 "sharpness`.")] = None,
    force: Annotated[bool, typer.Option(help="Train a run that is already done again (from scratch) and "
                                             "replace its row.")] = False,
):
    """Train one model with one minimizer; append a row to <results-dir>/<task>.csv.

    An interrupted run resumes from its last epoch checkpoint when started again with the same settings.
    Ctrl-C once: finish the epoch, checkpoint, stop; twice: stop now (the last checkpoint stays)."""
    from bench import distributed as D
    from bench.registry import get_task
    from bench.runner import AlreadyDone, execute, make_config

    with user_errors():
        settings = _run_settings(ctx, config)
        if mopt:
            settings["mopts"] = {**(settings.get("mopts") or {}), **parse_mopts(mopt)}
        if settings["minimizer"] is None:
            settings["minimizer"] = get_task(task).base_optimizer
        if settings["workers"] is None:
            settings["workers"] = default_workers()
        if fast:
            from bench.runtime import FAST, fast_settings
            settings.update(fast_settings(settings["device"], settings))
            console.print(f"--fast: {FAST} (numerics change slightly; the row records it)", highlight=False)
        if settings.get("log") not in (None, "none"):
            from bench.tracking import check_tracking
            check_tracking(settings["log"])
        D.init_from_env(settings["device"])  # torchrun: join the process group (no-op in one process)
        settings["world_size"] = D.world_size()
        cfg = make_config(task, **settings)
        quiet = quiet or not D.is_main()
        if not quiet:
            extra = "".join(f" {k}={v}" for k, v in cfg.mopts.items())
            console.print(f"[bold]{cfg.run_id}[/]  {cfg.task} {cfg.model} {cfg.minimizer} rho={cfg.rho} "
                          f"eta={cfg.eta}{extra} epochs={cfg.epochs} batch={cfg.batch_size} lr={cfg.lr} "
                          f"seed={cfg.seed}", highlight=False)
        stop = StopFlag()
        try:
            with graceful_sigint(stop):
                row = execute(cfg, None if quiet else RichReporter(console), restart=restart, force=force,
                              keep_checkpoint=keep_checkpoint, stop=stop,
                              log=lambda m: console.print(m, highlight=False) if not quiet else None)
        except AlreadyDone as done:
            if D.is_main():
                console.print(f"already done: {cfg.run_id} ({done.row.get('status')}, in "
                              f"{Path(cfg.results_dir) / (cfg.task + '.csv')}); --force to run it again",
                              highlight=False)
            return
        except Interrupted as e:
            err_console.print(f"interrupted: {e}; checkpoint saved. Run the same command again to resume.",
                              highlight=False)
            raise typer.Exit(130)
        except KeyboardInterrupt:
            err_console.print("interrupted: stopped at once; the last epoch checkpoint stays. Run the same "
                              "command again to resume.", highlight=False)
            raise typer.Exit(130)
        finally:
            D.shutdown()
        if not quiet:
            print_rows([row])


def parse_mopts(items: list[str]) -> dict[str, Any]:
    """["alpha=0.02", "k=5", "adaptive=true"] -> {"alpha": 0.02, "k": 5, "adaptive": True}: values read as
    TOML scalars (numbers, true/false), anything else as text."""
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"--mopt takes KEY=VALUE, e.g. --mopt alpha=0.02; got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()
    return out


@contextlib.contextmanager
def graceful_sigint(stop):
    """First Ctrl-C: ask the run to stop at the end of the epoch (after its checkpoint). Second: stop now."""
    def handler(signum, frame):
        if stop.set:
            raise KeyboardInterrupt
        stop.set = True
        err_console.print("Ctrl-C: finishing this epoch, then saving and stopping (Ctrl-C again: stop now)",
                          highlight=False)

    with handling_sigint(handler):
        yield


def print_rows(rows: list[dict[str, Any]]) -> None:
    table = Table("run_id", "status", "model", "minimizer", "rho", "epochs", "max_test_acc", "final_test_acc",
                  "images/s", "wall s", "data")
    for r in rows:
        table.add_row(r["run_id"], r["status"], r["model"], r["minimizer"], _fmt(r["rho"]), _fmt(r["epochs"]),
                      _fmt(r.get("max_test_acc", float("nan"))), _fmt(r.get("final_test_acc", float("nan"))),
                      f"{float(r['images_per_s']):.0f}", f"{float(r['wall_time_s']):.1f}",
                      "synthetic" if r["synthetic"] else "real")
    console.print(table)


@app.command("reproduce")
def reproduce_cmd(
    tables: Annotated[Optional[list[str]], typer.Argument(help="Tables to run (asam2 ... asam6, sam1, sam2, sam4, "
                                                                "sam5, demo) or a paper's (asam, sam); default: "
                                                                "every table with the preset.")] = None,
    preset: Annotated[str, typer.Option(help="full (the papers' recipes), smoke (synthetic data, minutes "
                                             "on a CPU) or demo (digits with label noise).")] = "full",
    seeds: Annotated[Optional[int], typer.Option(help="Seeds per cell; default: the preset's.")] = None,
    results_dir: Annotated[str, typer.Option()] = "results",
    data_dir: Annotated[str, typer.Option(envvar="SAMBENCH_DATA_DIR")] = "data",
    device: Annotated[str, typer.Option()] = "auto",
    workers: Annotated[Optional[int], typer.Option(help="Data-loader workers of each run.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the plan (and GPU-hours where measured); run nothing. "
                                               "With --launcher slurm: the sbatch script too.")] = False,
    status: Annotated[bool, typer.Option("--status", help="Per table: done, running (where, since when), "
                                                          "failed, to do. Runs nothing.")] = False,
    force: Annotated[bool, typer.Option(help="Re-run runs whose rows already exist.")] = False,
    download: Annotated[bool, typer.Option(help="Download datasets that can be (CIFAR) if missing.")] = False,
    launcher: Annotated[Optional[str], typer.Option(help="local: worker processes on this machine (--gpus or "
                                                         "--workers-per-node); slurm: a job array through "
                                                         "submitit. Default: this process sweeps.")] = None,
    gpus: Annotated[Optional[str], typer.Option(help="local: one worker per GPU, e.g. 0,1,2,3.")] = None,
    workers_per_node: Annotated[int, typer.Option(help="local without --gpus: CPU workers.")] = 1,
    partition: Annotated[Optional[str], typer.Option(help="slurm: partition.")] = None,
    time_limit: Annotated[int, typer.Option("--time", help="slurm: minutes per run's job.")] = 24 * 60,
    gpus_per_run: Annotated[int, typer.Option(help="slurm: GPUs per node for each run (one process "
                                                   "each, torch.distributed).")] = 1,
    nodes_per_run: Annotated[int, typer.Option(help="slurm: nodes per run.")] = 1,
    max_parallel: Annotated[int, typer.Option(help="slurm: array tasks running at once.")] = 64,
    cpus_per_gpu: Annotated[int, typer.Option(help="slurm: CPUs per process (data loading).")] = 8,
    slurm_option: Annotated[Optional[list[str]], typer.Option(help="slurm: extra sbatch KEY=VALUE "
                                                                   "(repeatable), e.g. account=proj.")] = None,
    log: Annotated[str, typer.Option(help="Every run's live tracking: none, tensorboard or wandb.")] = "none",
    checkpoint_every: Annotated[int, typer.Option(help="Every run's checkpoint interval in epochs.")] = 1,
    deterministic: Annotated[bool, typer.Option(help="Every run with deterministic algorithms (see bench run "
                                                     "--deterministic).")] = False,
    stale_after: Annotated[float, typer.Option(help="Seconds without heartbeat after which another sweeper "
                                                    "takes a run over.")] = 600.0,
    poll: Annotated[float, typer.Option(help="Seconds between looks while other processes hold runs.")] = 10.0,
    slurm_cluster: Annotated[Optional[str], typer.Option(hidden=True)] = None,  # tests: submitit local/debug
):
    """Run the paper tables' experiment matrix; skips runs already in the results. Any number of these
    processes (on one machine or many nodes sharing the folder) may work through the same tables at once."""
    from bench.runtime import sweep_device
    from bench.sweep import launch
    from bench.sweep.plan import describe
    from bench.sweep.status import check_results_folder, status_lines
    from bench.sweep.sweeper import SweepSpec

    with user_errors():
        if launcher not in (None, *launch.LAUNCHERS):
            raise UserError(f"unknown launcher {launcher!r}; choose one of: {', '.join(launch.LAUNCHERS)}")
        if min(workers_per_node, gpus_per_run + 1, nodes_per_run, max_parallel, time_limit) < 1:
            raise UserError("--workers-per-node, --nodes-per-run, --max-parallel and --time must be >= 1, "
                            "--gpus-per-run >= 0")
        check_results_folder(results_dir, must_exist=status)
        world = max(gpus_per_run, 1) * nodes_per_run if launcher == "slurm" else 1
        if gpus and device.startswith("cuda:"):
            raise UserError(f"--gpus gives each worker one GPU, its cuda:0; --device {device} would name another. "
                            "Pass --device cuda (or auto) with --gpus")
        if not status:  # decided once for every run: a sweep started on GPUs never trains on the CPU
            device = sweep_device(device, slurm=launcher == "slurm", gpus_per_run=gpus_per_run, gpus=gpus)
        spec = SweepSpec(tuple(tables or ()), preset, results_dir, seeds=seeds, data_dir=data_dir, device=device,
                         workers=default_workers() if workers is None else workers, force=force,
                         download=download, world_size=world, poll=poll, stale_after=stale_after, log=log,
                         checkpoint_every=checkpoint_every, deterministic=deterministic)
        if log != "none":
            from bench.tracking import check_tracking
            check_tracking(log)
        plans = spec.plans()
        if status:
            return _print_lines(status_lines(plans, results_dir, stale_after))
        if dry_run:
            _print_lines(describe(plans, results_dir))
            if launcher != "slurm":
                return
        if launcher == "slurm":
            params = launch.slurm_parameters(partition=partition, time_min=time_limit, gpus_per_run=gpus_per_run,
                                             nodes_per_run=nodes_per_run, max_parallel=max_parallel,
                                             cpus_per_gpu=cpus_per_gpu,
                                             options=launch.parse_slurm_options(slurm_option or []))
            return launch.launch_slurm(spec, plans, params, dry_run, slurm_cluster or "slurm", say)
        for tp in plans:
            if tp.skipped:
                console.print(f"[yellow]{tp.name}: skipped:[/] {tp.skipped}", highlight=False)
            elif tp.done:
                console.print(f"{tp.name}: {len(tp.done)} of {len(tp.runs)} runs already done", highlight=False)
        if launcher == "local":
            if not launch.launch_local(spec, gpus, workers_per_node, say):
                raise typer.Exit(1)
            return
        counts = spec.sweeper().run()
        console.print("done: " + ", ".join(f"{v} {k}" for k, v in counts.items()), highlight=False)


def say(text: str) -> None:
    console.print(text, highlight=False, markup=False)


def _print_lines(lines: list[str]) -> None:
    for line in lines:
        say(line)


@app.command("perf")
def perf_cmd(
    task: Annotated[str, typer.Option(help="Task whose model zoo to time (CIFAR-shaped batches).")] = "cifar10",
    model: Annotated[Optional[str], typer.Option(
        help="Default: wrn28_10 (step); the task's recipe model (loop).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help="Default: 128 (step); the recipe's (loop; tokens per batch for translation).")] = None,
    steps: Annotated[Optional[int], typer.Option(
        help="Timed steps per minimizer, after warm-up (default 20; loop: 50, in whole chunks).")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up: steps (step), rounds of --chunk steps (loop).")] = 3,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    precision: Annotated[Optional[str], typer.Option(
        help="fp32 or bf16 (step; default fp32); loop: fp16 too, default the recipe's.")] = None,
    minimizer: Annotated[Optional[list[str]], typer.Option(
        help="Minimizer to time beside the base optimizer (repeatable); default: every registered one (step), "
             "sam and asam (loop).")] = None,
    peer: Annotated[bool, typer.Option(help="Also time pytorch-optimizer's SAM (pip install "
                                            "'sambench[peer]'); step only.")] = False,
    results_dir: Annotated[str, typer.Option(help="Appends to <results-dir>/perf.csv.")] = "results",
    what: Annotated[str, typer.Option(help="step: one isolated step on a random CIFAR-shaped batch; loop: bench "
                                           "run's own loop (loader, precision, channels_last, compile).")] = "step",
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last",
                                                          help="Loop only.")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="Loop only: torch.compile; "
                                                    "the first step is reported apart (compile_s).")] = None,
    loader: Annotated[Optional[str], typer.Option(help="Loop only: auto, torchvision or device.")] = None,
    data_dir: Annotated[Optional[str], typer.Option(
        help="Loop only: the task's data (default: data/ if it holds it, else synthetic data).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Loop only: data-loader worker processes.")] = None,
    chunk: Annotated[Optional[int], typer.Option(help="Loop only: steps per contestant per round (default 5).")] = None,
):
    """Time SGD and every minimizer side by side (interleaved, same initial weights) on one device."""
    from bench.engine import resolve_device
    from bench.perf import append_perf_rows, format_table, measure_task
    from bench.registry import get_task

    with user_errors():
        if what not in ("step", "loop"):
            raise UserError(f"--what must be step or loop, got {what!r}")
        t = get_task(task)
        loop_only = {"--channels-last": channels_last, "--compile": compile, "--loader": loader,
                     "--data-dir": data_dir, "--workers": workers, "--chunk": chunk}
        if what == "loop":
            from bench import perf_loop
            if peer:
                raise UserError("--peer applies to --what step")
            settings = dict(model=model, batch_size=batch_size, precision=precision, channels_last=channels_last,
                            compile=compile, loader=loader, data_dir=data_dir, device=device,
                            workers=default_workers() if workers is None else workers)
            rows = perf_loop.measure_loop(
                task, settings, minimizer, steps=perf_loop.DEFAULT_STEPS if steps is None else steps, warmup=warmup,
                chunk=perf_loop.DEFAULT_CHUNK if chunk is None else chunk, log=say)
            table, note = perf_loop.format_loop_table(rows), perf_loop.spread_note(rows)
        else:
            given = [flag for flag, value in loop_only.items() if value not in (None, False)]  # step: eager NCHW
            if given:
                raise UserError(f"{', '.join(given)}: for --what loop only (step mode times an eager NCHW step)")
            rows = measure_task(t, model, batch_size, steps, resolve_device(device), precision, warmup, peer, minimizer)
            table, note = format_table(rows), ""
        path = append_perf_rows(rows, results_dir)
        console.print(table, highlight=False, markup=False)
        if note:
            say(note)
        console.print(f"appended {len(rows)} rows to {path}", highlight=False)


@app.command("sharpness")
def sharpness_cmd(
    run_id: Annotated[str, typer.Argument(help="A finished run's id (its row in <results-dir>/<task>.csv) whose "
                                               "weights were kept (--keep-weights).")],
    results_dir: Annotated[str, typer.Option(help="Where the run is; sharpness.csv goes there.")] = "results",
    measure: Annotated[Optional[list[str]], typer.Option(
        help="worst_l2, worst_adaptive_l2, worst_linf, worst_adaptive_linf, avg_l2, avg_adaptive_l2, hessian_top, "
             "hessian_trace (repeatable); default: all.")] = None,
    rho: Annotated[Optional[list[float]], typer.Option(
        help="Radius (repeatable); default per measure: 0.05 (l2), 0.5 (adaptive l2), 1e-3 (linf), 1e-2 "
             "(adaptive linf).")] = None,
    examples: Annotated[int, typer.Option(help="The first N training (and test) examples.")] = 1024,
    m: Annotated[int, typer.Option("--m", help="Examples per batch of the worst/avg measures (m-sharpness).")] = 128,
    iters: Annotated[int, typer.Option(help="Ascent steps (worst), draws (avg), Hutchinson probes (trace).")] = 20,
    eta: Annotated[float, typer.Option(help="Adaptive measures: T_w = |w| + eta (ASAM's).")] = 0.01,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
):
    """Measure a finished run's sharpness on a fixed set of training examples; rows go to sharpness.csv."""
    from bench.sharpness import CSV_NAME, make_request, measure_run

    with user_errors():
        request = make_request(measure, rho, device, examples=examples, m=m, iters=iters, eta=eta, seed=seed)
        rows = measure_run(results_dir, run_id, request, log=say)
        first = rows[0]
        say(f"train acc {first['train_acc']:.2f}  test acc {first['test_acc']:.2f}  gap {first['gap_acc']:.2f} "
            f"points (first {first['sh_examples']} / {first['sh_test_examples']} examples)")
        say(f"wrote {len(rows)} rows to {Path(results_dir) / CSV_NAME}")


@app.command("report")
def report_cmd(
    results_dir: Annotated[str, typer.Option(help="Folder of the result CSVs.")] = "results",
    out: Annotated[Optional[str], typer.Option(help="Markdown file; default <results-dir>/report.md.")] = None,
    targets: Annotated[Optional[str], typer.Option(help="The papers' published cells; default "
                                                        "results/paper/paper-cells.csv of this checkout.")] = None,
    plot: Annotated[Optional[list[str]], typer.Option(help="TASK:MODEL to plot (repeatable); default: "
                                                           "every group with epoch logs, at most 12.")] = None,
    preset: Annotated[Optional[list[str]], typer.Option(
        help="Whose plan the cells hold (repeatable): full (the papers' recipes, default), smoke, demo. Runs "
             "no plan names are listed apart, never averaged into a cell.")] = None,
):
    """Turn the result CSVs into markdown tables shaped like the papers', our numbers beside theirs.

    A cell averages only the runs `bench reproduce --preset PRESET` plans for it (same settings, any
    seed); every other run is listed under "Other runs" with the settings in which it differs."""
    from pathlib import Path

    from bench.registry import tables_file
    from bench.report import write_report
    from bench.sweep.plan import load_tables as load_plan_tables, planned_settings

    with user_errors():
        if not Path(results_dir).is_dir():
            raise UserError(f"no results folder {results_dir}; run `bench run` or `bench reproduce` first")
        out_path = Path(out) if out else Path(results_dir) / "report.md"
        here = Path(__file__).resolve().parent.parent
        targets_path = Path(targets) if targets else here / "results" / "paper" / "paper-cells.csv"
        if not targets_path.exists():
            raise UserError(f"the papers' cells are not at {targets_path}; pass --targets FILE")
        pairs = None
        if plot:
            bad = [p for p in plot if ":" not in p]
            if bad:
                raise UserError(f"--plot takes TASK:MODEL, got {bad[0]!r}")
            pairs = [tuple(p.split(":", 1)) for p in plot]
        # The plans come from here (they need the task registry); the report itself stays torch-free.
        plans = planned_settings(load_plan_tables(tables_file()), preset or ["full"])
        text = write_report(results_dir, out_path, targets_path, tables_file(), plans, plots=pairs)
        console.print(text, highlight=False, markup=False)
        console.print(f"wrote {out_path}", highlight=False)


@app.command("show")
def show_cmd(
    task: Annotated[str, typer.Argument(help="Task whose results to show.")],
    results_dir: Annotated[str, typer.Option(help="Where <task>.csv lives.")] = "results",
    last: Annotated[int, typer.Option(help="Show the last N rows.")] = 20,
):
    """Print the rows of <results-dir>/<task>.csv."""
    import csv
    from pathlib import Path

    with user_errors():
        path = Path(results_dir) / f"{task}.csv"
        if not path.exists():
            raise UserError(f"no results at {path}; run `bench run {task} ...` first or pass --results-dir")
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))[-last:]
        print_rows([{k: _num(v) for k, v in r.items()} for r in rows])


def _num(v: str) -> Any:
    try:
        return float(v)
    except ValueError:
        return {"True": True, "False": False}.get(v, v)


@app.command("list")
def list_cmd():
    """Tasks (their models, recipes and minimizer options) and every minimizer with its options."""
    from bench.listing import list_lines

    with user_errors():
        for line in list_lines():
            console.print(line, highlight=False)


@data_app.command("fake")
def data_fake_cmd(
    name: Annotated[str, typer.Argument(help="Dataset / task name, e.g. cifar10.")],
    out_dir: Annotated[str, typer.Argument(help="Folder to write into (use it as --data-dir).")],
    train: Annotated[int, typer.Option(help="Training examples (CIFAR).")] = 2000,
    test: Annotated[int, typer.Option(help="Test examples (CIFAR).")] = 500,
    classes: Annotated[int, typer.Option(help="Classes (ImageNet).")] = 4,
    per_class: Annotated[int, typer.Option(help="Training images per class (ImageNet; val gets half).")] = 8,
    seed: Annotated[int, typer.Option()] = 0,
):
    """Write a small synthetic dataset in the real on-disk format."""
    from bench.registry import get_task

    with user_errors():
        msg = get_task(name).make_fake(out_dir, train=train, test=test, classes=classes, per_class=per_class,
                                       seed=seed)
        console.print(msg, highlight=False)


@data_app.command("prepare")
def data_prepare_cmd(
    name: Annotated[str, typer.Argument(help="Dataset, e.g. iwslt14.")],
    raw: Annotated[str, typer.Option(help="The downloaded archive (e.g. de-en.tgz) or its extracted folder.")],
    out: Annotated[str, typer.Option(help="Folder for the prepared corpus (use it as --data-dir).")] = "data/iwslt14",
    bpe_merges: Annotated[int, typer.Option(help="Joint BPE merges.")] = 10000,
):
    """Turn a raw dataset archive into the corpus the task trains on (IWSLT'14: prepare-iwslt14.sh)."""
    from bench.registry import get_task

    with user_errors():
        task = get_task(name)
        if not hasattr(task, "prepare"):
            raise UserError(f"task {task.name!r} needs no preparation")
        console.print(task.prepare(raw, out, bpe_merges=bpe_merges), highlight=False)


@app.command("doctor")
def doctor_cmd(
    data_dir: Annotated[str, typer.Option(envvar="SAMBENCH_DATA_DIR", help="Dataset root to look in.")] = "data",
    results_dir: Annotated[str, typer.Option(help="The results folder to check (file locks, free disk); created "
                                                  "if missing.")] = "results",
    out: Annotated[Optional[str], typer.Option(help="Markdown report; default <results-dir>/doctor.md.")] = None,
    full: Annotated[bool, typer.Option("--full", help="On a CUDA GPU also: every minimizer's step under CUDA's "
                                                      "sync check, WRN-28-10 loop timings (fp32, bf16, bf16 + "
                                                      "channels_last + compile), interrupted and resumed runs "
                                                      "against uninterrupted ones, bench sharpness (~8 min on "
                                                      "one H100).")] = False,
    device: Annotated[Optional[str], typer.Option(hidden=True)] = None,  # tests: --full on the CPU, tiny
    model: Annotated[Optional[str], typer.Option(hidden=True)] = None,
    batch_size: Annotated[Optional[int], typer.Option(hidden=True)] = None,
    steps: Annotated[Optional[int], typer.Option(hidden=True)] = None,
):
    """Check this machine before a sweep: torch, CUDA and the driver, GPUs, torch.compile's needs, each task's
    data, file locks in the results folder, SLURM and torchrun. Exit status 1 when a check failed."""
    from bench.doctor import run_doctor

    with user_errors():
        code = run_doctor(data_dir, results_dir, out, full=full, say=say, device=device, model=model,
                          batch_size=batch_size, steps=steps)
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
