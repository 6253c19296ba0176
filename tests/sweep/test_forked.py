"""A CPU sweep starts its runs from a torch-loaded server (bench.sweep.forked): each run still trains as a fresh
process would, bit for bit, in the sweeper's environment and folder, writes its own output.log, and stops,
dies and fails as a fresh process does."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from bench.recipes import make_config
from bench.sweep import forked

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def probe(argv: list[str]) -> int:
    """An entry run in the forked process in place of the child's main: what a run would find there."""
    had_torch = "torch" in sys.modules  # imported by the server before the fork
    import torch
    print("to the log")
    print("and stderr too", file=sys.stderr)
    Path(argv[0]).write_text(json.dumps({
        "had_torch": had_torch, "start_method": mp.get_start_method(), "threads": torch.get_num_threads(),
        "cwd": os.getcwd(), "probe": os.environ.get("PROBE"), "argv": argv}))
    if argv[1] == "sleep":
        time.sleep(60)
    return int(argv[1])


def _server_env(**extra) -> dict[str, str]:
    """This process's environment with the thread counts the server started with (another test may have
    started it), so a fresh process compares like with like."""
    forked.context()
    env = {**os.environ, **extra}
    for key, value in zip(forked.THREADS, forked._server_threads or (None,) * len(forked.THREADS)):
        env.pop(key, None)
        if value is not None:
            env[key] = value
    return env


def test_a_forked_run_starts_as_a_fresh_process_would(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = _server_env(PROBE="from the sweeper")
    proc = forked.ForkedRun([str(tmp_path / "seen.json"), "3"], env, tmp_path / "output.log", entry=probe)
    assert proc.wait() == 3  # its exit status is the entry's
    seen = json.loads((tmp_path / "seen.json").read_text())
    fresh = subprocess.run([sys.executable, "-c", "import multiprocessing as mp, torch; "
                            "print(mp.get_start_method(), torch.get_num_threads())"],
                           capture_output=True, text=True, env=env, check=True).stdout.split()
    assert seen["had_torch"] and seen["probe"] == "from the sweeper" and seen["cwd"] == str(tmp_path)
    assert [seen["start_method"], str(seen["threads"])] == fresh  # data-loader workers start as a fresh run's
    assert (tmp_path / "output.log").read_text() == "to the log\nand stderr too\n"


def test_a_forked_run_is_stopped_alone(tmp_path):
    proc = forked.ForkedRun([str(tmp_path / "seen.json"), "sleep"], _server_env(), tmp_path / "log", entry=probe)
    while not (tmp_path / "seen.json").exists():
        time.sleep(0.05)
    proc.terminate()  # what a lost claim does (bench.store.claims.Heartbeat)
    assert proc.wait() == -signal.SIGTERM
    again = forked.ForkedRun([str(tmp_path / "again.json"), "0"], _server_env(), tmp_path / "log", entry=probe)
    assert again.wait() == 0  # the server lives on for the next run


@pytest.mark.parametrize("device, world_size, environ, expected", [
    ("cpu", 1, {}, True),
    ("cpu", 1, {forked.OFF: "0"}, True),
    ("cpu", 1, {forked.OFF: "1"}, False),       # the user's way out
    ("cuda", 1, {}, False),                      # a GPU run keeps a fresh process
    ("auto", 1, {}, False),
    ("cpu", 2, {}, False),                       # torchrun's processes
])
def test_which_runs_are_forked(device, world_size, environ, expected):
    cfg = make_config("digits-noise", minimizer="sgd", device=device, world_size=world_size)
    before = forked._server_threads
    try:
        forked._server_threads = None
        assert forked.wanted(cfg, environ) is expected
    finally:
        forked._server_threads = before


def test_a_run_under_other_thread_counts_than_the_servers_starts_fresh():
    cfg = make_config("digits-noise", minimizer="sgd", device="cpu")
    before = forked._server_threads
    try:
        forked._server_threads = ("1", None, None)
        assert forked.wanted(cfg, {"OMP_NUM_THREADS": "1"})
        assert not forked.wanted(cfg, {"OMP_NUM_THREADS": "2"}) and not forked.wanted(cfg, {})
    finally:
        forked._server_threads = before


# ---- whole sweeps, forked and fresh --------------------------------------------------------------------

DRIVER = """
import sys
from bench.registry import tables_file
from bench.sweep.sweeper import Sweeper
from bench.tables.layout import load_tables
from bench.tables.plan import plan
plans = plan(load_tables(tables_file()), ["demo"], "demo", results_dir=sys.argv[1], workers=0, device="cpu", seeds=1)
plans[0].runs = [c for c in plans[0].runs if c.noise == 0.4][:int(sys.argv[2])]
print("sweep", dict(Sweeper(plans, sys.argv[1], poll=0.2).run()), flush=True)
"""
NOT_COMPARED = ("train_time_s", "wall_time_s", "timestamp", "images_per_s", "checkpoint_s", "compile_s",
                "target_wall_s", "results_dir")


def _sweep(res: Path, runs: int, fresh: bool, **kw) -> subprocess.Popen:
    env = {**ENV, forked.OFF: "1" if fresh else "0"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(res), str(runs)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **kw)


def test_forked_runs_train_bit_for_bit_as_fresh_ones(tmp_path):
    out = {}
    for fresh in (True, False):
        proc = _sweep(tmp_path / str(fresh), 2, fresh)
        text = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0 and "'ok': 2" in text, text
        out[fresh] = pd.read_csv(tmp_path / str(fresh) / "digits-noise.csv").sort_values("run_id")
        log = (tmp_path / str(fresh) / "runs" / out[fresh].run_id.iloc[0] / "output.log").read_text()
        assert f"{out[fresh].run_id.iloc[0]}: ok" in log  # the run's own output, where a fresh run writes it
    same = [c for c in out[True].columns if c not in NOT_COMPARED]
    pd.testing.assert_frame_equal(out[True][same].reset_index(drop=True), out[False][same].reset_index(drop=True))


@pytest.mark.parametrize("fresh", [False, True], ids=["forked", "fresh"])
def test_ctrl_c_stops_a_sweep_at_an_epoch_end_and_it_resumes(tmp_path, fresh):
    """Ctrl-C in a terminal reaches the whole process group: the sweeper, the server (which ignores it) and
    the run, which finishes its epoch, keeps its checkpoint and exits 130; the sweeper starts nothing new."""
    res = tmp_path / "res"
    proc = _sweep(res, 2, fresh, start_new_session=True)
    t0 = time.time()
    while not list(res.glob("runs/*/checkpoint.pt")):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() - t0 < 120
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    text = proc.communicate(timeout=120)[0]
    assert "its checkpoint stays; run the same command again to resume" in text, text
    run = next(res.glob("runs/*/checkpoint.pt")).parent
    assert "interrupted" in (run / "output.log").read_text()
    assert not (res / "digits-noise.csv").exists() and len(list(res.glob("runs/*"))) == 1  # nothing new started
    again = _sweep(res, 2, fresh)
    text = again.communicate(timeout=300)[0]
    assert again.returncode == 0 and "'ok': 2" in text, text
    df = pd.read_csv(res / "digits-noise.csv").set_index("run_id")
    assert len(df) == 2 and df.resumptions[run.name] == 1 and "resuming" in (run / "output.log").read_text()
