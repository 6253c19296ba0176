"""Equal compute: time to accuracy and accuracy at a compute on hand-made epoch logs (bench.store.history), the row's
target columns (bench.train.runner), the report's equal-compute view and its plots on a hand-made results folder
(records and epochs.csv written here, no training), plan matching with minimizer options, and one small sweep
of the variants table's smoke preset (sgd/sam/asam only) through `bench reproduce` and `bench report`."""
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from bench.store.records import canon
from bench.tables.cells import ROW, VARIANT, match_plans
from bench.store.history import TARGET_FIELDS, acc_at_compute, read_history, run_history, target_fields, time_to_target
from bench.report.load import load_results, load_targets
from bench.report.render import render_report
from bench.report.write import write_report
from bench.tables.layout import load_tables
from bench.tables.plan import planned_settings

ROOT = Path(__file__).resolve().parents[2]
TABLES = ROOT / "tasks" / "tables.toml"
PNG = b"\x89PNG\r\n\x1a\n"
HEAD = "paper,table,dataset,model,variant,minimizer,metric,mean\n"


def log(accs, passes_per_epoch, wall_per_epoch=1.0, steps_per_epoch=10):
    """An epoch log as bench.train.runner writes it: cumulative passes, steps and training seconds."""
    return [{"epoch": e, "lr": 0.1, "train_loss": 1.0, "test_acc": a, "passes": e * passes_per_epoch,
             "fwd_examples": 0, "bwd_examples": 0, "steps": e * steps_per_epoch, "wall_s": e * wall_per_epoch}
            for e, a in enumerate(accs, start=1)]


def test_time_to_target_and_accuracy_at_compute():
    h = log([50.0, 70.0, 65.0], 10.0)
    assert time_to_target(h, 60.0) == {"target_epoch": 2, "target_wall_s": 2.0, "target_passes": 20.0}
    assert time_to_target(h, 70.0)["target_epoch"] == 2  # reached means >=
    assert time_to_target(h, 70.5) == {"target_epoch": None, "target_wall_s": None, "target_passes": None}
    assert time_to_target(h, None)["target_epoch"] is None and time_to_target(h, float("nan"))["target_epoch"] is None
    assert acc_at_compute(h, 20.0) == 70.0 and acc_at_compute(h, 29.9) == 70.0 and acc_at_compute(h, 1e9) == 65.0
    assert acc_at_compute(h, 20.0 - 1e-12) == 70.0  # a float printed and read back is the same compute
    assert acc_at_compute(h, 9.9) is None  # its first epoch already cost more
    assert acc_at_compute([{"epoch": 1, "test_acc": 50.0}], 10.0) is None  # a log without compute counts
    diverged = h[:2] + [{"epoch": 3, "train_loss": float("nan"), "passes": 30.0}]
    assert acc_at_compute(diverged, 30.0) == 70.0 and time_to_target(diverged, 71.0)["target_epoch"] is None
    assert target_fields(h, 60.0) == {"target_acc_used": 60.0, "target_epoch": 2, "target_wall_s": 2.0,
                                      "target_passes": 20.0}
    assert target_fields(h, None) == dict.fromkeys(["target_acc_used", "target_epoch", "target_wall_s",
                                                    "target_passes"])


def test_read_history_counts_an_epoch_once_and_skips_text(tmp_path):
    path = tmp_path / "runs" / "r1" / "epochs.csv"
    path.parent.mkdir(parents=True)
    path.write_text("epoch,test_acc,passes,note\n2,40.0,2.0,x\n1,10.0,1.0,\n2,45.5,2.0,y\n")
    assert read_history(path) == [{"epoch": 1.0, "test_acc": 10.0, "passes": 1.0},
                                  {"epoch": 2.0, "test_acc": 45.5, "passes": 2.0}]
    assert run_history(tmp_path, "r1") == read_history(path)
    assert run_history(tmp_path, "none") == []


def test_row_target_comes_from_target_acc_or_stays_empty(tmp_path):
    """A row is a function of its own run: the time-to-accuracy columns come from --target-acc alone, never from
    another run of the folder (which may or may not have finished); "x SGD's compute" is the report's."""
    from bench.recipes import make_config
    from bench.train.runner import execute

    def run(**kw):
        return execute(make_config("digits-noise", minimizer="sam", epochs=2, device="cpu",
                                   results_dir=str(tmp_path / str(len(kw))), **kw))
    plain, targeted = run(), run(target_acc=10.0)
    assert all(plain[k] is None for k in TARGET_FIELDS)
    assert targeted["target_acc_used"] == 10.0 and targeted["target_epoch"] == 1


def test_a_row_is_the_same_whichever_run_of_its_cell_finishes_first(tmp_path):
    """Two runs of one cell (SGD and SAM) in both orders: each run's row is identical but for when and how long."""
    from bench.recipes import make_config
    from bench.train.runner import execute
    rows = {}
    for order in (("sgd", "sam"), ("sam", "sgd")):
        folder = tmp_path / "-".join(order)
        for m in order:
            rows[order, m] = execute(make_config("digits-noise", minimizer=m, epochs=2, device="cpu",
                                                 results_dir=str(folder)))
    timing = {"timestamp", "wall_time_s", "train_time_s", "images_per_s", "checkpoint_s", "results_dir",
              "git_commit"}
    for m in ("sgd", "sam"):
        a, b = ({k: v for k, v in rows[o, m].items() if k not in timing and "time" not in k and not k.endswith("_s")}
                for o in (("sgd", "sam"), ("sam", "sgd")))
        assert a == b, m


def test_plan_matching_compares_minimizer_options_as_one_spelling():
    assert canon({"b": True, "a": 0.1}) == canon('{"a": 0.10, "b": true}') == canon(' {"b": "True", "a": "0.1"}')
    assert canon({}) == canon("{}") and canon({"a": [1, 2]}) == canon('{"a": [1.0, "2"]}')
    assert canon({"a": 0.1}) != canon('{"a": 0.2}') and canon("{not json") == "{not json"
    plan = {"task": "cifar10", "model": "resnet20", "minimizer": "gsam", "mopts": {"alpha": 0.1, "warm": 3},
            "seed": 0, ROW: "r", VARIANT: ""}
    rows = pd.DataFrame([{"run_id": "a", "task": "cifar10", "model": "resnet20", "minimizer": "gsam", "seed": 1,
                          "mopts": json.dumps({"warm": 3, "alpha": 0.1}, sort_keys=True)},
                         {"run_id": "b", "task": "cifar10", "model": "resnet20", "minimizer": "gsam", "seed": 0,
                          "mopts": '{"alpha": 0.3, "warm": 3}'}])
    got = match_plans(rows, {"t": {"full": [plan]}})
    assert list(got["planned"]) == [True, False]
    assert got.loc[1, "differs"] == 'mopts={"alpha": "0.3", "warm": "3"}'


# --- the report's equal-compute view on a hand-made results folder ---------------------------------------

PLANS = planned_settings(load_tables(TABLES), ["full"])
# (task, minimizer, seed) -> test accuracy per epoch; SGD spends 10 passes an epoch, SAM and ASAM 20.
ACCS = {("cifar10", "sgd", 0): [50.0, 60.0, 70.0, 80.0], ("cifar10", "sgd", 1): [52.0, 62.0, 72.0, 78.0],
        ("cifar10", "sam", 0): [55.0, 75.0, 85.0, 90.0], ("cifar10", "sam", 1): [50.0, 70.0, 79.0, 88.0],
        ("cifar10", "asam", 0): [40.0, 60.0, 70.0, 79.0], ("cifar10", "asam", 1): [45.0, 65.0, 75.0, 80.0],
        ("cifar100", "sgd", 0): [60.0, 70.0], ("cifar100", "sam", 0): [30.0, 65.0], ("cifar100", "sam", 1): [35.0, 66.0]}
WALL = {"sgd": 1.0, "sam": 2.0, "asam": 2.5}


def planned_row(task, minimizer, seed, table="variants", cell=("WRN-28-10", ""), epochs=None):
    """The results row of a run a table's full plan names (by default a WRN-28-10 cell of variants)."""
    for s in PLANS[table]["full"]:
        if (s["task"], s["minimizer"], s[ROW], s[VARIANT]) == (task, minimizer, *cell) and epochs in (None, s["epochs"]):
            settings = {k: v for k, v in s.items() if k not in (ROW, VARIANT)}
            settings["mopts"] = json.dumps(settings.get("mopts", {}), sort_keys=True)  # as a CSV holds it
            return {"run_id": f"{table}-{task}-{minimizer}-s{seed}-{s['epochs']}", "status": "ok", "synthetic": False,
                    **settings, "seed": seed, "note": ""}
    raise AssertionError(f"no planned run {table} {task} {minimizer}")


def write_run(res, row, accs, passes_per_epoch, wall_per_epoch=1.0):
    """A run's row (returned, with its accuracies) and its epoch log, written under `res`."""
    path = res / "runs" / row["run_id"] / "epochs.csv"
    path.parent.mkdir(parents=True)
    pd.DataFrame(log(accs, passes_per_epoch, wall_per_epoch)).to_csv(path, index=False)
    return {**row, "max_test_acc": max(accs), "final_test_acc": accs[-1]}


@pytest.fixture
def results(tmp_path):
    res = tmp_path / "results"
    rows = [write_run(res, planned_row(task, m, seed), accs, 10.0 if m == "sgd" else 20.0, WALL[m])
            for (task, m, seed), accs in ACCS.items()]
    pd.DataFrame(rows).to_csv(res / "cifar.csv", index=False)
    (tmp_path / "targets.csv").write_text(HEAD)
    return res


def view_rows(md):
    start = md.index("### Equal compute\n")
    lines = md[start:].split("\n\n")[1].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_equal_compute_view_numbers(results, tmp_path):
    md = render_report(load_results(results), load_targets(tmp_path / "targets.csv"), load_tables(TABLES), PLANS)
    section = md[md.index("## SAM variants"):]
    assert "(paper)" not in section and "n/a" not in section  # no published cells: ours alone
    rows = view_rows(section)
    assert rows[0] == ["dataset", "model", "minimizer", "acc at SGD's compute (%)", "compute to SGD's final acc",
                       "passes/step", "wall s/epoch", "seeds", "final acc (%)", "passes in all", "frontier"]
    assert rows[2:] == [
        ["CIFAR-10", "WRN-28-10", "SGD", "79.00", "1.00×", "1.00", "1.00", "2", "79.00 ± 1.41", "40", "yes"],
        ["CIFAR-10", "WRN-28-10", "SAM", "72.50", "1.50×", "2.00", "2.00", "2", "89.00 ± 1.41", "80", "yes"],
        # ASAM: SAM's compute, lower accuracy: off the frontier
        ["CIFAR-10", "WRN-28-10", "ASAM", "62.50", "2.00× (1 of 2)", "2.00", "2.50", "2", "79.50 ± 0.71", "80", ""],
        # seed 1 of SAM has no SGD run to be measured against: counted, not compared
        ["CIFAR-100", "WRN-28-10", "SGD", "70.00", "1.00×", "1.00", "1.00", "1", "70.00", "20", "yes"],
        ["CIFAR-100", "WRN-28-10", "SAM", "30.00", "not reached", "2.00", "2.00", "2", "65.50 ± 0.71", "40", ""],
    ]
    assert "a forward alone counting 1/3" in section


def test_sgd_at_twice_the_epochs_is_a_line_measured_against_sgd_at_the_tables_epochs(tmp_path):
    res, cell = tmp_path / "results", ("WRN-28-10 (200 epochs)", "Basic")
    rows = [write_run(res, planned_row("cifar10", "sgd", 0, "sam1", cell, 200), [60.0, 70.0], 10.0),
            write_run(res, planned_row("cifar10", "sgd", 0, "sam1", cell, 400), [50.0, 65.0, 72.0, 75.0], 10.0),
            write_run(res, planned_row("cifar10", "sam", 0, "sam1", cell), [55.0, 72.0], 20.0)]
    pd.DataFrame(rows).to_csv(res / "cifar10.csv", index=False)
    (tmp_path / "targets.csv").write_text(HEAD)
    md = render_report(load_results(res), load_targets(tmp_path / "targets.csv"), load_tables(TABLES), PLANS)
    rows = view_rows(md[md.index("## SAM Table 1"):])
    assert rows[0][:4] == ["dataset", "model", "augmentation", "minimizer"]
    assert [r[3:6] for r in rows[2:]] == [["SGD", "70.00", "1.00×"], ["SGD (400 ep)", "65.00", "1.50×"],
                                          ["SAM", "55.00", "2.00×"]]
    assert rows[2][:3] == ["CIFAR-10", "WRN-28-10 (200 epochs)", "Basic"]


def test_write_report_draws_one_accuracy_vs_compute_plot_per_cell(results, tmp_path):
    out = tmp_path / "out" / "report.md"
    md = write_report(results, out, tmp_path / "targets.csv", TABLES, PLANS)
    names = ["report-compute-variants-full-cifar10-WRN-28-10.png", "report-compute-variants-full-cifar100-WRN-28-10.png"]
    part = md[md.index("## Accuracy vs compute"):]
    for name in names:
        assert (out.parent / name).read_bytes().startswith(PNG)
        assert f"]({name})" in part
    assert "### variants: CIFAR-10 / WRN-28-10" in part and "one line per minimizer" in part
    assert not list(out.parent.glob(".*"))  # written atomically: no temp files left
    md = write_report(results, out, tmp_path / "targets.csv", TABLES, PLANS, plots=[("cifar10", "resnet20")])
    assert "## Accuracy vs compute" not in md  # --plot picks the cells too


# --- bench reproduce + bench report, end to end ---------------------------------------------------------

VARIANTS = ["sgd", "sam", "asam", "gsam", "esam", "looksam", "fsam", "samon", "sam_adaptive_all", "msam", "wsam", "sampa"]
SCHEDULED = {"SAM, last 1/8": ("sam", 0.875, 1), "SAM every 5": ("sam", 0.0, 5), "ASAM, last 1/8": ("asam", 0.875, 1),
             "ASAM every 5": ("asam", 0.0, 5)}  # column -> (minimizer, sam_from, sam_every)


def small_variants(tmp_path):
    """tables.toml's variants table, every minimizer, on smaller synthetic data."""
    text = TABLES.read_text()
    start = text.index("\n[variants]\n")
    end = text.find("\n[", start + 2)
    table = text[start:] if end < 0 else text[start:end]
    from bench.tables.layout import columns
    assert set(columns(load_tables(TABLES)["variants"])) == set(VARIANTS) | set(SCHEDULED)
    assert "synthetic = [128, 64]" in table  # 8 steps in all: 4 of batch 16 in each of the smoke preset's 2 epochs
    table = table.replace("synthetic = [128, 64]", "synthetic = [64, 32]")
    path = tmp_path / "tables.toml"
    path.write_text(table)
    return path


def test_every_variant_through_the_smoke_preset_then_the_equal_compute_view(tmp_path, monkeypatch):
    import bench.registry
    from bench.cli.main import app
    from bench.store.records import records

    monkeypatch.setattr(bench.registry, "tables_file", lambda: small_variants(tmp_path))
    res = str(tmp_path / "res")
    r = CliRunner().invoke(app, ["reproduce", "variants", "--preset", "smoke", "--device", "cpu", "--workers", "0",
                                 "--results-dir", res, "--poll", "0.1"])
    assert r.exit_code == 0, r.output
    runs = list(records(res))
    assert len(runs) == len(VARIANTS) + len(SCHEDULED) and {x["status"] for x in runs} == {"ok"}
    rows = {x["minimizer"]: x for x in runs if (float(x["sam_from"]), int(x["sam_every"])) == (0.0, 1)}
    assert set(rows) == set(VARIANTS)
    assert sorted((x["minimizer"], float(x["sam_from"]), int(x["sam_every"])) for x in runs if x not in rows.values()) \
        == sorted(SCHEDULED.values())
    for x in runs:  # a row is its own run's: no target without --target-acc; the report pairs runs
        assert x["target_acc_used"] is None and run_history(res, x["run_id"])
    r = CliRunner().invoke(app, ["report", "--results-dir", res, "--preset", "smoke"])
    assert r.exit_code == 0, r.output
    md = (Path(res) / "report.md").read_text()
    # Synthetic smoke runs are a pipeline check: they close the report, ours alone, no equal-compute view, no plot.
    checks = md[md.index("## Pipeline checks on synthetic data"):]
    assert "### SAM variants" in checks and "### Equal compute" not in md and not list(Path(res).glob("*.png"))
    # The view and its plots, made from the same smoke runs' logs by the report's own functions (bench.report.compute).
    from bench.report.compute import cell_views, compute_view, plot_compute
    from bench.report.curves import save_png
    from bench.report.frontier import plot_frontier
    from bench.tables.layout import layout
    tables = load_tables(small_variants(tmp_path))
    lay = layout("variants", tables["variants"], "smoke")
    part = match_plans(load_results(res), planned_settings(tables, ["smoke"]))
    part = part[part["in_plans"].map(lambda pairs: ("variants", "smoke") in pairs).astype(bool)]
    view = view_rows("\n".join(compute_view(tables["variants"], lay, "smoke", part, res)))
    assert [v[2] for v in view[2:]] == ["SGD", "SAM", "ASAM", "GSAM", "ESAM", "LookSAM", "F-SAM", "SAM-ON",
                                        "SAM (adaptive, all)", *SCHEDULED, "MSAM", "WSAM", "SAMPa"]
    # passes per step as the batches counted them: ESAM 1 + 1/3 + 1/2; LookSAM, k = 5, 8 steps: 2 SAM steps; the
    # last 1/8 of 2 epochs (floor(0.875 * 2) = 1): the last epoch's 4 steps of 8; every 5th of 8 steps: 1; SAMPa: 2,
    # 1 on two devices
    assert [v[5] for v in view[2:]] == ["1.00", "2.00", "2.00", "2.00", "1.83", "1.25", "2.00", "2.00", "2.00",
                                        "1.50", "1.12", "1.50", "1.12", "1.00", "2.00", "2.00 (1.00 parallel)"]
    assert sum(v[-1] == "yes" for v in view[2:]) >= 1  # the frontier names at least one line
    [cell] = cell_views(tables["variants"], lay, "smoke", part, res)
    plot_compute(cell, "compute", lambda fig: save_png(fig, tmp_path / "compute.png"))
    assert plot_frontier(cell, "frontier", lambda fig: save_png(fig, tmp_path / "frontier.png"))
    for kind in ("compute", "frontier"):
        assert (tmp_path / f"{kind}.png").read_bytes().startswith(PNG)


def test_variants_dry_run_plans_every_minimizer(tmp_path):
    from bench.cli.main import app
    from bench.minimizers import MINIMIZERS

    assert set(VARIANTS[1:]) == set(MINIMIZERS)  # a new minimizer joins the variants table
    assert f"variants (cifar10, cifar100): {len(VARIANTS) + len(SCHEDULED)} runs" in CliRunner().invoke(app, [
        "reproduce", "variants", "--preset", "smoke", "--dry-run", "--results-dir", str(tmp_path)]).output
    r = CliRunner().invoke(app, ["reproduce", "variants", "--preset", "smoke", "--dry-run", "--results-dir",
                                 str(tmp_path)])
    assert r.exit_code == 0, r.output
    for m in VARIANTS:
        assert f"resnet20 {m} rho=" in r.output, m
    assert "not built yet" not in r.output
