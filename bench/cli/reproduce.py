"""`bench reproduce`: the paper tables' experiment matrix, swept here, by local workers or on SLURM."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from bench.cli.console import _print_lines, console, say, user_errors
from bench.errors import UserError
from bench.train.runtime import default_workers

TablesOpt = Annotated[Optional[list[str]], typer.Argument(help="Tables to run (asam2 ... asam6, sam1, sam2, sam4, "
                                                                "sam5, demo) or a paper's (asam, sam); default: "
                                                                "every table with the preset.")]
PresetOpt = Annotated[str, typer.Option(help="full (the papers' recipes), smoke (synthetic data, minutes "
                                             "on a CPU) or demo (digits with label noise).")]
SeedsOpt = Annotated[Optional[int], typer.Option(help="Seeds per cell; default: the preset's.")]
WorkersOpt = Annotated[Optional[int], typer.Option(help="Data-loader workers of each run.")]
DryRunOpt = Annotated[bool, typer.Option(help="Print the plan (and GPU-hours where measured); run nothing. "
                                               "With --launcher slurm: the sbatch script too.")]
StatusOpt = Annotated[bool, typer.Option("--status", help="Per table: done, running (where, since when), "
                                                          "failed, to do. Runs nothing.")]
ForceOpt = Annotated[bool, typer.Option(help="Re-run runs whose rows already exist.")]
DownloadOpt = Annotated[bool, typer.Option(help="Download datasets that can be (CIFAR) if missing.")]
LauncherOpt = Annotated[Optional[str], typer.Option(help="local: worker processes on this machine (--gpus or "
                                                         "--workers-per-node); slurm: a job array through "
                                                         "submitit. Default: this process sweeps.")]
GpusOpt = Annotated[Optional[str], typer.Option(help="local: one worker per GPU, e.g. 0,1,2,3.")]
WorkersPerNodeOpt = Annotated[int, typer.Option(help="local without --gpus: CPU workers.")]
PartitionOpt = Annotated[Optional[str], typer.Option(help="slurm: partition.")]
TimeLimitOpt = Annotated[int, typer.Option("--time", help="slurm: minutes per run's job.")]
GpusPerRunOpt = Annotated[int, typer.Option(help="slurm: GPUs per node for each run (one process "
                                                   "each, torch.distributed).")]
MaxParallelOpt = Annotated[int, typer.Option(help="slurm: array tasks running at once.")]
CpusPerGpuOpt = Annotated[int, typer.Option(help="slurm: CPUs per process (data loading).")]
SlurmOptionOpt = Annotated[Optional[list[str]], typer.Option(help="slurm: extra sbatch KEY=VALUE "
                                                                   "(repeatable), e.g. account=proj.")]
LogOpt = Annotated[str, typer.Option(help="Every run's live tracking: none, tensorboard or wandb.")]
CheckpointEveryOpt = Annotated[int, typer.Option(help="Every run's checkpoint interval in epochs.")]
DeterministicOpt = Annotated[bool, typer.Option(help="Every run with deterministic algorithms (see bench run "
                                                     "--deterministic).")]
StaleAfterOpt = Annotated[float, typer.Option(help="Seconds without heartbeat after which another sweeper "
                                                    "takes a run over.")]
PollOpt = Annotated[float, typer.Option(help="Seconds between looks while other processes hold runs.")]


def reproduce_cmd(
    tables: TablesOpt = None,
    preset: PresetOpt = "full",
    seeds: SeedsOpt = None,
    results_dir: Annotated[str, typer.Option()] = "results",
    data_dir: Annotated[str, typer.Option(envvar="SAMBENCH_DATA_DIR")] = "data",
    device: Annotated[str, typer.Option()] = "auto",
    workers: WorkersOpt = None,
    dry_run: DryRunOpt = False,
    status: StatusOpt = False,
    force: ForceOpt = False,
    download: DownloadOpt = False,
    launcher: LauncherOpt = None,
    gpus: GpusOpt = None,
    workers_per_node: WorkersPerNodeOpt = 1,
    partition: PartitionOpt = None,
    time_limit: TimeLimitOpt = 24 * 60,
    gpus_per_run: GpusPerRunOpt = 1,
    nodes_per_run: Annotated[int, typer.Option(help="slurm: nodes per run.")] = 1,
    max_parallel: MaxParallelOpt = 64,
    cpus_per_gpu: CpusPerGpuOpt = 8,
    slurm_option: SlurmOptionOpt = None,
    log: LogOpt = "none",
    checkpoint_every: CheckpointEveryOpt = 1,
    deterministic: DeterministicOpt = False,
    stale_after: StaleAfterOpt = 600.0,
    poll: PollOpt = 10.0,
    slurm_cluster: Annotated[Optional[str], typer.Option(hidden=True)] = None,
):
    """Run the paper tables' experiment matrix; skips runs already in the results. Any number of these
    processes (on one machine or many nodes sharing the folder) may work through the same tables at once."""
    from bench.sweep import launch
    from bench.sweep.status import check_results_folder, status_lines
    from bench.sweep.sweeper import SweepSpec
    from bench.tables.plan import describe
    from bench.train.runtime import sweep_device

    with user_errors():
        check_launch(launcher, gpus, device, workers_per_node, gpus_per_run, nodes_per_run, max_parallel, time_limit)
        check_results_folder(results_dir, must_exist=status)
        world = max(gpus_per_run, 1) * nodes_per_run if launcher == "slurm" else 1
        if not status:  # decided once for every run: a sweep started on GPUs never trains on the CPU
            device = sweep_device(device, slurm=launcher == "slurm", gpus_per_run=gpus_per_run, gpus=gpus)
        spec = SweepSpec(tuple(tables or ()), preset, results_dir, seeds=seeds, data_dir=data_dir, device=device,
                         workers=default_workers() if workers is None else workers, force=force,
                         download=download, world_size=world, poll=poll, stale_after=stale_after, log=log,
                         checkpoint_every=checkpoint_every, deterministic=deterministic)
        if log != "none":
            from bench.train.tracking import check_tracking
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
        sweep_here(spec, plans, launcher, gpus, workers_per_node)


def sweep_here(spec, plans: list, launcher: str | None, gpus: str | None, workers_per_node: int) -> None:
    """Sweep the plans from this machine: this process, or `--launcher local`'s workers (one per GPU)."""
    from bench.sweep import launch
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


def check_launch(launcher: str | None, gpus: str | None, device: str, *counts: int) -> None:
    """One line for a launcher that does not exist, a count below one, or --gpus with a numbered device."""
    from bench.sweep import launch
    if launcher not in (None, *launch.LAUNCHERS):
        raise UserError(f"unknown launcher {launcher!r}; choose one of: {', '.join(launch.LAUNCHERS)}")
    workers_per_node, gpus_per_run, nodes_per_run, max_parallel, time_limit = counts
    if min(workers_per_node, gpus_per_run + 1, nodes_per_run, max_parallel, time_limit) < 1:
        raise UserError("--workers-per-node, --nodes-per-run, --max-parallel and --time must be >= 1, "
                        "--gpus-per-run >= 0")
    if gpus and device.startswith("cuda:"):
        raise UserError(f"--gpus gives each worker one GPU, its cuda:0; --device {device} would name another. "
                        "Pass --device cuda (or auto) with --gpus")
