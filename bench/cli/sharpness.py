"""`bench sharpness`: a finished run's sharpness measures, one row each in sharpness.csv."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bench.cli.console import say, user_errors


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
    from bench.sharpness.run import CSV_NAME, make_request, measure_run

    with user_errors():
        request = make_request(measure, rho, device, examples=examples, m=m, iters=iters, eta=eta, seed=seed)
        rows = measure_run(results_dir, run_id, request, log=say)
        first = rows[0]
        say(f"train acc {first['train_acc']:.2f}  test acc {first['test_acc']:.2f}  gap {first['gap_acc']:.2f} "
            f"points (first {first['sh_examples']} / {first['sh_test_examples']} examples)")
        say(f"wrote {len(rows)} rows to {Path(results_dir) / CSV_NAME}")
