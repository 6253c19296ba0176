"""The report's view of a sharpness study on hand-made rows: Kendall's tau per measure against the gap, the
paper's (recalled) tau beside ours in the full preset only, scatter plots."""
from pathlib import Path

import pandas as pd

from bench.report.load import load_results, load_targets
from bench.report.render import render_report
from bench.report.write import write_report
from bench.report.stats import kendall_tau
from bench.tables.layout import load_tables
from bench.tables.plan import planned_settings

ROOT = Path(__file__).resolve().parents[2]
TABLES = ROOT / "tasks" / "tables.toml"
PAPER = ROOT / "results" / "paper" / "paper-cells.csv"


def _study(tmp_path, preset):
    plans = planned_settings(load_tables(TABLES), [preset])
    runs = plans["asam-correlation"][preset][:5]
    res = tmp_path / "results"
    res.mkdir()
    rows = [{**s, "run_id": f"r{i}", "status": "ok", "synthetic": False, "max_test_acc": 90.0 + i,
             "final_test_acc": 89.0 + i} for i, s in enumerate(runs)]
    rows = [{k: v for k, v in r.items() if k not in ("cell_row", "cell_variant")} for r in rows]
    pd.DataFrame(rows).to_csv(res / f"{runs[0]['task']}.csv", index=False)
    gaps = [1.0, 3.0, 2.0, 5.0, 4.0]
    sharp = [{"run_id": f"r{i}", "task": runs[0]["task"], "measure": m, "rho": rho, "value": v, "gap_acc": g}
             for i, g in enumerate(gaps)
             for m, rho, v in (("worst_adaptive_l2", 0.5, g * 2), ("worst_l2", 0.05, [5, 1, 4, 2, 3][i]),
                               ("hessian_top", None, 7.0 - i))]
    pd.DataFrame(sharp).to_csv(res / "sharpness.csv", index=False)
    return res, plans, gaps


def test_full_study_prints_tau_beside_the_papers(tmp_path):
    res, plans, gaps = _study(tmp_path, "full")
    md = render_report(load_results(res), load_targets(PAPER), load_tables(TABLES), plans)
    study = md[md.index("### Sharpness and the generalization gap"):]
    tau = kendall_tau([5, 1, 4, 2, 3], gaps)
    assert "| worst_adaptive_l2 | 0.5 | 5 | 1.000 | 0.636 † |" in study
    assert f"| worst_l2 | 0.05 | 5 | {tau:.3f} | 0.174 † |" in study
    assert f"| hessian_top | – | 5 | {kendall_tau([7, 6, 5, 4, 3], gaps):.3f} | n/a |" in study
    assert "recalled from the paper, never cross-checked" in study
    head = md[md.index("## ASAM's study"):].splitlines()
    assert not any("(paper)" in line for line in head[:12])  # the accuracy table has no paper column


def test_demo_study_has_no_paper_column_and_plots(tmp_path):
    res, plans, _ = _study(tmp_path, "demo")
    md = write_report(res, res / "report.md", PAPER, TABLES, plans)
    assert "τ (paper)" not in md and "| worst_adaptive_l2 | 0.5 | 5 | 1.000 |" in md
    assert len(list(res.glob("report-sharpness-demo-asam-correlation-*.png"))) == 3
