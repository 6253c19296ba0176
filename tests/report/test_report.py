"""bench.report: hand-made result CSVs with known numbers -> every aggregate in the markdown, and the plots.

Rows that a cell must hold are built from the real plans (`bench reproduce`'s settings for the cell)."""
import re
from pathlib import Path

import pandas as pd
import pytest

from bench.tables.cells import ROW, VARIANT, match_plans
from bench.errors import UserError
from bench.report.load import normalise, load_results, load_targets
from bench.tables.layout import load_tables
from bench.report.curves import plot_curves
from bench.report.render import render_report
from bench.report.write import write_report
from bench.report.paper import figures
from bench.report.stats import T975, t975
from bench.tables.layout import layout, metrics, minimizer_name, paper_key, references
from bench.tables.plan import planned_settings
from bench.store.files import append_row

ROOT = Path(__file__).resolve().parents[2]
TABLES = ROOT / "tasks" / "tables.toml"
FOOTNOTE = "† recalled from the paper, never cross-checked against its text: unverified, shown as recalled."
CORROBORATED = "‡ recalled from the paper and corroborated: the same figure is another paper's baseline."
ONE_SOURCE = "§ read in one source only (or in copies sharing one upstream)."
SYNTH = " — synthetic data (pipeline check; not comparable to the paper)"
T2 = "ASAM Table 2: CIFAR-10, maximum test accuracy (%)"
S1 = "SAM Table 1: CIFAR-10 and CIFAR-100, test error (%) of the final epoch"
S4 = "SAM Table 4: CIFAR-10 with symmetric label noise, ResNet-32, 200 epochs, test accuracy (%) of the final epoch"
PAPER_CELLS = ROOT / "results" / "paper" / "paper-cells.csv"
T4 = "ASAM Table 4: ImageNet, ResNet-50, top-1 / top-5 accuracy (%)"
T6 = "ASAM Table 6: CIFAR-10 with symmetric label noise, ResNet-32, maximum test accuracy (%)"
DEMO = "Demo: label noise on scikit-learn's digits (real data, 8x8), MLP, maximum test accuracy (%)"
PLANS = planned_settings(load_tables(TABLES), ["full", "demo"])

TARGETS = """paper,table,dataset,model,variant,minimizer,metric,mean,spread,spread_kind,confidence,source
asam,2,CIFAR-10,ResNet-20,,SGD,accuracy,93.18,0.21,std,recalled,recalled
asam,2,CIFAR-10,ResNet-20,,SAM,accuracy,95.00,,,two-sources,read twice
asam,2,CIFAR-10,ResNet-56,,ASAM,accuracy,95.42,0.16,std,two-sources,read twice
asam,4,ImageNet,ResNet-50,,SGD,top1_accuracy,75.79,0.22,std,recalled,recalled
asam,4,ImageNet,ResNet-50,,SGD,top5_accuracy,92.62,0.04,std,two-sources,read twice
"""


CELL_PLANS = {k: v for k, v in PLANS.items() if k != "asam-correlation"}  # its grid holds digits-noise SGD runs too


def planned(task, model, minimizer, noise=None, plans=CELL_PLANS):
    """The settings a plan gives the cell (task, model, minimizer, noise), as `RunConfig.identity()`."""
    for by_preset in plans.values():
        for runs in by_preset.values():
            for s in runs:
                if (s["task"], s["model"], s["minimizer"]) == (task, model, minimizer) and noise in (None, s["noise"]):
                    return {k: v for k, v in s.items() if k not in (ROW, VARIANT)}
    raise AssertionError(f"no plan for {task} {model} {minimizer} noise={noise}")


def run(task, model, minimizer, seed, acc=None, **extra):
    """One results row of a planned cell, as bench.train.runner writes it (every setting, plus the metrics);
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
    labels = [r["label"] for r in tables["asam2"]["rows"]]
    assert [row(t2, m)[0] for m in labels] == labels
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
    # Every results column the task's tables read (ASAM Table 2: max_test_acc; SAM Table 1: final_test_acc).
    assert header(other) == ["model", "minimizer", "settings", "compared with", "max_test_acc", "final_test_acc"]
    lines = [l for l in other.splitlines() if l.startswith("| resnet20 ")]
    assert lines == ["| resnet20 | sgd | epochs=2, lr=0.5 | asam2 (full) | 62.00 ± 1.41 (2) | – |",
                     "| resnet20 | sgd | epochs=2, precision=bf16 | asam2 (full) | 70.00 (1) | – |",
                     "| resnet20 | sam | rho=0.1 | asam2 (full) | 80.00 (1) | – |"]
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
    assert row(section(md, "Other runs"), "resnet20")[2:4] == ["epochs=200, batch_size=128, lr=0.1", "asam2 (smoke)"]


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
    assert ("No table plans task digits-noise for preset full (table demo has preset demo; table frontier has preset "
            "frontier; table asam-correlation has preset demo)") in other
    assert row(other, "mlp") == ["mlp", "sgd", "40 %", "–", "–", "96.00 (1)", "–"]  # the study's final_test_acc too
    assert other.index("### digits-noise") < other.index("### mnist")  # tables' tasks first
    assert DEMO not in md


def test_plan_matching_ignores_the_seed_but_no_setting(tmp_path):
    base = planned("cifar10", "resnet20", "sam")
    plans = {"asam2": {"full": [{**base, "seed": s} for s in range(2)]}}
    rows = [{**base, "seed": 7, "run_id": "seed"}, {**base, "rho": 0.06, "run_id": "rho"},
            {**base, "epochs": 199, "run_id": "epochs"}, {**base, "lr": 0.2, "run_id": "lr"},
            {**base, "nesterov": True, "run_id": "nesterov"}, {**base, "seed": 1, "device": "cpu", "run_id": "cpu"}]
    write(tmp_path, "cifar10.csv", rows)  # read back as CSV text: "0.05", "200", "False"
    df = match_plans(normalise(load_results(tmp_path)), plans).set_index("run_id")
    assert df["planned"].to_dict() == {"seed": True, "rho": False, "epochs": False, "lr": False,
                                       "nesterov": False, "cpu": True}
    assert df.loc["rho", "differs"] == "rho=0.06" and df.loc["nesterov", "differs"] == "nesterov=True"
    assert df.loc["seed", "in_plans"] == (("asam2", "full"),)
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
    assert row(other, "vgg19_bn")[1:4] == ["sam", "rho=0", "asam2 (full)"]
    assert row(other, "resnet20")[1:4] == ["sgd", "model_rev=", "asam2 (full)"]


def test_no_footnote_without_recalled_figures(tmp_path, targets, tables):
    write(tmp_path / "results", "cifar10.csv", [run("cifar10", "resnet56", "asam", 0, 95.0)])
    targets = targets[targets["confidence"] != "recalled"]
    md = render_report(load_results(tmp_path / "results"), targets, tables, PLANS)
    assert "†" not in md and FOOTNOTE not in md
    assert row(section(md, T2), "resnet56")[7:] == ["95.00 (1)", "95.42 ± 0.16", "-0.42"]


def test_a_model_no_plan_names_is_another_run(tmp_path, targets, tables):
    write(tmp_path / "results", "cifar10.csv", [{**run("cifar10", "resnet20", "sam", 0, 50.0), "model": "tiny"},
                                                run("cifar10", "resnet20", "sgd", 0, 90.0)])
    md = report(tmp_path, targets, tables)
    assert "| tiny |" not in section(md, T2)
    # Compared with the closest planned run of its task (resnet20: the row kept its model_rev).
    assert row(section(md, "Other runs"), "tiny") == ["tiny", "sam", "model=tiny", "asam2 (full): resnet20 sam",
                                                       "50.00 (1)", "–"]


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
    assert row(demo, "60 %") == ["60 %", "–", "–", "–"]  # rows follow the table, runs or not
    assert "paper" not in demo and "n/a" not in demo


def test_noise_table_rows_and_their_published_cells(tmp_path, targets, tables):
    write(tmp_path / "results", "cifar10-noise.csv", [
        run("cifar10-noise", "resnet32", "sgd", 0, 85.0, noise=0.4),
        run("cifar10-noise", "resnet32", "sam", 0, 88.0, noise=0.2),
        run("cifar10-noise", "resnet32", "sam", 1, 90.0, noise=0.2)])
    t6 = section(report(tmp_path, targets, tables), T6)
    assert header(t6)[:4] == ["noise", "SGD (ours)", "SGD (paper)", "Δ"]
    assert [l.split("|")[1].strip() for l in t6.splitlines()[4:8]] == ["20 %", "40 %", "60 %", "80 %"]
    assert row(t6, "20 %") == ["20 %", "–", "n/a", "–", "89.00 ± 1.41 (2)", "n/a", "–", "–", "n/a", "–"]
    assert row(t6, "40 %")[1:4] == ["85.00 (1)", "n/a", "–"]
    # A noise rate's published cell: the row's paper_variant ("noise 40%") of ResNet-32 on the noisy dataset.
    path = tmp_path / "t6.csv"
    path.write_text(TARGETS + "asam,6 (label noise),CIFAR-10 (symmetric label noise),ResNet-32,noise 40%,SGD,"
                              "accuracy,84.00,0.10,std,one-source,one transcription\n")
    t6 = section(render_report(load_results(tmp_path / "results"), load_targets(path), tables, PLANS), T6)
    assert row(t6, "40 %")[1:4] == ["85.00 (1)", "84.00 ± 0.10 §", "+1.00"] and row(t6, "20 %")[2] == "n/a"
    assert t6.count(ONE_SOURCE) == 1 and FOOTNOTE not in t6


def test_each_confidence_kind_has_its_own_mark_and_note(tmp_path, tables):
    (tmp_path / "t.csv").write_text(TARGETS.splitlines()[0] + "\n" + "\n".join(
        f"asam,2,CIFAR-10,ResNet-20,,{m},accuracy,{mean},{spread},std,{kind},x" for m, mean, spread, kind in [
            ("SGD", "93.18", "0.21", "recalled"), ("SAM", "96.98", "0.04", "recalled+corroborated"),
            ("ASAM", "98.68", "", "one-source")]) + "\nasam,2,CIFAR-10,ResNet-56,,SGD,accuracy,94.58,0.20,std,"
                                                     "two-sources,x\n")
    write(tmp_path / "results", "cifar10.csv", [run("cifar10", "resnet20", "sgd", 0, 93.0)])
    t2 = section(render_report(load_results(tmp_path / "results"), load_targets(tmp_path / "t.csv"), tables,
                               PLANS), T2)
    assert row(t2, "resnet20")[2::3] == ["93.18 ± 0.21 †", "96.98 ± 0.04 ‡", "98.68 §"]
    assert row(t2, "resnet56")[2] == "94.58 ± 0.20"  # read in two sources: no mark
    assert [t2.count(note) for note in (FOOTNOTE, CORROBORATED, ONE_SOURCE)] == [1, 1, 1]
    assert t2.index(FOOTNOTE) < t2.index(CORROBORATED) < t2.index(ONE_SOURCE)
    bad = tmp_path / "bad.csv"
    bad.write_text(TARGETS.replace("recalled,recalled", "hearsay,recalled", 1))
    with pytest.raises(UserError, match=r"bad\.csv line 2: confidence 'hearsay' is none of recalled, "):
        load_targets(bad)


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


def test_t_quantiles_are_the_textbook_values():
    # t_{0.975, df} as every table prints it (3 decimals), and the normal limit 1.960.
    known = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 20: 2.086, 29: 2.045,
             30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980, 10**6: 1.960}
    assert {df: round(t975(df), 3) for df in known} == known
    assert len(T975) == 30 and list(T975) == sorted(T975, reverse=True)
    with pytest.raises(ValueError):
        t975(0)


def test_every_cell_of_the_paper_tables_finds_its_published_figure(tables):
    # tables.toml maps our names to the CSV's: every cell of every full table (and every reference) has
    # its figure. Left over: what no table plans (SAM Table 3's fine-tuning, Table 9's rho = 0.05 repeat,
    # whose vanilla PyramidNet CIFAR-10 row copies the ShakeDrop row, and ASAM Table 6's 0 % row).
    figs = figures(load_targets(PAPER_CELLS))
    found = set()
    for name, t in tables.items():
        if "sharpness" in t:  # a study: its published figures are the measures' correlations with the gap
            study = {(k[0], k[1], k[2], k[5]) for k in figs if k[6] == "kendall_tau"}
            assert {(t["paper"], t["table"], "CIFAR-10", m) for m in ("worst_l2", "worst_adaptive_l2", "worst_linf",
                                                                      "worst_adaptive_linf")} <= study
            found |= {k for k in figs if k[:2] == (t["paper"], t["table"])}
            continue
        lay = layout(name, t, "full") if any(k[0] == t["paper"] for k in figs) else None  # variants: none
        for task, row, var in ((k, r, v) for k in lay.tasks for r in lay.rows for v in lay.variants) if lay else ():
            keys = [paper_key(t, task, row, var, minimizer_name(t, m, paper=True), metric)
                    for m in lay.minimizers for metric in metrics(t)]
            keys += [paper_key(t, task, {**row, **{k: v for k, v in ref.items() if k == "paper_model"}}, var,
                               ref["minimizer"], metrics(t)[0]) for ref in references(t)]
            found |= {k for k in keys if k in figs}
            assert all(k in figs or k[5].endswith("[literature]") for k in keys), [k for k in keys if k not in figs]
    left = {(k[0], k[1], k[4]) for k in figs if k not in found}
    assert {(paper, table) for paper, table, _ in left} == {("sam", "3"), ("sam", "9 (appendix C.3)"),
                                                            ("asam", "6 (label noise)")}
    assert {v for paper, table, v in left if paper == "asam"} == {"noise 0%"}


def sam_run(table, cell, task, minimizer, seed, acc, epochs=None, **extra):
    """A results row of one planned cell (row and variant labels) of a SAM table, its final accuracy `acc`."""
    for s in PLANS[table]["full"]:
        if ((s[ROW], s[VARIANT]), s["task"], s["minimizer"], s["seed"]) == (cell, task, minimizer, seed) and \
                epochs in (None, s["epochs"]):
            settings = {k: v for k, v in s.items() if k not in (ROW, VARIANT)}
            return {"run_id": f"{table}-{task}-{minimizer}-{seed}-{s['epochs']}", "status": "ok", "synthetic": False,
                    **settings, "final_test_acc": acc, **extra}
    raise AssertionError(f"no planned run {table} {cell} {task} {minimizer} seed {seed} epochs {epochs}")


def test_sam_table_prints_error_with_ci95_and_the_better_sgd(tmp_path, tables):
    wrn = ("WRN-28-10 (200 epochs)", "Basic")
    rows = [sam_run("sam1", wrn, "cifar10", "sam", s, a) for s, a in enumerate([97.0, 97.2, 97.4, 97.1, 97.3])]
    for epochs, accs in ((200, [96.0, 96.2, 96.4, 96.1, 96.3]), (400, [96.5, 96.5, 96.6, 96.4, 96.5])):
        rows += [sam_run("sam1", wrn, "cifar10", "sgd", s, a, epochs=epochs) for s, a in enumerate(accs)]
    # CIFAR-100: the standard epochs win; two seeds, so t(0.975, 1) = 12.706.
    rows += [sam_run("sam1", wrn, "cifar100", "sgd", s, a, epochs=200) for s, a in enumerate([80.0, 82.0])]
    rows += [sam_run("sam1", wrn, "cifar100", "sgd", s, a, epochs=400) for s, a in enumerate([79.0, 80.0])]
    rows += [{**sam_run("sam1", wrn, "cifar10", "sam", 0, 50.0), "run_id": "fake", "synthetic": True},  # never here
             {**sam_run("sam1", wrn, "cifar10", "sam", 0, 99.0), "run_id": "off", "lr": 0.2}]  # another recipe
    write(tmp_path / "results", "cifar.csv", rows)
    md = render_report(load_results(tmp_path / "results"), load_targets(PAPER_CELLS), tables, PLANS)
    s1 = section(md, S1)
    assert header(s1)[:5] == ["model", "augmentation", "CIFAR-10 SGD (ours)", "CIFAR-10 SGD (paper)", "Δ"]
    assert header(s1)[8:11] == ["CIFAR-100 SGD (ours)", "CIFAR-100 SGD (paper)", "Δ"]
    line = [c for c in s1.splitlines() if c.startswith("| WRN-28-10 (200 epochs) | Basic |")][0]
    cells = [c.strip() for c in line.strip("|").split("|")]
    # SAM: errors 3.0 2.8 2.6 2.9 2.7 -> mean 2.80, s = 0.1581, 2.7764 * 0.1581 / sqrt(5) = 0.196.
    assert cells[5:8] == ["2.80 ± 0.20 (5)", "2.7 ± 0.1", "+0.10"]
    # SGD: 200 epochs err 3.80, 400 epochs err 3.50 (s = 0.0707 -> 0.088): the better, with its epochs.
    assert cells[2:5] == ["3.50 ± 0.09 (5, 400 ep)", "3.5 ± 0.1", "+0.00"]
    # CIFAR-100: 200 epochs err 20, 18 -> 19.00 ± 12.706 * 1.414 / 1.414; 400 epochs (20.5) loses.
    assert cells[8:11] == ["19.00 ± 12.71 (2, 200 ep)", "18.8 ± 0.2", "+0.20"]
    assert "SGD ran each cell at the table's epochs and at twice as many" in s1
    assert "mean ± t(0.975, n−1) · s / √n over the n seeds" in s1 and "error (%) = 100 − `final_test_acc`" in s1
    # Published spreads print as given, rows without runs too; off-plan and synthetic runs are elsewhere.
    assert "| WRN-28-10 (200 epochs) | AutoAugment | – | 2.3 ± 0.1 | – | – | 2.1 ± <0.1 | – |" in s1
    assert "50.00" not in s1 and "1.00 (1)" not in s1 and "| wrn28_10 | sam | lr=0.2 | sam1 (full) |" in md


def test_sam_label_noise_table_prints_its_other_methods_as_published(tmp_path, tables):
    rows = [sam_run("sam4", ("80 %", ""), "cifar10-noise", m, s, a)
            for m, accs in (("sgd", [30.0, 31.0, 32.0]), ("sam", [70.0, 71.0, 72.0])) for s, a in enumerate(accs)]
    write(tmp_path / "results", "noise.csv", rows)
    md = render_report(load_results(tmp_path / "results"), load_targets(PAPER_CELLS), tables, PLANS)
    s4 = section(md, S4)
    # Accuracy, not error; CI over 3 seeds: 4.3027 * 1 / sqrt(3) = 2.484.
    assert row(s4, "80 %") == ["80 %", "31.00 ± 2.48 (3)", "26.2", "+4.80", "71.00 ± 2.48 (3)", "77.9", "-6.90"]
    assert row(s4, "20 %") == ["20 %", "–", "84.8", "–", "–", "95.1", "–"]
    refs = s4.split("**Other methods, as the paper printed them** (published figures, not runs of ours)")[1]
    assert header(refs) == ["method (published, not run here)", "20 %", "40 %", "60 %", "80 %"]
    assert row(refs, "Mixup") == ["Mixup", "93.0", "90.0", "83.8", "70.2"]
    assert row(refs, "Bootstrap + SAM") == ["Bootstrap + SAM", "95.4", "94.2", "91.8", "79.9"]
    assert row(refs, "MentorMix (2019) [literature]")[1:] == ["95.6", "94.2", "91.3", "81.0"]
    assert row(refs, "Chen et al. (2019) [literature]")[1:] == ["89.7", "n/a", "n/a", "52.3"]
    assert "SGD ran each cell" not in s4  # Table 4 gives SGD no doubled epochs
    # A smoke plan's cells have nothing to be compared with: no paper columns, no references.
    smoke = planned_settings(load_tables(TABLES), ["smoke"])
    run_s = {**{k: v for k, v in smoke["sam4"]["smoke"][0].items() if k not in (ROW, VARIANT)},
             "run_id": "s", "status": "ok", "synthetic": True, "final_test_acc": 40.0}
    write(tmp_path / "results", "noise.csv", [run_s])
    md = render_report(load_results(tmp_path / "results"), load_targets(PAPER_CELLS), tables, smoke)
    small = section(md, S4 + SYNTH)
    assert header(small) == ["noise", "SGD (ours)", "SAM (ours)"] and "Other methods" not in small
    assert "ResNet-20 stands in for ResNet-32 (CPU-sized)." in small


def test_perf_csv_and_subfolders_are_not_read(tmp_path, targets, tables):
    res = tmp_path / "results"
    write(res, "cifar10.csv", [run("cifar10", "resnet20", "sgd", 0, 90.0)])
    (res / "perf.csv").write_text("this,is\nnot,a,results,file\n")
    write(res / "paper", "paper-cells.csv", [run("cifar10", "resnet20", "sgd", 9, 10.0)])
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
    targets = load_targets(PAPER_CELLS)
    assert set(targets["confidence"]) == {"two-sources", "one-source", "recalled+corroborated", "recalled"}
    assert {"<0.1", "<0.01"} <= set(targets["spread"])  # kept as printed
    assert list(tables)[:5] == ["asam2", "asam3", "asam4", "asam5", "asam6"]
    assert [n for n, t in tables.items() if t["paper"] == "sam"] == ["sam1", "sam2", "sam4", "sam5"]
    md = render_report(pd.DataFrame(), targets, tables, PLANS, source="nowhere")
    assert md.startswith("# sambench report\n\n0 runs read from `nowhere`.")
    assert "## ASAM" not in md and "## SAM" not in md  # a table shows once it has runs


def epochs(res, run_id, accs):
    """A run's per-epoch log, as bench.train.runner writes it (the columns the plot needs, and a few others)."""
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
    names = ["report-cifar10-resnet20.png", "report-digits-noise-mlp-noise0.4.png"]
    # The synthetic run is a pipeline check: never drawn; its table closes the report, after the plots.
    assert sorted(p.name for p in out.parent.glob("*.png")) == sorted(names)
    curves = section(md, "Curves")
    for name in names:
        assert (out.parent / name).read_bytes().startswith(PNG)
        assert f"]({name})" in curves
    assert curves.index(names[0]) < curves.index(names[1])  # tables' order
    assert "synthetic" not in curves and md.index("## Curves") < md.index("## Pipeline checks on synthetic data")
    assert not list(out.parent.glob(".*"))  # no temp files left behind
    # Chosen plots only, and a note for one without logs.
    md = write_report(res, out, tmp_path / "targets.csv", TABLES, PLANS, plots=[("cifar10", "resnet56")])
    assert "- cifar10 / resnet56: no epoch logs" in section(md, "Curves") and ".png" not in md
    assert "Curves" not in write_report(res, out, tmp_path / "targets.csv", TABLES, PLANS, plots=[])


@pytest.mark.parametrize("text,message", [
    ('[t]\ntitle = "t"\ntask = "cifar10"\nrows = "model"\nmodels = ["resnet20"]\nminimizers = ["sgd"]\n'
     'metrics = { a = "max_test_acc" }\n', 'table [t] uses the old format (rows = \'model\'); write rows as a list'),
    ('[t]\ntitle = "t"\ntask = "cifar10"\nrows = [{ label = "a" }]\nminimizers = ["sgd"]\nmetrics = { a = "b" }\n'
     'colour = "red"\n', "table [t] has unknown key(s) colour"),
    ('[t]\ntitle = "t"\ntask = "cifar10"\nrows = [{ label = "a" }, { label = "a" }]\nminimizers = ["sgd"]\n'
     'metrics = { a = "b" }\n', "table [t] repeats a label in rows"),
    ('[t]\ntitle = "t"\ntask = "cifar10"\nrows = [{ label = "a" }]\nminimizers = ["sgd"]\nmetrics = { a = "b" }\n'
     'spread = "sem"\n', "table [t] has spread other than std or ci95"),
    ('[t]\ntitle = "t"\nrows = [{ label = "a" }]\nminimizers = ["sgd"]\nmetrics = { a = "b" }\n', "table [t] lacks task"),
])
def test_tables_file_mistakes_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "t.toml").write_text(text)
    with pytest.raises(UserError, match=re.escape(message)) as err:
        load_tables(tmp_path / "t.toml")
    assert "\n" not in str(err.value)
