"""`bench doctor`: is this machine ready for a sweep?"""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from bench.cli.console import say, user_errors


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
    from bench.doctor.main import run_doctor

    with user_errors():
        code = run_doctor(data_dir, results_dir, out, full=full, say=say, device=device, model=model,
                          batch_size=batch_size, steps=steps)
    raise typer.Exit(code)
