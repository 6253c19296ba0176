"""Sweeps at scale: claims, several sweepers on one folder, a killed sweeper's run taken over, the local
and SLURM (submitit's local executor) launchers, --status, and the one-line errors."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pandas as pd
import pytest
from typer.testing import CliRunner

from bench.cli.main import app
from bench.errors import UserError
from bench.store.records import read_record
from bench.store.claims import Claims
from bench.sweep import forked
from bench.sweep.launch import sbatch_text, slurm_parameters

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SMOKE6 = ["reproduce", "asam6", "--preset", "smoke", "--device", "cpu", "--workers", "0", "--poll", "0.2"]


def bench(*args):
    return [sys.executable, "-m", "bench", *args]


def rows(res, task="cifar10-noise"):
    return pd.read_csv(res / f"{task}.csv")


# ---- claims -------------------------------------------------------------------------------------------

def _grab(res, run_id, out):
    claim, _, _ = Claims(res).acquire(run_id)
    out.put(claim is not None)
    time.sleep(1.0)  # hold it while the others try


def test_exactly_one_of_many_processes_gets_a_claim(tmp_path):
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_grab, args=(tmp_path, "r1", q)) for _ in range(6)]
    for p in procs:
        p.start()
    got = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    assert sum(got) == 1


def test_claim_is_taken_over_only_when_its_owner_is_gone(tmp_path):
    claims = Claims(tmp_path, stale_after=5)
    mine, found, _ = claims.acquire("r")
    assert mine is not None and found is None
    other = subprocess.run([sys.executable, "-c", "import sys; from bench.store.claims import Claims; "
                            "c, f, w = Claims(sys.argv[1]).acquire('r'); print(c is None, f.pid)", str(tmp_path)],
                           capture_output=True, text=True, env=ENV)
    assert other.stdout.split() == ["True", str(os.getpid())]  # held by a live process: refused
    assert claims.beat(mine)
    claims.release(mine)
    assert claims.read("r") is None
    # owner died (a pid that is gone on this host)
    dead = subprocess.run([sys.executable, "-c", "import sys; from bench.store.claims import Claims; "
                           "Claims(sys.argv[1]).acquire('r2')", str(tmp_path)], env=ENV)
    assert dead.returncode == 0
    taken, found, why = claims.acquire("r2")
    assert taken is not None and "is gone" in why
    # another host's claim without a heartbeat for longer than stale_after
    record = json.loads(claims.path("r2").read_text())
    claims.path("r3").parent.mkdir(parents=True)
    claims.path("r3").write_text(json.dumps({**record, "run_id": "r3", "host": "node7", "heartbeat": time.time()}))
    assert claims.acquire("r3")[0] is None
    claims.path("r3").write_text(json.dumps({**record, "run_id": "r3", "host": "node7",
                                             "heartbeat": time.time() - 60}))
    taken, found, why = claims.acquire("r3")
    assert taken is not None and found.host == "node7" and "no heartbeat" in why
    # a lost claim: the old owner's heartbeat says so
    assert not claims.beat(mine)


def test_corrupt_claim_is_one_line(tmp_path):
    claims = Claims(tmp_path)
    claims.path("r").parent.mkdir(parents=True)
    claims.path("r").write_text("{not json")
    with pytest.raises(UserError, match=r"claim file .*claim.json is corrupt .*delete it"):
        claims.acquire("r")


# ---- bench run: one row per run id --------------------------------------------------------------------

def test_run_again_is_already_done_and_force_replaces(tmp_path, fake_cifar10):
    args = ["run", "cifar10", "--epochs", "1", "--batch-size", "50", "--device", "cpu", "--workers", "0",
            "--data-dir", str(fake_cifar10), "--results-dir", str(tmp_path), "--quiet", "--keep-checkpoint"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    first = rows(tmp_path, "cifar10")
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "already done: cifar10-resnet20-sgd-s0-" in r.output and "--force" in r.output
    pd.testing.assert_frame_equal(rows(tmp_path, "cifar10"), first)  # nothing trained, nothing appended
    r = CliRunner().invoke(app, args + ["--force"])
    assert r.exit_code == 0, r.output
    again = rows(tmp_path, "cifar10")
    assert len(again) == 1 and again.timestamp[0] >= first.timestamp[0]


def test_a_run_held_by_a_live_process_is_refused(tmp_path, fake_cifar10):
    from bench.recipes import make_config
    cfg = make_config("cifar10", minimizer="sgd", epochs=1, device="cpu", results_dir=str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from bench.store.claims import Claims; "
                               "Claims(sys.argv[1]).acquire(sys.argv[2]); print('held', flush=True); time.sleep(60)",
                               str(tmp_path), cfg.run_id], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = CliRunner().invoke(app, ["run", "cifar10", "--epochs", "1", "--device", "cpu", "--results-dir",
                                     str(tmp_path), "--data-dir", str(fake_cifar10), "--quiet"])
        assert r.exit_code == 2 and f"run {cfg.run_id} is being trained by" in r.output
        assert f"pid {holder.pid}" in r.output and not (tmp_path / "cifar10.csv").exists()
    finally:
        holder.kill()


# ---- sweepers -----------------------------------------------------------------------------------------

def test_three_sweepers_share_one_plan(tmp_path):
    res = tmp_path / "res"
    args = bench(*SMOKE6, "--seeds", "2", "--results-dir", str(res))
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
             for _ in range(3)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    df = rows(res)
    assert len(df) == 6 and df.run_id.is_unique and (df.status == "ok").all()
    starts = Counter(line.split()[-6] for out in outs for line in out.splitlines() if " start " in f" {line}")
    assert set(starts) == set(df.run_id) and set(starts.values()) == {1}  # every run trained exactly once
    for run_id in df.run_id:
        log = (res / "runs" / run_id / "output.log").read_text()
        assert log.count(f"{run_id}: ok") == 1 and "resuming" not in log
        assert not (res / "runs" / run_id / "claim.json").exists()  # released
    status = CliRunner().invoke(app, ["reproduce", "asam6", "--preset", "smoke", "--seeds", "2", "--status",
                                      "--results-dir", str(res)])
    assert status.exit_code == 0 and "asam6 (cifar10-noise): 6 runs: 6 done, 0 running, 0 failed, 0 to do" in status.output


DRIVER = """
import sys
from bench.tables.plan import plan
from bench.sweep.sweeper import Sweeper
from bench.registry import tables_file
from bench.tables.layout import load_tables
t6 = dict(load_tables(tables_file())["asam6"])
t6["presets"] = {"smoke": {"rows": ["40 %"], "seeds": 1, "synthetic": [512, 64],
                           "settings": {"model": "resnet20", "epochs": 3, "batch_size": 16}}}
plans = plan({"asam6": t6}, [], "smoke", results_dir=sys.argv[1], workers=0, device="cpu")
plans[0].runs = plans[0].runs[:1]
print("sweep", Sweeper(plans, sys.argv[1], poll=0.2, stale_after=float(sys.argv[2])).run(), flush=True)
"""


@pytest.mark.parametrize("fresh", ["0", "1"], ids=["forked", "fresh"])  # bench.sweep.forked, or not
def test_killed_sweepers_run_is_taken_over_and_resumed(tmp_path, fresh):
    res = tmp_path / "res"
    env = {**ENV, forked.OFF: fresh}
    first = subprocess.Popen([sys.executable, "-c", DRIVER, str(res), "600"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env)
    t0 = time.time()
    while not list(res.glob("runs/*/checkpoint.pt")):
        assert first.poll() is None, first.communicate()[0]
        assert time.time() - t0 < 300
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    run = next(res.glob("runs/*/checkpoint.pt")).parent
    claim = json.loads((run / "claim.json").read_text())
    assert claim["pid"] == first.pid  # the dead sweeper's claim is still there
    time.sleep(1.0)  # the run's own process dies with its sweeper (no orphan keeps training)
    assert "-> ok" not in (run / "output.log").read_text() and not (res / "cifar10-noise.csv").exists()
    second = subprocess.run([sys.executable, "-c", DRIVER, str(res), "600"], capture_output=True, text=True,
                            env=env, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"taking over {run.name} from" in second.stdout and f"pid {first.pid} is gone" in second.stdout
    log = (run / "output.log").read_text()
    assert "resuming" in log and log.count(f"{run.name}: ok") == 1  # trained to the end once, resumed
    df = rows(res)
    assert len(df) == 1 and df.status[0] == "ok" and df.epochs_done[0] == 3 and df.resumptions[0] == 1
    assert read_record(res, run.name)["status"] == "ok"


def test_local_launcher_runs_each_planned_run_once(tmp_path):
    res = tmp_path / "res"
    r = subprocess.run(bench(*SMOKE6, "--results-dir", str(res), "--launcher", "local", "--workers-per-node", "2"),
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[worker 0]" in r.stdout and "[worker 1]" in r.stdout and "2 workers finished" in r.stdout
    df = rows(res)
    assert len(df) == 3 and df.run_id.is_unique and (df.status == "ok").all()
    assert sum(line.count(" start ") for line in r.stdout.splitlines()) == 3


def test_slurm_launcher_through_submitit(tmp_path):
    pytest.importorskip("submitit")
    res = tmp_path / "res"
    r = subprocess.run(bench(*SMOKE6, "--results-dir", str(res), "--launcher", "slurm", "--slurm-cluster",
                             "local", "--gpus-per-run", "0", "--time", "30"),
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitted 3 runs as job array" in r.stdout and "--status" in r.stdout
    df = rows(res)
    assert len(df) == 3 and (df.status == "ok").all() and (df.world_size == 1).all()
    again = subprocess.run(bench(*SMOKE6, "--results-dir", str(res), "--launcher", "slurm", "--slurm-cluster",
                                 "local", "--gpus-per-run", "0"), capture_output=True, text=True, env=ENV)
    assert "submitted 0 runs" in again.stdout  # nothing left to do


def test_slurm_sbatch_parameters(tmp_path):
    pytest.importorskip("submitit")
    params = slurm_parameters(partition="gpu", time_min=120, gpus_per_run=4, nodes_per_run=2, max_parallel=8,
                              cpus_per_gpu=6, options={"account": "proj", "constraint": "h100"}, name="sambench")
    text = sbatch_text({**params, "map_count": 40}, tmp_path)
    for line in ["#SBATCH --partition=gpu", "#SBATCH --time=120", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=6", "#SBATCH --array=0-39%8",
                 "#SBATCH --account=proj", "#SBATCH --constraint=h100", "#SBATCH --job-name=sambench"]:
        assert line in text, text
    r = CliRunner().invoke(app, ["reproduce", "asam2", "--launcher", "slurm", "--dry-run", "--partition", "gpu",
                                 "--gpus-per-run", "4", "--nodes-per-run", "2", "--max-parallel", "8",
                                 "--slurm-option", "account=proj", "--results-dir", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert "would submit 120 array tasks" in r.output and "#SBATCH --array=0-119%8" in r.output
    assert "--ntasks-per-node=4" in r.output and "#SBATCH --account=proj" in r.output


# ---- bad input: one line, exit 2, nothing touched ------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--status", "--results-dir", "{tmp}/nowhere"], "no results folder"),
    (["--status", "--results-dir", "{tmp}/afile"], "is a file, not a results folder"),
    (["--launcher", "local", "--results-dir", "{tmp}/foreign"], "is not a sambench results folder"),
    (["--launcher", "kubernetes"], "unknown launcher 'kubernetes'; choose one of: local, slurm"),
    (["--launcher", "local", "--gpus", "7"], "GPU 7 does not exist"),
    (["--launcher", "local", "--gpus", "zero"], "--gpus takes GPU indices"),
    (["--launcher", "slurm", "--slurm-option", "account"], "--slurm-option takes KEY=VALUE"),
    (["--launcher", "slurm"], "cannot submit to SLURM here"),
])
def test_sweep_bad_input(tmp_path, extra, message):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.csv").write_text("a,b\n1,2\n")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    args = ["reproduce", "asam6", "--preset", "smoke", "--results-dir", str(tmp_path / "r"),
            *[a.format(tmp=tmp_path) for a in extra]]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_status_names_a_corrupt_claim(tmp_path):
    from bench.registry import tables_file
    from bench.tables.layout import load_tables
    from bench.tables.plan import plan
    cfg = plan(load_tables(tables_file()), ["asam6"], "smoke", results_dir=str(tmp_path))[0].runs[0]
    claims = Claims(tmp_path)
    status = ["reproduce", "asam6", "--preset", "smoke", "--status", "--results-dir", str(tmp_path)]
    r = CliRunner().invoke(app, status)
    assert r.exit_code == 0 and "asam6 (cifar10-noise): 3 runs: 0 done, 0 running, 0 failed, 3 to do" in r.output
    claims.acquire(cfg.run_id)
    r = CliRunner().invoke(app, status)
    assert f"running  {cfg.run_id}  on " in r.output and "heartbeat 0 s ago" in r.output
    claims.path(cfg.run_id).write_text("garbage")
    r = CliRunner().invoke(app, status)
    assert r.exit_code == 2 and "is corrupt" in r.output and "delete it" in r.output
    assert claims.path(cfg.run_id).read_text() == "garbage"


def test_slurm_without_submitit_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    r = CliRunner().invoke(app, ["reproduce", "asam6", "--preset", "smoke", "--launcher", "slurm",
                                 "--results-dir", str(tmp_path / "r")])
    assert r.exit_code == 2 and "--launcher slurm needs submitit: pip install 'sambench[cluster]'" in r.output
    assert not (tmp_path / "r").exists()


def test_failure_record_keeps_first_line_log_and_oom_hint(tmp_path):
    import torch

    from bench.recipes import make_config
    from bench.train.runner import record_failure
    cfg = make_config("cifar10", minimizer="sam", results_dir=str(tmp_path))
    row = record_failure(cfg, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"),
                         "Traceback (most recent call last):\n  ...\n")
    log = tmp_path / "runs" / cfg.run_id / "error.log"
    assert row["status"] == "failed" and log.read_text().startswith("Traceback")
    assert row["note"] == ("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB; out of memory: lower "
                           "batch_size (now 128 per replica, e.g. --batch-size 64), or use --precision bf16, or "
                           f"spread the run over more GPUs (traceback: {log})")
    assert rows(tmp_path, "cifar10").note[0] == row["note"]


def test_status_on_a_folder_with_a_binary_csv_is_one_line(tmp_path):
    (tmp_path / "junk.csv").write_bytes(b"\xff\xfe\x00binary")
    r = CliRunner().invoke(app, ["reproduce", "asam6", "--preset", "smoke", "--status", "--results-dir", str(tmp_path)])
    assert r.exit_code == 2 and "is not a sambench results folder (junk.csv: UnicodeDecodeError)" in r.output
