"""Faults injected with real processes and signals: SIGKILL mid-epoch, SIGINT, divergence, corrupt inputs.
(Concurrent appends from several processes: tests/store/test_results.py::test_concurrent_appends_from_processes.)"""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from bench.cli.main import app
from tasks.cifar import write_fake_cifar

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    write_fake_cifar(root, "cifar10", 384, 64, seed=0)
    return root


def bench_cmd(data, results, *extra, workers=0):
    return [sys.executable, "-m", "bench", "run", "cifar10", "--minimizer", "sam", "--epochs", "3",
            "--batch-size", "32", "--workers", str(workers), "--device", "cpu", "--data-dir", str(data),
            "--results-dir", str(results), "--keep-checkpoint", *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_dir(results):
    dirs = list((results / "runs").iterdir())
    assert len(dirs) == 1
    return dirs[0]


def wait_for(predicate, proc, timeout=240):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def final_state(results):
    return torch.load(run_dir(results) / "checkpoint.pt", weights_only=False)["model"]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    results = tmp_path_factory.mktemp("uninterrupted")
    proc = subprocess.run(bench_cmd(data, results, "--quiet"), capture_output=True, text=True, env=ENV, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results


def test_sigkill_mid_epoch_then_resume_is_bit_identical(data, tmp_path, uninterrupted):
    results = tmp_path / "killed"
    # the killed run loads with 2 worker processes, the reference with none: batches depend on (seed, epoch) only
    proc = subprocess.Popen(bench_cmd(data, results, "--quiet", workers=2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)
    wait_for(lambda: (results / "runs").exists() and any((results / "runs").glob("*/checkpoint.pt")), proc)
    time.sleep(1.0)  # well into epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rd = run_dir(results)
    assert not (results / "cifar10.csv").exists()                       # no partial row
    assert list(pd.read_csv(rd / "epochs.csv").epoch) == [1]
    assert torch.load(rd / "checkpoint.pt", weights_only=False)["epoch"] == 1   # readable
    resumed = subprocess.run(bench_cmd(data, results, workers=2), capture_output=True, text=True, env=ENV,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "resumed after epoch 1 of 3" in resumed.stdout
    assert list(pd.read_csv(rd / "epochs.csv").epoch) == [1, 2, 3]     # no duplicated epochs
    rows = pd.read_csv(results / "cifar10.csv")
    assert len(rows) == 1 and rows.status.iloc[0] == "ok"
    ref, got = final_state(uninterrupted), final_state(results)
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    ref_log = pd.read_csv(run_dir(uninterrupted) / "epochs.csv")
    assert list(ref_log.test_acc) == list(pd.read_csv(rd / "epochs.csv").test_acc)
    assert not list(rd.glob(".*.tmp")) and not list(results.glob(".*.tmp"))


def test_sigint_finishes_the_epoch_saves_and_resumes(data, tmp_path, uninterrupted):
    results = tmp_path / "sigint"
    proc = subprocess.Popen(bench_cmd(data, results), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                            text=True)
    wait_for(lambda: (results / "runs").exists() and any((results / "runs").iterdir()), proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "Traceback" not in err
    state = torch.load(run_dir(results) / "checkpoint.pt", weights_only=False)
    assert state["epoch"] in (1, 2)
    assert not (results / "cifar10.csv").exists()
    resumed = subprocess.run(bench_cmd(data, results, "--quiet"), capture_output=True, text=True, env=ENV,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref, got = final_state(uninterrupted), final_state(results)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_divergence_is_recorded_and_reported(tmp_path):
    r = runner.invoke(app, ["run", "digits-noise", "--minimizer", "sam", "--lr", "1e12", "--epochs", "3",
                            "--results-dir", str(tmp_path), "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    row = pd.read_csv(tmp_path / "digits-noise.csv").iloc[0]
    assert row.status == "diverged" and row.note == "non-finite training loss at epoch 1" and row.epochs_done == 1
    r = runner.invoke(app, ["report", "--results-dir", str(tmp_path)])
    assert r.exit_code == 0 and "diverged (1)" in (tmp_path / "report.md").read_text()


def test_truncated_checkpoint(data, tmp_path, uninterrupted):
    rd = run_dir(uninterrupted)
    target = tmp_path / "runs" / rd.name
    target.mkdir(parents=True)
    blob = (rd / "checkpoint.pt").read_bytes()
    (target / "checkpoint.pt").write_bytes(blob[: len(blob) // 3])
    args = ["run", "cifar10", "--minimizer", "sam", "--epochs", "3", "--batch-size", "32", "--workers", "0",
            "--device", "cpu", "--data-dir", str(data), "--results-dir", str(tmp_path), "--quiet"]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "checkpoint" in r.output and "is unreadable" in r.output and "--restart" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "cifar10.csv").exists()
    assert (target / "checkpoint.pt").read_bytes() == blob[: len(blob) // 3]   # untouched
    r = runner.invoke(app, args[:4] + ["--epochs", "1"] + args[6:] + ["--restart"])
    assert r.exit_code == 0, r.output


def test_malformed_results_csv_refused_before_training(data, tmp_path):
    bad = tmp_path / "cifar10.csv"
    bad.write_bytes(b"\x00\xffnot,a,results\nfile")
    before = bad.read_bytes()
    r = runner.invoke(app, ["run", "cifar10", "--data-dir", str(data), "--results-dir", str(tmp_path), "--quiet"])
    assert r.exit_code == 2 and f"{bad} is not a sambench results CSV" in r.output
    assert bad.read_bytes() == before and not (tmp_path / "runs").exists()
    r = runner.invoke(app, ["report", "--results-dir", str(tmp_path)])
    assert r.exit_code == 2 and str(bad) in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("workers", ["0", "1"])
def test_broken_image_named_in_one_line(tmp_path, workers):
    from tasks.imagenet import write_fake_imagenet
    write_fake_imagenet(tmp_path / "in", classes=2, per_class=4)
    broken = sorted((tmp_path / "in" / "train" / "n00000001").glob("*.JPEG"))[0]
    broken.write_bytes(broken.read_bytes()[:100])
    r = runner.invoke(app, ["run", "imagenet", "--model", "resnet10t", "--epochs", "1", "--batch-size", "4",
                            "--workers", workers, "--data-dir", str(tmp_path / "in"), "--results-dir",
                            str(tmp_path / "res"), "--quiet"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: broken image") and str(broken) in lines[0]
    assert not (tmp_path / "res" / "imagenet.csv").exists()


def test_config_file(tmp_path, data):
    good = tmp_path / "run.toml"
    good.write_text('model = "resnet20"\nepochs = 1\nbatch_size = 64\nrho = 0.07\nminimizer = "sam"\n')
    r = runner.invoke(app, ["run", "cifar10", "--config", str(good), "--workers", "0", "--data-dir", str(data),
                            "--results-dir", str(tmp_path), "--quiet", "--epochs", "1"])
    assert r.exit_code == 0, r.output
    row = pd.read_csv(tmp_path / "cifar10.csv").iloc[0]
    assert (row.rho, row.batch_size, row.minimizer) == (0.07, 64, "sam")
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = 1\nlearning_rate = 0.1\n")
    r = runner.invoke(app, ["run", "cifar10", "--config", str(bad)])
    assert r.exit_code == 2 and f"config file {bad}: unknown key(s) learning_rate" in r.output
    r = runner.invoke(app, ["run", "cifar10", "--config", str(tmp_path / "missing.toml")])
    assert r.exit_code == 2 and "not found" in r.output
