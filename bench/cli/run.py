"""`bench run`: train one model with one minimizer, one row in <results-dir>/<task>.csv."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.cli.console import console, err_console, user_errors
from bench.errors import UserError
from bench.text import number
from bench.train.control import Interrupted, StopFlag, graceful_sigint
from bench.train.loop import Reporter
from bench.train.runtime import default_workers


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
        shown = "  ".join(f"{k} {number(v)}" for k, v in m.items() if k != "epoch")
        self.console.print(f"epoch {m['epoch']:>3}  {shown}", highlight=False)


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


TaskOpt = Annotated[str, typer.Argument(help="Task name (see `bench list`).")]
ModelOpt = Annotated[Optional[str], typer.Option(help="Model name; default: the task's.")]
MinimizerOpt = Annotated[Optional[str], typer.Option(help="sam, asam, gsam, ... (`bench list`), or the task's "
                                                          "base optimizer (sgd); default: the base optimizer.")]
MoptOpt = Annotated[Optional[list[str]], typer.Option(
        "--mopt", help="A minimizer option KEY=VALUE (repeatable), e.g. --mopt alpha=0.02; `bench list` shows "
                       "every minimizer's options, defaults and ranges.")]
ToptOpt = Annotated[Optional[list[str]], typer.Option(
        "--topt", help="A task option KEY=VALUE (repeatable), e.g. --topt noise=0.4; `bench list` shows every task's "
                       "options (--noise, --noise-seed, --augment, --dropout are shorthands).")]
RhoOpt = Annotated[Optional[float], typer.Option(help="Radius (--mopt rho=...); default: the paper's for this "
                                                      "task.")]
EtaOpt = Annotated[Optional[float], typer.Option(help="ASAM's eta (T = |w| + eta; --mopt eta=...).")]
AccumulateOpt = Annotated[Optional[int], typer.Option(
        help="Micro-batches per optimizer step (gradient accumulation; one perturbation from the whole batch, "
             "or per micro-batch with --m <micro-batch size>).")]
TargetAccOpt = Annotated[Optional[float], typer.Option(
        help="Time-to-accuracy target (%); default: the final accuracy of SGD's run of the same cell and "
             "seed.")]
NesterovOpt = Annotated[Optional[bool], typer.Option("--nesterov/--no-nesterov")]
WeightDecayStyleOpt = Annotated[Optional[str], typer.Option(
        help="optimizer: the base optimizer decays (ASAM code); loss: 0.5 wd ||w||^2 in the loss, so it enters "
             "both SAM gradients (SAM code).")]
ScheduleOpt = Annotated[Optional[str], typer.Option(help="cosine (per epoch), cosine-step (per step, SAM code), "
                                                         "constant, inverse_sqrt (per step).")]
WarmupStepsOpt = Annotated[Optional[int], typer.Option(help="inverse_sqrt warm-up steps.")]
ClipNormOpt = Annotated[Optional[float], typer.Option(help="Clip the update's gradient norm (0: off).")]
SyncPerturbationOpt = Annotated[Optional[bool], typer.Option(
        "--sync-perturbation/--local-perturbation",
        help="Data parallel: all-reduce SAM's first gradient (m = global batch) instead of the default "
             "per-replica perturbation (m = per-replica batch, SAM paper).")]
MOpt = Annotated[Optional[int], typer.Option("--m", help="m-sharpness: every chunk of m examples of a replica's "
                                                      "batch perturbs on its own (0: m = per-replica batch).")]
TrueGradientOpt = Annotated[Optional[bool], typer.Option(
        "--true-gradient/--no-true-gradient", help="Shake-Shake/ShakeDrop: SAM's first pass uses the forward "
                                                   "coefficient in the backward too (SAM code).")]
AugmentOpt = Annotated[Optional[str], typer.Option(help="Image tasks: basic, cutout, autoaugment, "
                                                        "autoaugment-cutout, none.")]
SamFromOpt = Annotated[Optional[float], typer.Option(
        help="Late-phase SAM: plain base-optimizer steps until this epoch (an integer) or this fraction of training "
             "(0 < X < 1), then the minimizer; its first step starts a fresh base optimizer, as the late-phase "
             "paper's script.")]
SamEveryOpt = Annotated[Optional[int], typer.Option(
        help="The minimizer's two-pass step every K-th step, plain base-optimizer steps between (Composer's SAM "
             "interval).")]
BnSecondPassOpt = Annotated[Optional[str], typer.Option(
        help="update: BatchNorm statistics update in both SAM passes (official); freeze: first pass only.")]
SecondPassRngOpt = Annotated[Optional[str], typer.Option(
        help="fresh: dropout/ShakeDrop draw new masks in the second SAM pass (official); reuse: the same.")]
NoiseOpt = Annotated[Optional[float], typer.Option(help="Label-noise tasks: symmetric noise rate.")]
NoiseSeedOpt = Annotated[Optional[int], typer.Option(help="Label-noise tasks: seed of the corruption.")]
DropoutOpt = Annotated[Optional[float], typer.Option(help="Dropout rate of models with dropout layers (mlp, "
                                                          "Wide ResNets); 0: none.")]
PrecisionOpt = Annotated[Optional[str], typer.Option(
        help="fp32 (faithful default), bf16 (autocast) or fp16 (autocast + loss scaling; overflowing steps are "
             "skipped and counted).")]
LoaderOpt = Annotated[Optional[str], typer.Option(
        help="CIFAR data path: auto (device on CUDA, else torchvision), torchvision, device.")]
ChannelsLastOpt = Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last")]
CompileOpt = Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile.")]
WorkersOpt = Annotated[Optional[int], typer.Option(help="Data-loader worker processes.")]
DataDirOpt = Annotated[str, typer.Option(envvar="SAMBENCH_DATA_DIR", help="Dataset root.")]
DownloadOpt = Annotated[bool, typer.Option(help="Download the dataset if it is missing.")]
ResultsDirOpt = Annotated[str, typer.Option(help="Where <task>.csv and runs/ go.")]
ConfigOpt = Annotated[Optional[str], typer.Option(help="TOML file of settings (RunConfig field names); "
                                                       "flags given on the command line win.")]
RestartOpt = Annotated[bool, typer.Option(help="Discard this run's checkpoint and start over.")]
KeepCheckpointOpt = Annotated[bool, typer.Option(help="Keep runs/<run_id>/checkpoint.pt after the run.")]
CheckpointEveryOpt = Annotated[Optional[int], typer.Option(
        help="Write the resume checkpoint every N epochs (and after the last, and when stopped); 1: every epoch.")]
LogOpt = Annotated[Optional[str], typer.Option(
        help="Live tracking: none, tensorboard or wandb (pip install 'sambench[tracking]'); the CSVs stay the "
             "record.")]
FastOpt = Annotated[bool, typer.Option(
        help="CUDA: bf16 autocast, channels_last, torch.compile and TF32 (numerics change slightly; recorded in the "
             "row). Without it every default is the faithful fp32 eager loop.")]
DeterministicOpt = Annotated[bool, typer.Option(
        help="Deterministic algorithms, cudnn.benchmark off, cuBLAS's fixed workspace: on a GPU a resumed run is "
             "then bit-identical to an uninterrupted one (slower; recorded in the row).")]
KeepWeightsOpt = Annotated[Optional[bool], typer.Option(
        "--keep-weights/--no-keep-weights", help="Keep the final weights (runs/<run_id>/weights.pt) for `bench "
                                                 "sharpness`.")]
ForceOpt = Annotated[bool, typer.Option(help="Train a run that is already done again (from scratch) and "
                                             "replace its row.")]


def run_cmd(
    ctx: typer.Context,
    task: TaskOpt,
    model: ModelOpt = None,
    minimizer: MinimizerOpt = None,
    mopt: MoptOpt = None,
    topt: ToptOpt = None,
    rho: RhoOpt = None,
    eta: EtaOpt = None,
    accumulate: AccumulateOpt = None,
    target_acc: TargetAccOpt = None,
    epochs: Annotated[Optional[int], typer.Option()] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    lr: Annotated[Optional[float], typer.Option()] = None,
    momentum: Annotated[Optional[float], typer.Option()] = None,
    weight_decay: Annotated[Optional[float], typer.Option()] = None,
    label_smoothing: Annotated[Optional[float], typer.Option()] = None,
    nesterov: NesterovOpt = None,
    weight_decay_style: WeightDecayStyleOpt = None,
    schedule: ScheduleOpt = None,
    warmup_steps: WarmupStepsOpt = None,
    clip_norm: ClipNormOpt = None,
    sync_perturbation: SyncPerturbationOpt = None,
    m: MOpt = None,
    true_gradient: TrueGradientOpt = None,
    sam_from: SamFromOpt = None,
    sam_every: SamEveryOpt = None,
    augment: AugmentOpt = None,
    bn_second_pass: BnSecondPassOpt = None,
    second_pass_rng: SecondPassRngOpt = None,
    noise: NoiseOpt = None,
    noise_seed: NoiseSeedOpt = None,
    dropout: DropoutOpt = None,
    precision: PrecisionOpt = None,
    loader: LoaderOpt = None,
    channels_last: ChannelsLastOpt = None,
    compile: CompileOpt = None,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    workers: WorkersOpt = None,
    data_dir: DataDirOpt = "data",
    download: DownloadOpt = False,
    results_dir: ResultsDirOpt = "results",
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    config: ConfigOpt = None,
    restart: RestartOpt = False,
    keep_checkpoint: KeepCheckpointOpt = False,
    checkpoint_every: CheckpointEveryOpt = None,
    log: LogOpt = None,
    fast: FastOpt = False,
    deterministic: DeterministicOpt = False,
    keep_weights: KeepWeightsOpt = None,
    force: ForceOpt = False,
):
    """Train one model with one minimizer; append a row to <results-dir>/<task>.csv.

    An interrupted run resumes from its last epoch checkpoint when started again with the same settings.
    Ctrl-C once: finish the epoch, checkpoint, stop; twice: stop now (the last checkpoint stays)."""
    with user_errors():
        cfg = run_config(task, _run_settings(ctx, config), {"--mopt": mopt, "--topt": topt}, fast)
        train_and_show(cfg, quiet, restart=restart, force=force, keep_checkpoint=keep_checkpoint)


def run_config(task: str, settings: dict[str, Any], options: dict[str, list[str] | None], fast: bool):
    """The run's RunConfig from its flags: --mopt/--topt parsed, the task's base optimizer by default, --fast's
    settings, the process group joined under torchrun (world_size from it), then the recipe's under them all."""
    from bench import distributed as D
    from bench.recipes import make_config
    from bench.registry import get_task
    for flag, items in options.items():
        key = "mopts" if flag == "--mopt" else "topts"
        if items:
            settings[key] = {**(settings.get(key) or {}), **parse_options(items, flag)}
    if settings["minimizer"] is None:
        settings["minimizer"] = get_task(task).base_optimizer
    if settings["workers"] is None:
        settings["workers"] = default_workers()
    if fast:
        from bench.train.runtime import FAST, fast_settings
        settings.update(fast_settings(settings["device"], settings))
        console.print(f"--fast: {FAST} (numerics change slightly; the row records it)", highlight=False)
    if settings.get("log") not in (None, "none"):
        from bench.train.tracking import check_tracking
        check_tracking(settings["log"])
    D.init_from_env(settings["device"])  # torchrun: join the process group (no-op in one process)
    settings["world_size"] = D.world_size()
    return make_config(task, **settings)


def train_and_show(cfg, quiet: bool, **how) -> None:
    """Train the run (Ctrl-C once: stop after the epoch; twice: now), showing progress and its row unless quiet
    (ranks other than 0 always are)."""
    from bench import distributed as D
    from bench.train.runner import AlreadyDone, execute
    quiet = quiet or not D.is_main()
    if not quiet:
        extra = "".join(f" {k}={v}" for k, v in {**cfg.spelled()["mopts"], **cfg.topts}.items())
        console.print(f"[bold]{cfg.run_id}[/]  {cfg.task} {cfg.model} {cfg.minimizer} rho={cfg.rho} "
                      f"eta={cfg.eta}{extra} epochs={cfg.epochs} batch={cfg.batch_size} lr={cfg.lr} "
                      f"seed={cfg.seed}", highlight=False)
    stop = StopFlag()
    try:
        with graceful_sigint(stop):
            row = execute(cfg, None if quiet else RichReporter(console), stop=stop, **how,
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


def parse_options(items: list[str], flag: str = "--mopt") -> dict[str, Any]:
    """["alpha=0.02", "k=5", "adaptive=true"] -> {"alpha": 0.02, "k": 5, "adaptive": True}: values read as
    TOML scalars (numbers, true/false), anything else as text (--mopt, --topt)."""
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"{flag} takes KEY=VALUE, e.g. {flag} alpha=0.02; got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()
    return out


def print_rows(rows: list[dict[str, Any]]) -> None:
    table = Table("run_id", "status", "model", "minimizer", "rho", "epochs", "max_test_acc", "final_test_acc",
                  "images/s", "wall s", "data")
    for r in rows:
        table.add_row(r["run_id"], r["status"], r["model"], r["minimizer"], number(r["rho"]), number(r["epochs"]),
                      number(r.get("max_test_acc", float("nan"))), number(r.get("final_test_acc", float("nan"))),
                      f"{float(r['images_per_s']):.0f}", f"{float(r['wall_time_s']):.1f}",
                      "synthetic" if r["synthetic"] else "real")
    console.print(table)
