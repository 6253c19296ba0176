"""`bench reproduce`: the plan from tables.toml, skipping, resuming, failures, dry runs; the digits demo."""
import os

import pandas as pd
import pytest
from typer.testing import CliRunner

from bench.cli.main import app
from bench.errors import UserError
from bench.registry import get_task, tables_file
from bench.tables.layout import load_tables
from bench.tables.plan import describe, plan, planned_settings
from bench.sweep.sweeper import Sweeper

TABLES = load_tables(tables_file())


def tiny_tables():
    """The real asam6 definition with a tiny smoke preset (fast enough for several sweeps)."""
    t6 = dict(TABLES["asam6"])
    t6["presets"] = {"smoke": {"rows": ["20 %", "40 %"], "seeds": 1, "synthetic": [16, 8],
                               "settings": {"model": "resnet20", "epochs": 1, "batch_size": 8}}}
    return {"asam6": t6, "tableX": UNBUILT}


UNBUILT = {**TABLES["asam5"], "task": "speech-to-llama", "presets": {"smoke": {"seeds": 1}, "full": {"seeds": 2}}}

# A table of parts every checkout has: two tasks side by side, per-row and per-task settings, variants.
MINI = {"title": "mini", "tasks": ["cifar10", "cifar100"], "minimizers": ["sgd", "sam"],
        "metrics": {"error": "final_test_acc"}, "sgd_double_epochs": True, "settings": {"batch_size": 256, "lr": 0.05},
        "rows": [{"label": "a", "model": "resnet20", "epochs": 10, "rho": {"cifar10": 0.02, "cifar100": 0.2}},
                 {"label": "b", "model": "resnet56", "epochs": 20, "lr": {"cifar10": 0.3, "cifar100": 0.4}}],
        "variants": [{"label": "v1", "weight_decay": 1e-3}, {"label": "v2", "weight_decay": 2e-3}],
        "presets": {"full": {"seeds": 2},
                    "smoke": {"tasks": ["cifar100"], "rows": ["b"], "variants": ["v2"], "settings": {"epochs": 1}}}}

# Runs per table, planned or not: the papers' matrices (tasks x rows x variants x minimizers x seeds, SGD
# twice where it gets twice the epochs).
FULL = {"asam2": 8 * 3 * 5, "asam3": 8 * 3 * 5, "asam4": 3 * 3, "asam5": 3 * 3, "asam6": 4 * 3 * 3,
        "sam1": 2 * 5 * 3 * (2 + 1) * 5, "sam2": 3 * 3 * 2 * 5, "sam4": 4 * 2 * 5, "sam5": 2 * 2 * 2 * (2 + 1) * 5,
        "variants": 2 * 2 * (9 + 4 + 3) * 3, "asam-correlation": 3 * 3 * 3 * 2}  # + 4 scheduled, 3 newer
SMOKE = {"asam2": 3, "asam3": 3, "asam4": 3, "asam5": 3, "asam6": 3, "sam1": 2 * 3, "sam2": 2, "sam4": 2, "sam5": 2 * 3,
         "variants": 9 + 4 + 3, "asam-correlation": 2 * 2}


def counted(tp):
    """A table's runs, planned or left out until its parts are built (sam5's tasks, sam1's Shake models
    and augmentations, the variants table's minimizers come from other branches: this holds before and
    after they merge)."""
    assert all("not built yet" in why or "does not read setting" in why for why in tp.unplanned)
    return len(tp.runs) + sum(tp.unplanned.values())


@pytest.mark.parametrize("preset,expected", [("full", FULL), ("smoke", SMOKE)])
def test_plan_run_counts_per_table(tmp_path, preset, expected):
    plans = plan(TABLES, [], preset, results_dir=str(tmp_path))
    assert {tp.name: counted(tp) for tp in plans} == expected


def test_full_plan_matches_the_paper_matrix(tmp_path):
    plans = {p.name: p for p in plan(TABLES, [], "full", results_dir=str(tmp_path))}
    assert len(plans["asam2"].runs) == 8 * 3 * 5 and len(plans["asam3"].runs) == 8 * 3 * 5
    assert len(plans["asam6"].runs) == 4 * 3 * 3
    t3 = plans["asam3"].runs
    assert {(c.minimizer, c.rho) for c in t3} == {("sgd", 0.0), ("sam", 0.1), ("asam", 1.0)}
    assert {c.noise for c in plans["asam6"].runs} == {0.2, 0.4, 0.6, 0.8}
    assert all(c.epochs == 200 and c.batch_size == 128 for c in t3)
    assert not plans["asam4"].skipped and len(plans["asam4"].runs) == 3 * 3
    assert plan({"tableX": UNBUILT}, [], "full")[0].skipped == "task 'speech-to-llama' is not built yet (6 runs not planned)"
    assert "demo" not in plans  # the demo table has no full preset
    assert len(plan(TABLES, ["asam2"], "full", seeds=2, results_dir=str(tmp_path))[0].runs) == 8 * 3 * 2
    assert all(c.download for c in plan(TABLES, ["asam3"], "full", download=True)[0].runs)
    assert not any(c.download for c in plan(TABLES, ["asam3"], "smoke", download=True)[0].runs)


def cell(tp, row, variant, task, minimizer):
    """The planned runs of one cell, by the labels of its row and variant."""
    return [c for c in tp.runs if tp.cells[c.run_id] == (row, variant) and (c.task, c.minimizer) == (task, minimizer)]


def test_sam_tables_carry_the_papers_rows_and_the_sam_codes_loop(tmp_path):
    plans = {p.name: p for p in plan(TABLES, ["sam"], "full", results_dir=str(tmp_path))}
    assert list(plans) == ["sam1", "sam2", "sam4", "sam5"]  # the paper's name stands for its tables
    s1 = plans["sam1"]
    for task, rho in (("cifar10", 0.05), ("cifar100", 0.1)):  # WRN-28-10 with Basic: built in every checkout
        sam = cell(s1, "WRN-28-10 (200 epochs)", "Basic", task, "sam")
        assert [c.seed for c in sam] == [0, 1, 2, 3, 4]
        assert {(c.model, c.rho, c.lr, c.weight_decay, c.epochs, c.batch_size, c.augment) for c in sam} == {
            ("wrn28_10", rho, 0.1, 5e-4, 200, 256, "basic")}
        assert {(c.nesterov, c.weight_decay_style, c.schedule, c.clip_norm, c.label_smoothing) for c in sam} == {
            (True, "loss", "cosine-step", 5.0, 0.0)}
        sgd = cell(s1, "WRN-28-10 (200 epochs)", "Basic", task, "sgd")
        assert sorted((c.epochs, c.seed) for c in sgd) == [(e, s) for e in (200, 400) for s in range(5)]
        assert {c.rho for c in sgd} == {0.0}  # the base optimizer has no radius
        long = cell(s1, "WRN-28-10 (1800 epochs)", "Basic", task, "sgd")
        assert {(c.epochs, c.lr, c.weight_decay) for c in long} == {(1800, 0.05, 1e-3), (3600, 0.05, 1e-3)}
    assert {c.rho for c in cell(s1, "PyramidNet", "Basic", "cifar100", "sam")} == {0.2}
    s2 = plans["sam2"]
    assert {(c.model, c.epochs) for c in s2.runs} == {(m, e) for m in ("resnet50", "resnet101", "resnet152")
                                                      for e in (100, 200, 400)}
    assert {(c.batch_size, c.lr, c.weight_decay, c.label_smoothing) for c in s2.runs} == {(4096, 1.0, 1e-4, 0.1)}
    assert {(c.minimizer, c.rho) for c in s2.runs} == {("sgd", 0.0), ("sam", 0.05)}
    s4 = plans["sam4"]
    assert {(c.noise, c.rho) for c in s4.runs if c.minimizer == "sam"} == {
        (0.2, 0.1), (0.4, 0.1), (0.6, 0.1), (0.8, 0.05)}
    assert {(c.model, c.epochs, c.task) for c in s4.runs} == {("resnet32", 200, "cifar10-noise")}


def test_rows_variants_tasks_and_presets_land_in_the_configs(tmp_path):
    full = plan({"mini": MINI}, [], "full", results_dir=str(tmp_path))[0]
    assert len(full.runs) == 2 * 2 * 2 * (2 + 1) * 2 and not full.unplanned
    a_sam = cell(full, "a", "v1", "cifar100", "sam")
    assert {(c.model, c.epochs, c.rho, c.lr, c.weight_decay, c.batch_size) for c in a_sam} == {
        ("resnet20", 10, 0.2, 0.05, 1e-3, 256)}
    assert {(c.lr, c.rho) for c in cell(full, "b", "v2", "cifar10", "sam")} == {(0.3, 0.05)}  # rho: the recipe's
    assert sorted(c.epochs for c in cell(full, "b", "v2", "cifar100", "sgd")) == [20, 20, 40, 40]
    assert full.runs[0].task == "cifar10" and full.runs[-1].task == "cifar100"  # tasks, rows, variants, minimizers
    smoke = plan({"mini": MINI}, [], "smoke", results_dir=str(tmp_path))[0]
    assert [(c.task, c.model, c.minimizer, c.epochs, c.lr, c.weight_decay) for c in smoke.runs] == [
        ("cifar100", "resnet56", "sgd", 1, 0.4, 2e-3), ("cifar100", "resnet56", "sgd", 2, 0.4, 2e-3),
        ("cifar100", "resnet56", "sam", 1, 0.4, 2e-3)]


def test_cells_a_checkout_cannot_build_are_counted_not_raised(tmp_path):
    t = {**MINI, "rows": [{"label": "a", "model": "resnet20"}, {"label": "z", "model": "no_such_net"}],
         "variants": [{"label": "plain"}, {"label": "noisy", "noise": 0.2}]}
    tp = plan({"t": t}, [], "full", results_dir=str(tmp_path))[0]
    assert tp.unplanned == {"task cifar10 does not read setting noise yet": 6,
                            "model 'no_such_net' is not built yet for task cifar10": 12,
                            "task cifar100 does not read setting noise yet": 6,
                            "model 'no_such_net' is not built yet for task cifar100": 12}
    assert len(tp.runs) == 2 * 3 * 2 and not tp.skipped
    text = "\n".join(describe([tp], tmp_path))
    assert "  not planned: model 'no_such_net' is not built yet for task cifar10 (12 runs)" in text
    assert "total: 12 runs to do (36 more not planned: their parts are not built yet)" in text
    assert "[a / plain] resnet20 sgd" in text  # a run line names its cell
    none = plan({"t": {**t, "rows": t["rows"][1:]}}, [], "full", results_dir=str(tmp_path))[0]
    assert none.runs == [] and none.skipped.startswith("model 'no_such_net' is not built yet for task cifar10 (12 runs")


def test_table_mistakes_are_one_line_errors(tmp_path):
    twice = {**MINI, "presets": {"full": {"settings": {"model": "resnet20", "epochs": 3, "lr": 0.1}}}}
    with pytest.raises(UserError, match="table mini plans one run twice"):
        plan({"mini": twice}, [], "full", results_dir=str(tmp_path))
    gap = {**MINI, "rows": [{"label": "a", "model": "resnet20", "rho": {"cifar10": 0.1}}]}
    with pytest.raises(UserError, match=r"rho = \{'cifar10': 0.1\} names no value for task cifar100"):
        plan({"mini": gap}, [], "full", results_dir=str(tmp_path))
    with pytest.raises(UserError, match="preset smoke: no row 'c'; choose from: a, b"):
        plan({"mini": {**MINI, "presets": {"smoke": {"rows": ["c"]}}}}, [], "smoke")


def test_table_names_and_papers():
    assert [p.name for p in plan(TABLES, ["asam"], "smoke")] == ["asam2", "asam3", "asam4", "asam5", "asam6",
                                                                 "asam-correlation"]
    assert [p.name for p in plan(TABLES, ["sam2", "sam"], "smoke")] == ["sam2", "sam1", "sam4", "sam5"]
    with pytest.raises(UserError, match="unknown table.s. sam3; choose from: asam2, .*, demo, fmnist, frontier, variants, asam-correlation or a paper: asam, sam"):
        plan(TABLES, ["sam3"], "full")


def test_planned_settings_per_table_and_preset():
    got = planned_settings(TABLES, ["demo", "smoke", "smoke"])  # a preset given twice counts once
    listed = {name: list(by_preset) for name, by_preset in got.items()}
    listed.pop("sam5", None)  # its tasks come from another branch
    assert listed == {"demo": ["demo"], **{f"asam{i}": ["smoke"] for i in range(2, 7)},
                      **{f"sam{i}": ["smoke"] for i in (1, 2, 4)}, "variants": ["smoke"],
                      "asam-correlation": ["demo", "smoke"]}
    t2 = got["asam2"]["smoke"]
    assert t2 == [{**c.identity(), "cell_row": "resnet20", "cell_variant": "", "cell_column": c.minimizer}
                  for c in plan(TABLES, ["asam2"], "smoke")[0].runs]
    assert {(s["minimizer"], s["epochs"], s["batch_size"]) for s in t2} == {(m, 2, 32) for m in ("sgd", "sam", "asam")}
    assert "device" not in t2[0] and "seed" in t2[0]
    assert {(s["cell_row"], s["cell_variant"]) for s in got["sam1"]["smoke"]} <= {
        ("WRN-28-10 (200 epochs)", "Basic"), ("WRN-28-10 (200 epochs)", "Cutout")}
    assert planned_settings({"tableX": UNBUILT}, ["full"]) == {}  # an unbuilt task plans nothing
    with pytest.raises(UserError, match="unknown preset"):
        planned_settings(TABLES, ["huge"])


def test_bad_arguments():
    with pytest.raises(UserError, match="unknown table"):
        plan(TABLES, ["table9"], "full")
    with pytest.raises(UserError, match="unknown preset"):
        plan(TABLES, [], "huge")
    with pytest.raises(UserError, match="--seeds"):
        plan(TABLES, [], "full", seeds=0)


def run_plan(plans, res=None):
    """Sweep in this process (each run in a child process), quietly."""
    res = res or plans[0].runs[0].results_dir
    return Sweeper(plans, res, poll=0.1, say=lambda msg: None).run()


def test_sweep_is_resumable_idempotent_and_forceable(tmp_path):
    res = str(tmp_path / "res")
    plans = plan(tiny_tables(), [], "smoke", results_dir=res, workers=0)
    assert [p.name for p in plans] == ["asam6", "tableX"] and "not built yet" in plans[1].skipped
    first = plans[0].todo[:2]
    plans[0].runs = first  # "interrupted" after two runs
    assert run_plan(plans)["ok"] == 2
    again = plan(tiny_tables(), [], "smoke", results_dir=res, workers=0)[0]
    assert len(again.runs) == 6 and len(again.done) == 2 and len(again.todo) == 4
    counts = run_plan([again])
    assert counts["ok"] == 4 and counts["skipped"] == 2
    df = pd.read_csv(tmp_path / "res" / "cifar10-noise.csv")
    assert len(df) == 6 and df.run_id.is_unique and set(df.noise) == {0.2, 0.4}
    assert plan(tiny_tables(), [], "smoke", results_dir=res)[0].todo == []
    forced = plan(tiny_tables(), [], "smoke", results_dir=res, force=True)[0]
    assert len(forced.todo) == 6


FAULT = """
import os
if os.environ.get("SAMBENCH_TEST_FAULT"):  # every Python process of the test: make SAM runs fail in build
    from bench.registry import get_task
    task = get_task("cifar10-noise")
    real_build = task.build
    def build(cfg, device):
        if cfg.minimizer == "sam":
            raise RuntimeError("simulated\\nfailure")
        return real_build(cfg, device)
    task.build = build
"""


def test_failed_run_is_recorded_and_sweep_goes_on(tmp_path, monkeypatch):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAULT)  # reaches the runs' own processes
    monkeypatch.setenv("PYTHONPATH", f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("SAMBENCH_TEST_FAULT", "1")
    plans = plan(tiny_tables(), ["asam6"], "smoke", results_dir=str(tmp_path), workers=0)
    counts = run_plan(plans)
    assert counts["failed"] == 2 and counts["ok"] == 4
    df = pd.read_csv(tmp_path / "cifar10-noise.csv")
    failed = df[df.status == "failed"]
    assert set(failed.minimizer) == {"sam"}
    for r in failed.itertuples():
        log = tmp_path / "runs" / r.run_id / "error.log"
        assert r.note == f"RuntimeError: simulated (traceback: {log})"
        assert "Traceback (most recent call last)" in log.read_text() and "failure" in log.read_text()
    # failed runs are not "done": the next sweep retries exactly them
    monkeypatch.delenv("SAMBENCH_TEST_FAULT")
    retry = plan(tiny_tables(), ["asam6"], "smoke", results_dir=str(tmp_path))[0]
    assert {c.minimizer for c in retry.todo} == {"sam"}


def test_dry_run_lists_runs_skips_and_measured_speed(tmp_path):
    from bench.store.files import append_row
    plans = plan({**TABLES, "tableX": UNBUILT}, ["asam2", "tableX"], "full", results_dir=str(tmp_path))
    text = "\n".join(describe(plans, tmp_path))
    assert "asam2 (cifar10): 120 runs, 0 already done, 120 to run; GPU-h unknown" in text
    assert "tableX: skipped: task 'speech-to-llama' is not built yet" in text
    # a measured GPU row gives an estimate: 30 s/epoch x 200 epochs = 1.67 h per run, 5 seeds of one cell
    append_row(tmp_path / "cifar10.csv", {"run_id": "x", "status": "ok", "synthetic": False, "task": "cifar10",
                                          "model": "wrn28_10", "minimizer": "asam", "epochs_done": 2,
                                          "train_time_s": 60.0, "wall_time_s": 5.0,  # resumed: last session
                                          "device_name": "NVIDIA H100"})
    text = "\n".join(describe(plan(TABLES, ["asam2"], "full", results_dir=str(tmp_path)), tmp_path))
    assert "~8.3 GPU-h measured + 115 runs of unmeasured speed" in text
    assert "1.67 GPU-h on 1 x NVIDIA H100" in text


def test_dry_run_gpu_hours_count_every_gpu_and_match_precision_and_compile(tmp_path):
    """GPU-hours are all the run's GPUs' hours, and a speed holds only for its precision and compile setting:
    a bf16 compiled row says nothing of an fp32 eager run."""
    from bench.store.files import append_row
    row = {"status": "ok", "synthetic": False, "task": "cifar10", "model": "wrn28_10", "minimizer": "asam",
           "epochs_done": 2, "device_name": "NVIDIA H100"}
    append_row(tmp_path / "cifar10.csv", {**row, "run_id": "a", "train_time_s": 20.0, "world_size": 4,
                                          "precision": "fp32", "compile": False})   # 10 s/epoch on 4 GPUs
    append_row(tmp_path / "cifar10.csv", {**row, "run_id": "b", "train_time_s": 4.0, "world_size": 1,
                                          "precision": "bf16", "compile": True})    # 2 s/epoch on 1 GPU
    eager = plan(TABLES, ["asam2"], "full", results_dir=str(tmp_path), world_size=4)
    text = "\n".join(describe(eager, tmp_path))
    assert "2.22 GPU-h on 4 x NVIDIA H100" in text  # 10 s x 200 epochs x 4 GPUs
    one = "\n".join(describe(plan(TABLES, ["asam2"], "full", results_dir=str(tmp_path)), tmp_path))
    assert "2.22 GPU-h on 4 x NVIDIA H100, scaled to 1" in one
    assert "0.11 GPU-h" not in one and "fp32 on 1 GPU(s)" in one  # the bf16 compiled row's 2 s/epoch: not ours


def test_cli_reproduce_dry_run_and_errors(tmp_path):
    r = CliRunner().invoke(app, ["reproduce", "--preset", "smoke", "--dry-run", "--results-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "asam2 (cifar10): 3 runs" in r.output and "asam4 (imagenet): 3 runs" in r.output
    r = CliRunner().invoke(app, ["reproduce", "table7"])
    assert r.exit_code == 2 and "unknown table(s) table7" in r.output


def test_digits_demo_task_learns_and_records_noise(tmp_path):
    from bench.recipes import make_config
    from bench.train.runner import execute
    cfg = make_config("digits-noise", minimizer="asam", noise=0.4, epochs=3, results_dir=str(tmp_path),
                      device="cpu")
    assert (cfg.model, cfg.rho, cfg.eta, cfg.lr) == ("mlp", 0.5, 0.01, 0.05)
    row = execute(cfg)
    assert row["status"] == "ok" and row["synthetic"] is False
    assert row["train_size"] == 1297 and row["test_size"] == 500
    assert row["realised_noise"] == pytest.approx(0.4, abs=0.05)
    assert row["max_test_acc"] > 60  # clean test labels: well above the 10 % of chance after 3 epochs
