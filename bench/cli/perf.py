"""`bench perf`: SGD and the minimizers timed side by side (one step, or bench run's own loop)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from bench.cli.console import console, say, user_errors
from bench.errors import UserError
from bench.train.runtime import default_workers

TaskOpt = Annotated[str, typer.Option(help="Task whose model zoo to time (CIFAR-shaped batches).")]
ModelOpt = Annotated[Optional[str], typer.Option(
        help="Default: wrn28_10 (step); the task's recipe model (loop).")]
BatchSizeOpt = Annotated[Optional[int], typer.Option(
        help="Default: 128 (step); the recipe's (loop; tokens per batch for translation).")]
StepsOpt = Annotated[Optional[int], typer.Option(
        help="Timed steps per minimizer, after warm-up (default 20; loop: 50, in whole chunks).")]
WarmupOpt = Annotated[int, typer.Option(help="Untimed warm-up: steps (step), rounds of --chunk steps (loop).")]
PrecisionOpt = Annotated[Optional[str], typer.Option(
        help="fp32 or bf16 (step; default fp32); loop: fp16 too, default the recipe's.")]
MinimizerOpt = Annotated[Optional[list[str]], typer.Option(
        help="Minimizer to time beside the base optimizer (repeatable); default: every registered one (step), "
             "sam and asam (loop). Step: a schedule too, sam@every5 (a two-pass step every 5th) or sam@from0.875 "
             "(late-phase: one step in 8 two-pass, the mean step of a run's last 1/8).")]
PeerOpt = Annotated[bool, typer.Option(help="Also time pytorch-optimizer's SAM (pip install "
                                            "'sambench[peer]'); step only.")]
ResultsDirOpt = Annotated[str, typer.Option(help="Appends to <results-dir>/perf.csv.")]
WhatOpt = Annotated[str, typer.Option(help="step: one isolated step on a random CIFAR-shaped batch; loop: bench "
                                           "run's own loop (loader, precision, channels_last, compile).")]
ChannelsLastOpt = Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last",
                                                          help="Loop only.")]
CompileOpt = Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="Loop only: torch.compile; "
                                                    "the first step is reported apart (compile_s).")]
LoaderOpt = Annotated[Optional[str], typer.Option(help="Loop only: auto, torchvision or device.")]
DataDirOpt = Annotated[Optional[str], typer.Option(
        help="Loop only: the task's data (default: data/ if it holds it, else synthetic data).")]
WorkersOpt = Annotated[Optional[int], typer.Option(help="Loop only: data-loader worker processes.")]
ChunkOpt = Annotated[Optional[int], typer.Option(help="Loop only: steps per contestant per round (default 5).")]


def perf_cmd(
    task: TaskOpt = "cifar10",
    model: ModelOpt = None,
    batch_size: BatchSizeOpt = None,
    steps: StepsOpt = None,
    warmup: WarmupOpt = 3,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    precision: PrecisionOpt = None,
    minimizer: MinimizerOpt = None,
    peer: PeerOpt = False,
    results_dir: ResultsDirOpt = "results",
    what: WhatOpt = "step",
    channels_last: ChannelsLastOpt = None,
    compile: CompileOpt = None,
    loader: LoaderOpt = None,
    data_dir: DataDirOpt = None,
    workers: WorkersOpt = None,
    chunk: ChunkOpt = None,
):
    """Time SGD and every minimizer side by side (interleaved, same initial weights) on one device."""
    from bench.perf.common import append_perf_rows
    from bench.perf.step import format_table, measure_task
    from bench.registry import get_task
    from bench.train.runtime import resolve_device

    with user_errors():
        if what not in ("step", "loop"):
            raise UserError(f"--what must be step or loop, got {what!r}")
        t = get_task(task)
        loop_only = {"--channels-last": channels_last, "--compile": compile, "--loader": loader,
                     "--data-dir": data_dir, "--workers": workers, "--chunk": chunk}
        if what == "loop":
            from bench.perf import loop as perf_loop
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
