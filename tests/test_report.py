"""bench.report: hand-made result CSVs with known numbers -> every aggregate in the markdown, and the plots.

Rows that a cell must hold are built from the real plans (`bench reproduce`'s settings for the cell)."""
from pathlib import Path

import pandas as pd
import pytest

from bench.cells import match_plans
from bench.errors import UserError
from bench.report import (_normalise, load_results, load_tables, load_targets, plot_curves, render_report,
                          write_report)
from bench.sweep.plan import planned_settings
from bench.results import append_row

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / "tasks" / "tables.toml"
FOOTNOTE = "† recalled from the paper, not yet cross-checked against the PDF."
SYNTH = " — synthetic data (pipeline check; not comparable to the paper)"
T2 = "ASAM Table 2: CIFAR-10, maximum test accuracy (%)"
T4 = "ASAM Table 4: ImageNet, ResNet-50, top-1 / top-5 accuracy (%)"
T6 = "ASAM Table 6: CIFAR-10 with symmetric label noise, ResNet-32, maximum test accuracy (%)"
DEMO = "Demo: label noise on scikit-learn's digits (real data, 8x8), MLP, maximum test accuracy (%)"
PLANS = planned_settings(load_tables(TABLES), ["full", "demo"])

TARGETS = """paper,table,task,model,minimizer,metric,mean,std,status
asam,2,cifar10,resnet20,sgd,max_test_acc,93.18,0.21,recalled
asam,2,cifar10,resnet20,sam,max_test_acc,95.00,,mean-verified
asam,2,cifar10,resnet56,asam,max_test_acc,95.42,0.16,mean-verified
asam,4,imagenet,resnet50,sgd,top1,75.79,0.22,recalled
asam,4,imagenet,resnet50,sgd,top5,92.62,0.04,mean-verified
sam,table-ftimagenet,imagenet,resnet152,sam,top1,81.6,,verified-seed
sam,table-cifar,cifar100,pyramidnet_shakedrop,sam,max_test_acc,89.7,,recalled
"""


def planned(task, model, minimizer, noise=None, plans=PLANS):
    """The settings a plan gives the cell (task, model, minimizer, noise), as `RunConfig.identity()`."""
    for by_preset in plans.values():
        for runs in by_preset.values():
            for s in runs:
                if (s["task"], s["model"], s["minimizer"]) == (task, model, minimizer) and noise in (None, s["noise"]):
                    return dict(s)
    raise AssertionError(f"no plan for {task} {model} {minimizer} noise={noise}")


def run(task, model, minimizer, seed, acc=None, **extra):
    """One results row of a planned cell, as bench.runner writes it (every setting, plus the metrics);
    run_id unique per (task, model, minimizer, seed, noise, synthetic) unless given."""
    rid = f"{task}-{model}-{minimizer}-s{seed}-n{extra.get('noise', 0)}-{'f' if extra.get('synthetic') else 'r'}"
    row = {"run_id": rid, "status": "ok", "synthetic": False, **planned(task, model, minimizer, extra.get("noise")),
           "seed": seed, "device": "cuda", "workers": 8, "note": "", "max_test_acc": acc}
    row.update(extra)
    return row


def bare(task, model, minimizer, seed, acc=None, **extra):
    """A row with only the columns the oldest CSVs have: every other setting is RunConfig's default."""
    return {"run_id": f"{task}-{model}-{minimizer}-s{seed}-bare", "task": task, "model": model,
            "minimizer": minimizer, "seed": seed, "max_test_acc": acc, **extra}


def write(folder, name, rows):
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / name, index=False)


def section(md, heading):
    """The text under `## heading` up to the next `## `."""
    start = md.index(f"## {heading}\n")
    end = md.find("\n## ", start + 3)
    return md[start:] if end < 0 else md[start:end]


def row(text, label):
    """The markdown table row whose first cell is `label`, as a list of cells."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in:\n{text}")


def header(text):
    return [c.strip() for c in next(l for l in text.splitlines() if l.startswith("|")).strip("|").split("|")]


@pytest.fixture
def targets(tmp_path):
    path = tmp_path / "targets.csv"
    path.write_text(TARGETS)
    return load_targets(path)


@pytest.fixture
def tables():
    return load_tables(TABLES)


def report(tmp_path, targets, tables, plans=PLANS):
    return render_report(load_results(tmp_path / "results"), targets, tables, plans)


def test_table2_cells_paper_delta_and_footnote(tmp_path, targets, tables):
    write(tmp_path / "results", "cifar10.csv", [
        run("cifar10", "resnet20", "sgd", 0, 93.0), run("cifar10", "resnet20", "sgd", 1, 94.0),
        run("cifar10", "resnet20", "sgd", 2, 95.0), run("cifar10", "resnet20", "sam", 0, 96.0),
        run("cifar10", "resnet56", "asam", 0, 94.32), run("cifar10", "resnet56", "asam", 1, 94.32),
    ])
    md = report(tmp_path, targets, tables)
    assert md.startswith(f"# sambench report\n\n6 runs read from `{tmp_path / 'results'}` (6 ok).\n\n"
                         "A cell holds only the runs its table plans for preset full and demo (the same "
                         "settings, any seed).\n")
    assert "Other runs" not in md
    t2 = section(md, T2)
    assert header(t2) == ["model", "SGD (ours)", "SGD (paper)", "Δ", "SAM (ours)", "SAM (paper)", "Δ",
                          "ASAM (ours)", "ASAM (paper)", "Δ"]
    # 93, 94, 95 -> mean 94, sample std 1; paper 93.18 ± 0.21 is recalled (†); n = 1 prints `mean (1)`.
    assert row(t2, "resnet20") == ["resnet20", "94.00 ± 1.00 (3)", "93.18 ± 0.21 †", "+0.82",
                                   "96.00 (1)", "95.00", "+1.00", "–", "n/a", "–"]
    # Negative Δ; std 0 with n = 2; a mean-verified figure has no †.
    assert row(t2, "resnet56") == ["resnet56", "–", "n/a", "–", "–", "n/a", "–",
                                   "94.32 ± 0.00 (2)", "95.42 ± 0.16", "-1.10"]
    # Rows follow the paper: every model of the table, runs or not.
    assert row(t2, "densenet121") == ["densenet121"] + ["–", "n/a", "–"] * 3
    assert [row(t2, m)[0] for m in tables["table2"]["models"]] == tables["table2"]["models"]
    assert t2.count(FOOTNOTE) == 1


def test_a_cell_holds_only_planned_runs_the_others_are_listed_by_how_they_differ(tmp_path, targets, tables):
    off = {"epochs": 2, "lr": 0.5}
    write(tmp_path / "results", "cifar10.csv", [
        run("cifar10", "resnet20", "sgd", 0, 93.0),
        {**run("cifar10", "resnet20", "sgd", 1, 61.0), **off},  # same cell, another recipe
        {**run("cifar10", "resnet20", "sgd", 2, 63.0), **off},  # ... two seeds of it: one line
        {**run("cifar10", "resnet20", "sgd", 3, 70.0), "epochs": 2, "precision": "bf16"},
        {**run("cifar10", "resnet20", "sam", 0, 80.0), "rho": 0.1}])
    md = report(tmp_path, targets, tables)
    assert "the 4 other runs are under Other runs." in md
    assert row(section(md, T2), "resnet20")[1:5] == ["93.00 (1)", "93.18 ± 0.21 †", "-0.18", "–"]
    other = section(md, "Other runs")
    assert "### cifar10\n" in other
    assert header(other) == ["model", "minimizer", "settings", "compared with", "max_test_acc"]
    lines = [l for l in other.splitlines() if l.startswith("| resnet20 ")]
    assert lines == ["| resnet20 | sgd | epochs=2, lr=0.5 | table2 (full) | 62.00 ± 1.41 (2) |",
                     "| resnet20 | sgd | epochs=2, precision=bf16 | table2 (full) | 70.00 (1) |",
                     "| resnet20 | sam | rho=0.1 | table2 (full) | 80.00 (1) |"]
    assert "71.75" not in md  # the old mixed mean of 93, 61, 63 and 70


def test_each_given_preset_gets_its_own_cells(tmp_path, targets, tables):
    both = planned_settings(load_tables(TABLES), ["full", "smoke"])
    smoke = {**planned("cifar10", "resnet20", "sgd", plans=planned_settings(load_tables(TABLES), ["smoke"])),
             "run_id": "smoke", "seed": 0, "status": "ok", "max_test_acc": 40.0}
    write(tmp_path / "results", "cifar10.csv", [run("cifar10", "resnet20", "sgd", 0, 93.0), smoke,
                                                {**smoke, "run_id": "smoke-fake", "synthetic": True}])
    md = report(tmp_path, targets, tables, both)
    full, small = section(md, T2 + " (preset full)"), section(md, T2 + " (preset smoke)")
    assert row(full, "resnet20")[1:4] == ["93.00 (1)", "93.18 ± 0.21 †", "-0.18"]
    # A smoke cell is no paper recipe: no paper figure beside it, even on real data.
    assert header(small) == ["model", "SGD (ours)", "SAM (ours)", "ASAM (ours)"]
    assert row(small, "resnet20")[1] == "40.00 (1)"
    assert row(section(md, T2 + " (preset smoke)" + SYNTH), "resnet20")[1] == "40.00 (1)"
    assert "Other runs" not in md and f"## {T2}\n" not in md
    # Without the full preset, the full-recipe run is another run, compared with the smoke plan.
    md = report(tmp_path, targets, tables, planned_settings(load_tables(TABLES), ["demo", "smoke"]))
    assert row(section(md, T2), "resnet20")[1] == "40.00 (1)" and f"## {T2} (preset" not in md
    assert row(section(md, "Other runs"), "resnet20")[2:4] == ["epochs=200, batch_size=128, lr=0.1", "table2 (smoke)"]


def test_runs_of_tasks_no_plan_covers_are_other_runs(tmp_path, targets, tables):
    write(tmp_path / "results", "misc.csv", [
        bare("mnist", "lenet", "sgd", 0, 99.0, lr=0.1), bare("mnist", "lenet", "sgd", 1, 97.0, lr=0.1),
        bare("mnist", "lenet", "sgd", 0, 98.0, lr=0.2, run_id="m2"),
        run("digits-noise", "mlp", "sgd", 0, 96.0, noise=0.4)])
    md = report(tmp_path, targets, tables, planned_settings(load_tables(TABLES), ["full"]))
    other = section(md, "Other runs")
    assert "No table in tables.toml covers task mnist; its runs are told apart by the settings that vary" in other
    assert row(other, "lenet") == ["lenet", "sgd", "lr=0.1", "–", "98.00 ± 1.41 (2)"]
    assert "| lenet | sgd | lr=0.2 | – | 98.00 (1) |" in other
    assert "No table plans task digits-noise for preset full (table demo has preset demo)" in other
    assert row(other, "mlp") == ["mlp", "sgd", "40 %", "–", "–", "96.00 (1)"]
    assert other.index("### digits-noise") < other.index("### mnist")  # tables' tasks first
    assert DEMO not in md


def test_plan_matching_ignores_the_seed_but_no_setting(tmp_path):
    base = planned("cifar10", "resnet20", "sam")
    plans = {"table2": {"full": [{**base, "seed": s} for s in range(2)]}}
    rows = [{**base, "seed": 7, "run_id": "seed"}, {**base, "rho": 0.06, "run_id": "rho"},
            {**base, "epochs": 199, "run_id": "epochs"}, {**base, "lr": 0.2, "run_id": "lr"},
            {**base, "nesterov": True, "run_id": "nesterov"}, {**base, "seed": 1, "device": "cpu", "run_id": "cpu"}]
    write(tmp_path, "cifar10.csv", rows)  # read back as CSV text: "0.05", "200", "False"
    df = match_plans(_normalise(load_results(tmp_path)), plans).set_index("run_id")
    assert df["planned"].to_dict() == {"seed": True, "rho": False, "epochs": False, "lr": False,
                                       "nesterov": False, "cpu": True}
    assert df.loc["rho", "differs"] == "rho=0.06" and df.loc["nesterov", "differs"] == "nesterov=True"
    assert df.loc["seed", "in_plans"] == (("table2", "full"),)
    # Curves: planned runs need no label with one preset; the others are named by their differences.
    assert df.loc["seed", "variant"] == "" and df.loc["epochs", "variant"] == "epochs=199"


def test_old_csvs_lacking_newer_columns_match_by_the_defaults(tmp_path, targets, tables):
    # The oldest rows: no precision, clip_norm, world_size, ... columns. Table 2's SGD recipe is RunConfig's
    # defaults, so such a row is the planned run; a SAM row is not (its plan says rho=0.05). A resnet20 row
    # that old trained He et al.'s option-A network, not today's resnet20 (homura's): never in the cell.
    write(tmp_path / "results", "old.csv", [bare("cifar10", "vgg19_bn", "sgd", 0, 91.0),
                                            bare("cifar10", "vgg19_bn", "sam", 0, 92.0),
                                            bare("cifar10", "resnet20", "sgd", 0, 90.0)])
    md = report(tmp_path, targets, tables)
    assert row(section(md, T2), "vgg19_bn")[1] == "91.00 (1)"
    assert row(section(md, T2), "resnet20")[1] == "–"
    other = section(md, "Other runs")
    assert row(other, "vgg19_bn")[1:4] == ["sam", "rho=0", "table2 (full)"]
    assert row(other, "resnet20")[1:4] == ["sgd", "model_rev=", "table2 (full)"]


def test_no_footnote_without_recalled_figures(tmp_path, targets, tables):
    write(tmp_path / "results", "cifar10.csv", [run("cifar10", "resnet56", "asam", 0, 95.0)])
    targets = targets[targets["status"] != "recalled"]
    md = render_report(load_results(tmp_path / "results"), targets, tables, PLANS)
    assert "†" not in md and FOOTNOTE not in md
    assert row(section(md, T2), "resnet56")[7:] == ["95.00 (1)", "95.42 ± 0.16", "-0.42"]


def test_a_model_no_plan_names_is_another_run(tmp_path, targets, tables):
    write(tmp_path / "results", "cifar10.csv", [{**run("cifar10", "resnet20", "sam", 0, 50.0), "model": "tiny"},
                                                run("cifar10", "resnet20", "sgd", 0, 90.0)])
    md = report(tmp_path, targets, tables)
    assert "| tiny |" not in section(md, T2)
    # Compared with the closest planned run of its task (resnet20: the row kept its model_rev).
    assert row(section(md, "Other runs"), "tiny") == ["tiny", "sam", "model=tiny", "table2 (full): resnet20 sam",
                                                       "50.00 (1)"]


def test_rerun_replaces_the_earlier_row(tmp_path, targets, tables):
    res = tmp_path / "results"
    append_row(res / "cifar10.csv", run("cifar10", "resnet20", "sgd", 0, 50.0))
    append_row(res / "cifar10.csv", run("cifar10", "resnet20", "sgd", 1, 70.0))
    append_row(res / "cifar10.csv", run("cifar10", "resnet20", "sgd", 0, 90.0))  # same run_id: wins
    df = load_results(res)
    assert len(df) == 2 and sorted(df["max_test_acc"]) == [70.0, 90.0]
    assert row(section(report(tmp_path, targets, tables), T2), "resnet20")[1] == "80.00 ± 14.14 (2)"


def test_synthetic_runs_never_mix_with_real_runs(tmp_path, targets, tables):
    write(tmp_path / "results", "cifar10.csv", [
        run("cifar10", "resnet20", "sgd", 0, 90.0), run("cifar10", "resnet20", "sgd", 0, 10.0, synthetic=True)])
    md = report(tmp_path, targets, tables)
    real, fake = section(md, T2), section(md, T2 + SYNTH)
    assert md.index(f"## {T2}\n") < md.index(f"## {T2}{SYNTH}")
    assert row(real, "resnet20")[1:4] == ["90.00 (1)", "93.18 ± 0.21 †", "-3.18"]
    # Synthetic: ours only, only the models run, no paper figure, no Δ, no average with the real 90.
    assert header(fake) == ["model", "SGD (ours)", "SAM (ours)", "ASAM (ours)"]
    assert row(fake, "resnet20") == ["resnet20", "10.00 (1)", "–", "–"]
    assert "densenet121" not in fake and "50.00" not in md  # 50 would be the mixed mean


def test_only_synthetic_runs_print_only_the_synthetic_table(tmp_path, targets, tables):
    write(tmp_path / "results", "cifar10.csv", [run("cifar10", "resnet20", "sgd", 0, "10.0", synthetic="True")])
    md = report(tmp_path, targets, tables)
    assert f"## {T2}{SYNTH}" in md and f"## {T2}\n" not in md
    assert row(section(md, T2 + SYNTH), "resnet20")[1] == "10.00 (1)"


def test_diverged_runs_are_counted_not_averaged(tmp_path, targets, tables):
    write(tmp_path / "results", "cifar10.csv", [
        run("cifar10", "resnet20", "sgd", 0, 80.0), run("cifar10", "resnet20", "sgd", 1, 82.0),
        run("cifar10", "resnet20", "sgd", 2, 10.0, status="diverged", note="non-finite loss at epoch 3"),
        run("cifar10", "resnet20", "sam", 0, 10.0, status="diverged"),
        run("cifar10", "resnet20", "sam", 1, 11.0, status="diverged"),
    ])
    md = report(tmp_path, targets, tables)
    assert "(2 ok, 3 diverged)" in md
    r = row(section(md, T2), "resnet20")
    assert r[1:4] == ["81.00 ± 1.41 (2) +1 diverged", "93.18 ± 0.21 †", "-12.18"]  # 80, 82; not 10
    assert r[4:7] == ["diverged (2)", "95.00", "–"]
    assert "Failed runs" not in md


def test_failed_runs_section(tmp_path, targets, tables):
    write(tmp_path / "results", "cifar10.csv", [
        run("cifar10", "resnet20", "sgd", 0, 80.0),
        run("cifar10", "resnet56", "sam", 3, None, status="failed", note="CUDA out of memory")])
    md = report(tmp_path, targets, tables)
    failed = section(md, "Failed runs")
    assert header(failed) == ["run_id", "task", "model", "minimizer", "seed", "note"]
    rid = "cifar10-resnet56-sam-s3-n0-r"
    assert row(failed, rid) == [rid, "cifar10", "resnet56", "sam", "3", "CUDA out of memory"]
    assert row(section(md, T2), "resnet56")[4] == "–"  # a failed run is no result


def test_demo_table_has_no_paper_columns_and_noise_rows(tmp_path, targets, tables):
    write(tmp_path / "results", "digits-noise.csv", [
        run("digits-noise", "mlp", "sgd", 0, 97.0, noise=0.0),
        run("digits-noise", "mlp", "sgd", 1, 98.0, noise=0.0),
        run("digits-noise", "mlp", "asam", 0, 60.0, noise=0.4)])
    demo = section(report(tmp_path, targets, tables), DEMO)
    assert header(demo) == ["noise", "SGD (ours)", "SAM (ours)", "ASAM (ours)"]
    assert row(demo, "0 %") == ["0 %", "97.50 ± 0.71 (2)", "–", "–"]
    assert row(demo, "40 %") == ["40 %", "–", "–", "60.00 (1)"]
    assert "paper" not in demo and "n/a" not in demo and "60 %" not in demo


def test_noise_table_rows_and_noise_targets(tmp_path, targets, tables):
    write(tmp_path / "results", "cifar10-noise.csv", [
        run("cifar10-noise", "resnet32", "sgd", 0, 85.0, noise=0.4),
        run("cifar10-noise", "resnet32", "sam", 0, 88.0, noise=0.2),
        run("cifar10-noise", "resnet32", "sam", 1, 90.0, noise=0.2)])
    t6 = section(report(tmp_path, targets, tables), T6)
    assert header(t6)[:4] == ["noise", "SGD (ours)", "SGD (paper)", "Δ"]
    assert t6.index("| 20 % |") < t6.index("| 40 % |")
    assert row(t6, "20 %") == ["20 %", "–", "n/a", "–", "89.00 ± 1.41 (2)", "n/a", "–", "–", "n/a", "–"]
    assert row(t6, "40 %")[1:4] == ["85.00 (1)", "n/a", "–"]
    # Figures per noise rate come from an optional `noise` column of the targets CSV.
    path = tmp_path / "t6.csv"
    path.write_text("paper,table,task,model,minimizer,metric,mean,std,status,noise\n"
                    "asam,6,cifar10-noise,resnet32,sgd,max_test_acc,84.00,0.10,mean-verified,0.4\n")
    t6 = section(render_report(load_results(tmp_path / "results"), load_targets(path), tables, PLANS), T6)
    assert row(t6, "40 %")[1:4] == ["85.00 (1)", "84.00 ± 0.10", "+1.00"] and row(t6, "20 %")[2] == "n/a"


def test_table4_has_one_table_per_metric(tmp_path, targets, tables):
    write(tmp_path / "results", "imagenet.csv", [
        run("imagenet", "resnet50", "sgd", 0, 76.0, max_test_top5=92.0),
        run("imagenet", "resnet50", "sgd", 1, 77.0, max_test_top5=93.0)])
    t4 = section(report(tmp_path, targets, tables), T4)
    top1, top5 = t4.split("**top5** (results column `max_test_top5`)")
    assert "**top1** (results column `max_test_acc`)" in top1
    assert row(top1, "resnet50")[1:5] == ["76.50 ± 0.71 (2)", "75.79 ± 0.22 †", "+0.71", "–"]
    assert row(top5, "resnet50")[1:5] == ["92.50 ± 0.71 (2)", "92.62 ± 0.04", "-0.12", "–"]
    assert FOOTNOTE in top1 and FOOTNOTE not in top5


def test_missing_metric_column_means_no_runs_for_it(tmp_path, targets, tables):
    write(tmp_path / "results", "imagenet.csv", [run("imagenet", "resnet50", "sgd", 0, 76.0)])
    top5 = section(report(tmp_path, targets, tables), T4).split("**top5**")[1]
    assert row(top5, "resnet50")[1:4] == ["–", "92.62 ± 0.04", "–"]


def test_sam_paper_section_uses_only_runs_of_a_full_plan(tmp_path, targets, tables):
    # No table plans the SAM paper's recipes: its PyramidNet run is another run, not the paper's cell.
    shake = {**run("cifar100", "resnet20", "sam", 0, 89.0), "model": "pyramidnet_shakedrop"}
    write(tmp_path / "results", "cifar100.csv", [
        shake, run("cifar100", "wrn28_10", "sam", 0, 80.0), run("cifar100", "wrn28_10", "sam", 1, 82.0),
        run("cifar100", "wrn28_10", "sam", 2, 10.0, synthetic=True),  # synthetic: never compared
        {**run("cifar100", "wrn28_10", "sam", 3, 99.0), "epochs": 400}])  # off the plan: not compared
    figure = "sam,table-c100,cifar100,wrn28_10,sam,max_test_acc,83.00,,mean-verified\n"
    (tmp_path / "t.csv").write_text(TARGETS + figure)
    md = render_report(load_results(tmp_path / "results"), load_targets(tmp_path / "t.csv"), tables, PLANS)
    sam = section(md, "SAM paper")
    assert header(sam) == ["table", "task", "model", "minimizer", "metric", "paper", "ours", "Δ"]
    assert row(sam, "table-cifar") == ["table-cifar", "cifar100", "pyramidnet_shakedrop", "sam",
                                       "max_test_acc", "89.7 †", "–", "–"]
    assert row(sam, "table-c100")[5:] == ["83.00", "81.00 ± 1.41 (2)", "-2.00"]
    assert row(sam, "table-ftimagenet") == ["table-ftimagenet", "imagenet", "resnet152", "sam", "top1",
                                            "81.6", "–", "–"]
    assert FOOTNOTE in sam
    # ... and planned runs of another preset are no paper recipe either.
    smoke = planned_settings(load_tables(TABLES), ["smoke"])
    write(tmp_path / "results", "cifar100.csv", [{**planned("cifar100", "resnet20", "sam", plans=smoke),
                                                  "run_id": "s", "seed": 0, "status": "ok", "max_test_acc": 50.0}])
    figure = "sam,table-c100,cifar100,resnet20,sam,max_test_acc,83.00,,mean-verified\n"
    (tmp_path / "t.csv").write_text(TARGETS + figure)
    md = render_report(load_results(tmp_path / "results"), load_targets(tmp_path / "t.csv"), tables, smoke)
    assert row(section(md, "SAM paper"), "table-c100")[6] == "–"


def test_perf_csv_and_subfolders_are_not_read(tmp_path, targets, tables):
    res = tmp_path / "results"
    write(res, "cifar10.csv", [run("cifar10", "resnet20", "sgd", 0, 90.0)])
    (res / "perf.csv").write_text("this,is\nnot,a,results,file\n")
    write(res / "paper", "asam.csv", [run("cifar10", "resnet20", "sgd", 9, 10.0)])
    df = load_results(res)
    assert list(df["run_id"]) == ["cifar10-resnet20-sgd-s0-n0-r"]
    assert df["noise"].tolist() == [0.0] and df["synthetic"].tolist() == [False]
    assert "1 runs read from" in render_report(df, targets, tables, PLANS)


def test_optional_columns_get_defaults(tmp_path):
    write(tmp_path, "old.csv", [{"run_id": "a", "task": "cifar10", "model": "resnet20", "minimizer": "sgd",
                                 "max_test_acc": 90.0}])
    df = load_results(tmp_path)
    assert (df["noise"].iloc[0], df["synthetic"].iloc[0], df["status"].iloc[0]) == (0.0, False, "ok")


def test_malformed_csv_is_a_user_error_naming_the_file(tmp_path):
    write(tmp_path, "cifar10.csv", [run("cifar10", "resnet20", "sgd", 0, 90.0)])
    (tmp_path / "broken.csv").write_text("run_id,task\na,b\nc,d,e,f,g\n")
    with pytest.raises(UserError, match=r"broken\.csv is not a readable results CSV \(.*\); fix or move it away"):
        load_results(tmp_path)
    (tmp_path / "broken.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(UserError, match=r"broken\.csv .*no column run_id, task, model, minimizer") as err:
        load_results(tmp_path)
    assert "\n" not in str(err.value)


def test_real_targets_and_tables_load(tables):
    targets = load_targets(ROOT / "results" / "paper" / "asam.csv")
    assert {"recalled", "mean-verified"} <= set(targets["status"])
    assert list(tables)[:5] == ["table2", "table3", "table4", "table5", "table6"]
    assert tables["table4"]["metrics"] == {"top1": "max_test_acc", "top5": "max_test_top5"}
    md = render_report(pd.DataFrame(), targets, tables, PLANS, source="nowhere")
    assert md.startswith("# sambench report\n\n0 runs read from `nowhere`.")
    assert "## SAM paper" in md and "## ASAM" not in md


def epochs(res, run_id, accs):
    """A run's per-epoch log, as bench.runner writes it (the columns the plot needs, and a few others)."""
    rows = [{"epoch": i + 1, "lr": 0.1, "train_loss": 1.0, "test_acc": a} for i, a in enumerate(accs)]
    path = res / "runs" / run_id / "epochs.csv"
    path.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(path, index=False)


PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_curves_writes_png_or_nothing(tmp_path):
    res = tmp_path / "results"
    rows = [run("cifar10", "resnet20", m, s, 50.0) for m in ("sgd", "sam") for s in (0, 1)]
    write(res, "cifar10.csv", rows)
    df = load_results(res)
    out = tmp_path / "c.png"
    assert plot_curves(res, df, "cifar10", "resnet20", out) is False and not out.exists()
    for r in rows:
        epochs(res, r["run_id"], [10.0 + r["seed"], 30.0, 50.0])
    assert plot_curves(res, df, "cifar10", "resnet20", out) is True
    assert out.read_bytes().startswith(PNG)
    assert plot_curves(res, df, "cifar10", "resnet56", tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists() and not list(tmp_path.glob(".*.tmp"))


def test_write_report_writes_markdown_and_linked_plots(tmp_path, tables):
    res, out = tmp_path / "results", tmp_path / "out" / "report.md"
    (tmp_path / "targets.csv").write_text(TARGETS)
    rows = [run("cifar10", "resnet20", "sgd", 0, 90.0), run("cifar10", "resnet20", "sgd", 0, 40.0, synthetic=True),
            run("digits-noise", "mlp", "sam", 0, 70.0, noise=0.4), run("cifar10", "resnet56", "sgd", 0, 91.0)]
    write(res, "runs.csv", rows)
    for r in rows[:3]:  # resnet56 has no epoch log: no plot for it
        epochs(res, r["run_id"], [20.0, r["max_test_acc"]])
    md = write_report(res, out, tmp_path / "targets.csv", TABLES, PLANS)
    assert out.read_text(encoding="utf-8") == md
    names = ["report-cifar10-resnet20.png", "report-cifar10-resnet20-synthetic.png",
             "report-digits-noise-mlp-noise0.4.png"]
    assert sorted(p.name for p in out.parent.glob("*.png")) == sorted(names)
    curves = section(md, "Curves")
    for name in names:
        assert (out.parent / name).read_bytes().startswith(PNG)
        assert f"]({name})" in curves
    assert curves.index(names[0]) < curves.index(names[1]) < curves.index(names[2])  # tables' order
    assert not list(out.parent.glob(".*"))  # no temp files left behind
    # Chosen plots only, and a note for one without logs.
    md = write_report(res, out, tmp_path / "targets.csv", TABLES, PLANS, plots=[("cifar10", "resnet56")])
    assert "- cifar10 / resnet56: no epoch logs" in section(md, "Curves") and ".png" not in md
    assert "Curves" not in write_report(res, out, tmp_path / "targets.csv", TABLES, PLANS, plots=[])
