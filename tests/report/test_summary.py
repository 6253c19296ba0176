"""bench.report.summary: the report's opening, what reproduced, on hand-made result rows matched to the real plans
and the real published cells (results/paper/paper-cells.csv); and the report's order (the summary, then real data,
then the pipeline checks)."""
import math
from pathlib import Path

import pandas as pd
import pytest

from bench.report.load import load_results, load_targets
from bench.report.render import render_report
from bench.report.stats import t975
from bench.report.summary import HEADING, judge, paper_sd
from bench.report.write import write_report
from bench.tables.cells import COLUMN, ROW, VARIANT
from bench.tables.layout import load_tables
from bench.tables.plan import planned_settings

ROOT = Path(__file__).resolve().parents[2]
TABLES = ROOT / "tasks" / "tables.toml"
PAPER_CELLS = ROOT / "results" / "paper" / "paper-cells.csv"
PLANS = planned_settings(load_tables(TABLES), ["full", "demo", "smoke"])
T2 = "ASAM Table 2: CIFAR-10, maximum test accuracy (%)"
CHECKS = "## Pipeline checks on synthetic data: their numbers say nothing about the papers"
NO_RUN = "No full-recipe run on real data yet: `bench reproduce <table>` runs a table's cells on the real data"
# Every paper table's published cells that its full plan can run (SAM Table 4's other methods are not ours).
ZERO = ["- ASAM Table 2: 0 of 24 cells run", "- ASAM Table 3: 0 of 24 cells run", "- ASAM Table 4: 0 of 6 cells run",
        "- ASAM Table 5: 0 of 6 cells run", "- ASAM Table 6: 0 of 12 cells run", "- SAM Table 1: 0 of 60 cells run",
        "- SAM Table 2: 0 of 36 cells run", "- SAM Table 4: 0 of 8 cells run",
        "- SAM Table 5 (appendix B.1): 0 of 16 cells run", "- ASAM's study: 0 of 4 cells run"]


def planned(table, preset, **want):
    """The settings the plan of (table, preset) gives the first planned run matching `want` (task, model,
    minimizer, seed, epochs, cell_row, ...), as a results row carries them."""
    for s in PLANS[table][preset]:
        if all(s.get(k) == v for k, v in want.items()):
            return {k: v for k, v in s.items() if k not in (ROW, VARIANT, COLUMN)}
    raise AssertionError(f"no planned run of {table} ({preset}) with {want}")


def result(settings, run_id, value, column="max_test_acc", **extra):
    return {"run_id": run_id, "status": "ok", "synthetic": False, **settings, column: value, **extra}


def render(tmp_path, rows, plans=PLANS):
    res = tmp_path / "results"
    res.mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(res / "runs.csv", index=False)
    return render_report(load_results(res), load_targets(PAPER_CELLS), load_tables(TABLES), plans)


def summary(md):
    start = md.index(HEADING + "\n")
    end = md.find("\n## ", start + 3)
    return md[start:] if end < 0 else md[start:end]


def counts(md):
    return [line for line in summary(md).splitlines() if line.startswith("- ")]


def line(md, cell):
    """The summary's detail line of ASAM Table 2's `cell` (row / minimizer) as cells, or None."""
    for text in summary(md).splitlines():
        cells = [c.strip() for c in text.strip().strip("|").split("|")]
        if text.startswith("| ASAM Table 2 |") and cells[1] == cell:
            return cells
    return None


def asam2(model, minimizer, seed=0):
    return planned("asam2", "full", model=model, minimizer=minimizer, seed=seed)


def test_agreeing_disagreeing_and_unjudged_cells(tmp_path):
    md = render(tmp_path, [
        # 93.0, 93.4: mean 93.20, s 0.283; paper 93.18 ± 0.21 -> allowed 2·√(0.21² + 0.283²) = 0.70: agrees
        result(asam2("resnet20", "sgd", 0), "a0", 93.0), result(asam2("resnet20", "sgd", 1), "a1", 93.4),
        # one seed (s 0): allowed 2 · 0.15 = 0.30, Δ -3.56: disagrees
        result(asam2("resnet20", "sam"), "b", 90.0),
        # the paper printed no spread and one seed has none: not judged
        result(asam2("pyramidnet272_shakedrop", "asam"), "c", 98.0),
        # no published spread, but ours over two seeds (s 0.707): allowed 1.41, Δ -0.10: agrees
        result(asam2("vgg19_bn", "sam", 0), "d0", 94.0), result(asam2("vgg19_bn", "sam", 1), "d1", 95.0)])
    assert counts(md)[0] == "- ASAM Table 2: 4 of 24 cells run, 2 agree, 1 not judged"
    assert counts(md)[1:] == ZERO[1:]
    assert line(md, "resnet20 / SGD") == ["ASAM Table 2", "resnet20 / SGD", "accuracy", "93.20 ± 0.28 (2)",
                                          "93.18 ± 0.21 †", "+0.02", "0.70", "yes"]
    assert line(md, "resnet20 / SAM") == ["ASAM Table 2", "resnet20 / SAM", "accuracy", "90.00 (1)",
                                          "93.56 ± 0.15 †", "-3.56", "0.30", "no"]
    assert line(md, "pyramidnet272_shakedrop / ASAM")[3:] == ["98.00 (1)", "98.68 §", "-0.68", "–", "not judged"]
    assert line(md, "vgg19_bn / SAM")[3:] == ["94.50 ± 0.71 (2)", "94.60 †", "-0.10", "1.41", "yes"]
    text = summary(md)
    assert "Agreement: |ours − paper| ≤ 2·√(s_paper² + s_ours²)" in text and NO_RUN not in text
    assert "† recalled from the paper" in text and "§ read in one source only" in text
    # The count lines come first, the detail table after them.
    assert text.index("- ASAM Table 2:") < text.index("| table | cell |")


NEVER = {  # a run of ASAM Table 2's resnet20 ASAM cell that must not count, at the paper's very figure (93.82)
    "synthetic": lambda: result(asam2("resnet20", "asam"), "x", 93.82, synthetic=True),
    "smoke preset, real data": lambda: result(planned("asam2", "smoke", minimizer="asam"), "x", 93.82),
    "off-recipe (20 epochs)": lambda: result({**asam2("resnet20", "asam"), "epochs": 20}, "x", 93.82),
    "diverged": lambda: result(asam2("resnet20", "asam"), "x", 93.82, status="diverged"),
    "demo preset": lambda: result(planned("demo", "demo", minimizer="asam", noise=0.0), "x", 93.82),
}


@pytest.mark.parametrize("case", [*NEVER, "control: full recipe, real data"])
def test_only_full_recipe_runs_on_real_data_count(tmp_path, case):
    row = NEVER[case]() if case in NEVER else result(asam2("resnet20", "asam"), "x", 93.82)
    md = render(tmp_path, [row])
    if case in NEVER:
        assert counts(md) == ZERO and line(md, "resnet20 / ASAM") is None and NO_RUN in summary(md)
    else:  # the same row as the cases, on the full recipe and real data: counted
        assert counts(md)[0] == "- ASAM Table 2: 1 of 24 cells run, 1 agree"
        assert line(md, "resnet20 / ASAM")[3:] == ["93.82 (1)", "93.82 ± 0.17 †", "+0.00", "0.34", "yes"]


def test_a_full_run_beside_runs_that_never_count_keeps_its_own_value(tmp_path):
    rows = [result(asam2("resnet20", "asam"), "real", 90.0)] + [
        {**make(), "run_id": f"n{i}"} for i, make in enumerate(NEVER.values())]
    md = render(tmp_path, rows)
    assert counts(md)[0] == "- ASAM Table 2: 1 of 24 cells run, 0 agree"
    # The diverged run is said, never averaged in; the others are not there at all.
    assert line(md, "resnet20 / ASAM")[3:] == ["90.00 (1) +1 diverged", "93.82 ± 0.17 †", "-3.82", "0.34", "no"]


def sam1(minimizer, seed, acc, epochs=200):
    s = planned("sam1", "full", task="cifar10", minimizer=minimizer, seed=seed, epochs=epochs,
                **{ROW: "WRN-28-10 (200 epochs)", VARIANT: "Basic"})
    return result(s, f"sam1-{minimizer}-{seed}-{epochs}", acc, column="final_test_acc")


def test_error_tables_compare_errors_the_papers_ci_turned_into_a_standard_deviation(tmp_path):
    rows = [sam1("sam", s, a) for s, a in enumerate([97.0, 97.2, 97.4, 97.1, 97.3])]
    # SGD: the better epochs by mean, as its section shows (200: error 3.68; 400: error 4.00)
    rows += [sam1("sgd", 0, 96.32), sam1("sgd", 0, 96.0, epochs=400)]
    md = render(tmp_path, rows)
    s_paper = 0.1 * math.sqrt(5) / t975(4)  # the paper's "± 0.1" is a 95 % CI over 5 runs
    text = summary(md)
    cells = {c[1]: c for c in ([x.strip() for x in t.strip("|").split("|")] for t in text.splitlines()
                               if t.startswith("| SAM Table 1 |"))}
    # SAM: errors 3.0 2.8 2.6 2.9 2.7, mean 2.80, s 0.158; paper 2.7: Δ 0.10 ≤ 2·√(s_paper² + s²) = 0.35
    allowed = 2 * math.sqrt(s_paper ** 2 + 0.158114 ** 2)
    assert cells["CIFAR-10 / WRN-28-10 (200 epochs) / Basic / SAM"][2:] == [
        "error", "2.80 ± 0.16 (5)", "2.7 ± 0.1", "+0.10", f"{allowed:.2f}", "yes"]
    # SGD, one seed: Δ 0.18 against 2·s_paper = 0.16 (the CI taken as it stands would allow 0.20)
    assert cells["CIFAR-10 / WRN-28-10 (200 epochs) / Basic / SGD"][2:] == [
        "error", "3.68 (1, 200 ep)", "3.5 ± 0.1", "+0.18", f"{2 * s_paper:.2f}", "no"]
    assert "- SAM Table 1: 2 of 60 cells run, 1 agree" in counts(md)


def test_paper_spreads_and_the_rule():
    assert paper_sd({"spread": "0.21", "spread_kind": "std"}) == 0.21
    assert paper_sd({"spread": "", "spread_kind": "std"}) is None
    assert paper_sd({"spread": "<0.1", "spread_kind": "std"}) == 0.1
    assert paper_sd({"spread": "<0.0", "spread_kind": "std"}) == pytest.approx(0.05)
    assert paper_sd({"spread": "0.1", "spread_kind": "ci95"}) == pytest.approx(0.1 * math.sqrt(5) / 2.7764)
    assert judge(93.0, None, 95.0, None) == (None, "not judged")
    assert judge(93.0, None, 93.3, 0.15) == (pytest.approx(0.3), "yes")  # on the boundary: agrees
    assert judge(93.0, None, 93.31, 0.15)[1] == "no"
    assert judge(93.0, 0.3, 93.0, None) == (pytest.approx(0.6), "yes")


def test_without_runs_the_summary_still_opens_the_report_with_zero_counts(tmp_path):
    md = render_report(pd.DataFrame(), load_targets(PAPER_CELLS), load_tables(TABLES), PLANS, source="nowhere")
    assert counts(md) == ZERO and NO_RUN in summary(md) and "| table |" not in md
    assert [h for h in md.splitlines() if h.startswith("## ")] == [HEADING]
    # Without the full preset's plan nothing can count: the summary says which presets it was given.
    md = render(tmp_path, [result(asam2("resnet20", "sgd"), "a", 93.0)],
                planned_settings(load_tables(TABLES), ["demo", "smoke"]))
    assert counts(md) == ZERO
    assert "plans of preset demo and smoke, not full: `bench report --preset full` (the default)" in summary(md)


def test_a_sharpness_studys_published_taus_are_run_but_not_judged(tmp_path):
    plans = planned_settings(load_tables(TABLES), ["full"])
    runs = [{k: v for k, v in s.items() if k not in (ROW, VARIANT, COLUMN)}
            for s in plans["asam-correlation"]["full"][:4]]
    res = tmp_path / "results"
    res.mkdir()
    pd.DataFrame([result(s, f"r{i}", 90.0 + i) for i, s in enumerate(runs)]).to_csv(res / "c.csv", index=False)
    pd.DataFrame([{"run_id": f"r{i}", "task": "cifar10", "measure": m, "rho": 0.5, "value": v, "gap_acc": g}
                  for i, g in enumerate([1.0, 3.0, 2.0, 4.0])
                  for m, v in (("worst_adaptive_l2", 2 * g), ("hessian_top", -g))]).to_csv(res / "sharpness.csv",
                                                                                          index=False)
    md = render_report(load_results(res), load_targets(PAPER_CELLS), load_tables(TABLES), plans)
    assert "- ASAM's study: 1 of 4 cells run, 0 agree, 1 not judged" in counts(md)
    assert "| ASAM's study | CIFAR-10 / worst_adaptive_l2 | kendall_tau | 1.000 (4 runs, rho 0.5) | 0.636 † | " \
           "+0.36 | – | not judged |" in summary(md)
    assert "hessian_top" not in summary(md)  # no published tau: not a cell of the paper's


def test_the_report_opens_with_the_summary_and_closes_with_the_pipeline_checks(tmp_path):
    fake_other = {**result(asam2("resnet20", "sgd"), "fake-other", 11.0, synthetic=True), "epochs": 3}
    rows = [result(asam2("resnet20", "sgd"), "real", 93.0),
            result(asam2("resnet20", "sgd", 1), "fake", 12.0, synthetic=True),  # the full recipe, synthetic data
            result(planned("asam2", "smoke", minimizer="sam"), "smoke", 13.0, synthetic=True),
            result(planned("asam2", "smoke", minimizer="sgd"), "smoke-real", 14.0),  # a smoke run on real data
            result(planned("demo", "demo", minimizer="sam", noise=0.4), "demo", 70.0),
            {**result(asam2("resnet20", "sgd"), "real-other", 80.0), "epochs": 3}, fake_other]
    md = render(tmp_path, rows)
    assert md.startswith("# sambench report\n\n7 runs read from")
    checks = md[md.index(CHECKS):]
    assert [h for h in md.splitlines() if h.startswith("## ")] == [
        HEADING, f"## {T2} (preset full)", "## " + load_tables(TABLES)["demo"]["title"], "## Other runs", CHECKS]
    synth = " — synthetic data (pipeline check; not comparable to the paper)"
    assert [h for h in checks.splitlines() if h.startswith("### ")] == [
        f"### {T2} (preset full){synth}", f"### {T2} (preset smoke)", f"### {T2} (preset smoke){synth}",
        "### Other runs on synthetic data"]
    # Ours alone down there: no paper column, no equal-compute view; the real-data table keeps the paper's.
    assert "(paper)" not in checks and "Equal compute" not in checks and "12.00 (1)" in checks
    assert "(paper)" in md[:md.index(CHECKS)] and "12.00" not in md[:md.index(CHECKS)]
    assert "| resnet20 | sgd | epochs=3 |" in checks and "| resnet20 | sgd | epochs=3 |" in md[:md.index(CHECKS)]
    assert counts(md)[0] == "- ASAM Table 2: 1 of 24 cells run, 1 agree"  # 93.0 against 93.18 ± 0.21: within 0.42


def logged(res, rows):
    """Result rows and an epoch log for each, as bench.train.runner writes them."""
    res.mkdir()
    pd.DataFrame(rows).to_csv(res / "runs.csv", index=False)
    for r in rows:
        path = res / "runs" / r["run_id"] / "epochs.csv"
        path.parent.mkdir(parents=True)
        pd.DataFrame([{"epoch": e, "lr": 0.1, "train_loss": 1.0, "test_acc": 10.0 * e} for e in (1, 2)]).to_csv(
            path, index=False)
    return res


def test_written_report_puts_the_plots_before_the_pipeline_checks_and_draws_no_synthetic_run(tmp_path):
    smoke = result(planned("asam2", "smoke", minimizer="sam"), "smoke", 13.0, synthetic=True)
    res = logged(tmp_path / "both", [result(asam2("resnet20", "sgd"), "real", 93.0), smoke])
    md = write_report(res, res / "report.md", PAPER_CELLS, TABLES, PLANS)
    assert md.index(HEADING) < md.index(f"## {T2}") < md.index("## Curves") < md.index(CHECKS)
    assert [p.name for p in res.glob("*.png")] == ["report-cifar10-resnet20.png"]
    # Asked for by name, a pair with synthetic runs only is said to be a pipeline check, not drawn.
    res = logged(tmp_path / "fake", [smoke])
    md = write_report(res, res / "report.md", PAPER_CELLS, TABLES, PLANS, plots=[("cifar10", "resnet20")])
    assert "- cifar10 / resnet20: synthetic data only (a pipeline check: not drawn)" in md
    assert not list(res.glob("*.png")) and md.index("## Curves") < md.index(CHECKS)


def test_the_summary_counts_full_recipe_runs_whatever_presets_the_sections_show(tmp_path):
    """`bench report --preset demo --preset smoke` (make smoke's) still says what reproduced: the summary matches
    the rows against the full preset's plans, which `bench report` hands it apart."""
    from bench.report.render import render_parts
    res = tmp_path / "results"
    res.mkdir()
    rows = [result(asam2("resnet20", "sgd", 0), "a0", 93.0)]
    pd.DataFrame(rows).to_csv(res / "runs.csv", index=False)
    shown = planned_settings(load_tables(TABLES), ["demo", "smoke"])
    args = (load_results(res), load_targets(PAPER_CELLS), load_tables(TABLES), shown)
    assert counts(render_parts(*args)[0])[0] == ZERO[0]  # without the full plans: nothing to count
    full = planned_settings(load_tables(TABLES), ["full"])
    main, _ = render_parts(*args, full_plans=full)
    assert counts(main)[0] == "- ASAM Table 2: 1 of 24 cells run, 1 agree"
    assert "## ASAM Table 2" not in main  # the sections still show the presets asked for
