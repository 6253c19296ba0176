"""bench.report: hand-made result CSVs with known numbers -> every aggregate in the markdown, and the plots."""
from pathlib import Path

import pandas as pd
import pytest

from bench.errors import UserError
from bench.report import load_results, load_tables, load_targets, plot_curves, render_report, write_report
from bench.results import append_row

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / "tasks" / "tables.toml"
FOOTNOTE = "† recalled from the paper, not yet cross-checked against the PDF."
SYNTH = " — synthetic data (pipeline check; not comparable to the paper)"
T2 = "ASAM Table 2: CIFAR-10, maximum test accuracy (%)"
T4 = "ASAM Table 4: ImageNet, ResNet-50, top-1 / top-5 accuracy (%)"
T6 = "ASAM Table 6: CIFAR-10 with symmetric label noise, ResNet-32, maximum test accuracy (%)"
DEMO = "Demo: label noise on scikit-learn's digits (real data, 8x8), MLP, maximum test accuracy (%)"

TARGETS = """paper,table,task,model,minimizer,metric,mean,std,status
asam,2,cifar10,resnet20,sgd,max_test_acc,93.18,0.21,recalled
asam,2,cifar10,resnet20,sam,max_test_acc,95.00,,mean-verified
asam,2,cifar10,resnet56,asam,max_test_acc,95.42,0.16,mean-verified
asam,4,imagenet,resnet50,sgd,top1,75.79,0.22,recalled
asam,4,imagenet,resnet50,sgd,top5,92.62,0.04,mean-verified
sam,table-ftimagenet,imagenet,resnet152,sam,top1,81.6,,verified-seed
sam,table-cifar,cifar100,pyramidnet_shakedrop,sam,max_test_acc,89.7,,recalled
"""


def run(task, model, minimizer, seed, acc=None, **extra):
    """One results row; run_id unique per (task, model, minimizer, seed, noise, synthetic) unless given."""
    rid = f"{task}-{model}-{minimizer}-s{seed}-n{extra.get('noise', 0)}-{'f' if extra.get('synthetic') else 'r'}"
    row = {"run_id": rid, "status": "ok", "synthetic": False, "task": task, "model": model,
           "minimizer": minimizer, "seed": seed, "note": "", "max_test_acc": acc}
    row.update(extra)
    return row


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


def report(tmp_path, targets, tables):
    return render_report(load_results(tmp_path / "results"), targets, tables)


def test_table2_cells_paper_delta_and_footnote(tmp_path, targets, tables):
    write(tmp_path / "results", "cifar10.csv", [
        run("cifar10", "resnet20", "sgd", 0, 93.0), run("cifar10", "resnet20", "sgd", 1, 94.0),
        run("cifar10", "resnet20", "sgd", 2, 95.0), run("cifar10", "resnet20", "sam", 0, 96.0),
        run("cifar10", "resnet56", "asam", 0, 94.32), run("cifar10", "resnet56", "asam", 1, 94.32),
    ])
    md = report(tmp_path, targets, tables)
    assert md.startswith(f"# sambench report\n\n6 runs read from `{tmp_path / 'results'}` (6 ok).\n")
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


def test_no_footnote_without_recalled_figures(tmp_path, targets, tables):
    write(tmp_path / "results", "cifar10.csv", [run("cifar10", "resnet56", "asam", 0, 95.0)])
    targets = targets[targets["status"] != "recalled"]
    md = render_report(load_results(tmp_path / "results"), targets, tables)
    assert "†" not in md and FOOTNOTE not in md
    assert row(section(md, T2), "resnet56")[7:] == ["95.00 (1)", "95.42 ± 0.16", "-0.42"]


def test_extra_model_follows_the_paper_models(tmp_path, targets, tables):
    write(tmp_path / "results", "cifar10.csv", [run("cifar10", "tiny", "sgd", 0, 50.0)])
    t2 = section(report(tmp_path, targets, tables), T2)
    assert t2.index("| pyramidnet272 |") < t2.index("| tiny |")  # the paper's last model, then ours
    assert row(t2, "tiny")[1:4] == ["50.00 (1)", "n/a", "–"]


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
    t6 = section(render_report(load_results(tmp_path / "results"), load_targets(path), tables), T6)
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


def test_sam_paper_section(tmp_path, targets, tables):
    write(tmp_path / "results", "cifar100.csv", [
        run("cifar100", "pyramidnet_shakedrop", "sam", 0, 89.0),
        run("cifar100", "pyramidnet_shakedrop", "sam", 1, 50.0, synthetic=True)])  # synthetic: not compared
    sam = section(report(tmp_path, targets, tables), "SAM paper")
    assert header(sam) == ["table", "task", "model", "minimizer", "metric", "paper", "ours", "Δ"]
    assert row(sam, "table-cifar") == ["table-cifar", "cifar100", "pyramidnet_shakedrop", "sam",
                                       "max_test_acc", "89.7 †", "89.00 (1)", "-0.70"]
    assert row(sam, "table-ftimagenet") == ["table-ftimagenet", "imagenet", "resnet152", "sam", "top1",
                                            "81.6", "–", "–"]
    assert FOOTNOTE in sam


def test_perf_csv_and_subfolders_are_not_read(tmp_path, targets, tables):
    res = tmp_path / "results"
    write(res, "cifar10.csv", [run("cifar10", "resnet20", "sgd", 0, 90.0)])
    (res / "perf.csv").write_text("this,is\nnot,a,results,file\n")
    write(res / "paper", "asam.csv", [run("cifar10", "resnet20", "sgd", 9, 10.0)])
    df = load_results(res)
    assert list(df["run_id"]) == ["cifar10-resnet20-sgd-s0-n0-r"]
    assert df["noise"].tolist() == [0.0] and df["synthetic"].tolist() == [False]
    assert "1 runs read from" in render_report(df, targets, tables)


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
    md = render_report(pd.DataFrame(), targets, tables, source="nowhere")
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
    md = write_report(res, out, tmp_path / "targets.csv", TABLES)
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
    md = write_report(res, out, tmp_path / "targets.csv", TABLES, plots=[("cifar10", "resnet56")])
    assert "- cifar10 / resnet56: no epoch logs" in section(md, "Curves") and ".png" not in md
    assert "Curves" not in write_report(res, out, tmp_path / "targets.csv", TABLES, plots=[])
