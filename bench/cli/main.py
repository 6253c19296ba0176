"""The `bench` app: one Typer command per function of the command modules beside this one (run, reproduce,
report, perf, sharpness, catalog, doctor), each a thin layer over plain functions of the wings below."""
from __future__ import annotations

import sys

import typer

from bench.cli import catalog, doctor, perf, report, reproduce, run, sharpness

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Reproduce the SAM / ASAM papers' tables: SGD vs SAM vs ASAM, side by side.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: synthetic stand-ins in the real formats.")
app.add_typer(data_app, name="data")

app.command("run")(run.run_cmd)
app.command("reproduce")(reproduce.reproduce_cmd)
app.command("report")(report.report_cmd)
app.command("show")(report.show_cmd)
app.command("perf")(perf.perf_cmd)
app.command("sharpness")(sharpness.sharpness_cmd)
app.command("list")(catalog.list_cmd)
app.command("doctor")(doctor.doctor_cmd)
data_app.command("fake")(catalog.data_fake_cmd)
data_app.command("prepare")(catalog.data_prepare_cmd)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
