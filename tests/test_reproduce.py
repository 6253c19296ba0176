"""`bench reproduce`: the plan from tables.toml, skipping, resuming, failures, dry runs; the digits demo."""
import os

import pandas as pd
import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.errors import UserError
from bench.registry import get_task, tables_file
from bench.sweep.plan import describe, load_tables, plan, planned_settings
from bench.sweep.sweeper import Sweeper

TABLES = load_tables(tables_file())


def tiny_tables():
    """The real table6 definition with a tiny smoke preset (fast enough for several sweeps)."""
    t6 = dict(TABLES["table6"])
    t6["presets"] = {"smoke": {"models": ["resnet20"], "noise": [0.2, 0.4], "seeds": 1, "synthetic": [16, 8],
                               "settings": {"epochs": 1, "batch_size": 8}}}
    return {"table6": t6, "tableX": UNBUILT}


UNBUILT = {**TABLES["table5"], "task": "speech-to-llama", "presets": {"smoke": {"seeds": 1}, "full": {"seeds": 2}}}


def test_full_plan_matches_the_paper_matrix(tmp_path):
    plans = {p.name: p for p in plan(TABLES, [], "full", results_dir=str(tmp_path))}
    assert len(plans["table2"].runs) == 8 * 3 * 5 and len(plans["table3"].runs) == 8 * 3 * 5
    assert len(plans["table6"].runs) == 4 * 3 * 3
    t3 = plans["table3"].runs
    assert {(c.minimizer, c.rho) for c in t3} == {("sgd", 0.0), ("sam", 0.1), ("asam", 1.0)}
    assert {c.noise for c in plans["table6"].runs} == {0.2, 0.4, 0.6, 0.8}
    assert all(c.epochs == 200 and c.batch_size == 128 for c in t3)
    assert not plans["table4"].skipped and len(plans["table4"].runs) == 3 * 3
    assert plan({"tableX": UNBUILT}, [], "full")[0].skipped == "task 'speech-to-llama' is not built yet (6 runs not planned)"
    assert "demo" not in plans  # the demo table has no full preset
    assert len(plan(TABLES, ["table2"], "full", seeds=2, results_dir=str(tmp_path))[0].runs) == 8 * 3 * 2
    assert all(c.download for c in plan(TABLES, ["table3"], "full", download=True)[0].runs)
    assert not any(c.download for c in plan(TABLES, ["table3"], "smoke", download=True)[0].runs)


def test_planned_settings_per_table_and_preset():
    got = planned_settings(TABLES, ["demo", "smoke", "smoke"])  # a preset given twice counts once
    assert {name: list(by_preset) for name, by_preset in got.items()} == {
        "demo": ["demo"], **{f"table{i}": ["smoke"] for i in range(2, 7)}}
    t2 = got["table2"]["smoke"]
    assert t2 == [c.identity() for c in plan(TABLES, ["table2"], "smoke")[0].runs]
    assert {(s["minimizer"], s["epochs"], s["batch_size"]) for s in t2} == {(m, 2, 32) for m in ("sgd", "sam", "asam")}
    assert "device" not in t2[0] and "seed" in t2[0]
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
    assert [p.name for p in plans] == ["table6", "tableX"] and "not built yet" in plans[1].skipped
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
    plans = plan(tiny_tables(), ["table6"], "smoke", results_dir=str(tmp_path), workers=0)
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
    retry = plan(tiny_tables(), ["table6"], "smoke", results_dir=str(tmp_path))[0]
    assert {c.minimizer for c in retry.todo} == {"sam"}


def test_dry_run_lists_runs_skips_and_measured_speed(tmp_path):
    from bench.results import append_row
    plans = plan({**TABLES, "tableX": UNBUILT}, ["table2", "tableX"], "full", results_dir=str(tmp_path))
    text = "\n".join(describe(plans, tmp_path))
    assert "table2 (cifar10): 120 runs, 0 already done, 120 to run; GPU-h unknown" in text
    assert "tableX: skipped: task 'speech-to-llama' is not built yet" in text
    # a measured GPU row gives an estimate: 30 s/epoch x 200 epochs = 1.67 h per run, 5 seeds of one cell
    append_row(tmp_path / "cifar10.csv", {"run_id": "x", "status": "ok", "synthetic": False, "task": "cifar10",
                                          "model": "wrn28_10", "minimizer": "asam", "epochs_done": 2,
                                          "train_time_s": 60.0, "wall_time_s": 5.0,  # resumed: last session
                                          "device_name": "NVIDIA H100"})
    text = "\n".join(describe(plan(TABLES, ["table2"], "full", results_dir=str(tmp_path)), tmp_path))
    assert "~8.3 GPU-h measured + 115 runs of unmeasured speed" in text
    assert "1.67 h on NVIDIA H100" in text


def test_cli_reproduce_dry_run_and_errors(tmp_path):
    r = CliRunner().invoke(app, ["reproduce", "--preset", "smoke", "--dry-run", "--results-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "table2 (cifar10): 3 runs" in r.output and "table4 (imagenet): 3 runs" in r.output
    r = CliRunner().invoke(app, ["reproduce", "table7"])
    assert r.exit_code == 2 and "unknown table(s) table7" in r.output


def test_digits_demo_task_learns_and_records_noise(tmp_path):
    from bench.runner import execute, make_config
    cfg = make_config("digits-noise", minimizer="asam", noise=0.4, epochs=3, results_dir=str(tmp_path),
                      device="cpu")
    assert (cfg.model, cfg.rho, cfg.eta, cfg.lr) == ("mlp", 0.5, 0.01, 0.05)
    row = execute(cfg)
    assert row["status"] == "ok" and row["synthetic"] is False
    assert row["train_size"] == 1297 and row["test_size"] == 500
    assert row["realised_noise"] == pytest.approx(0.4, abs=0.05)
    assert row["max_test_acc"] > 60  # clean test labels: well above the 10 % of chance after 3 epochs
