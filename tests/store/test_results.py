"""Results rows: run ids, atomic appends (also from several processes), widening headers."""
import csv
import multiprocessing as mp

import pandas as pd

from bench.config import RunConfig
from bench.store.files import append_row
from bench.store.provenance import git_commit, provenance


def test_run_id_hashes_identity_not_location():
    a = RunConfig.of(task="cifar10", model="resnet20", minimizer="sam", rho=0.05)
    assert a.run_id == RunConfig.of(task="cifar10", model="resnet20", minimizer="sam", rho=0.05,
                                 device="cuda", workers=8, results_dir="elsewhere", data_dir="/d").run_id
    assert a.run_id != RunConfig.of(task="cifar10", model="resnet20", minimizer="sam", rho=0.1).run_id
    assert a.run_id != RunConfig.of(task="cifar10", model="resnet20", minimizer="sam", rho=0.05, seed=1).run_id
    assert a.run_id.startswith("cifar10-resnet20-sam-s0-")


def test_append_widens_header(tmp_path):
    path = tmp_path / "r.csv"
    append_row(path, {"a": 1, "b": 0.1})
    append_row(path, {"a": 2, "b": 0.2, "c": "x"})
    append_row(path, {"a": 3, "c": "y"})
    df = pd.read_csv(path)
    assert list(df.columns) == ["a", "b", "c"]
    assert list(df.a) == [1, 2, 3] and df.b.iloc[1] == 0.2 and df.c.iloc[2] == "y"
    assert pd.isna(df.c.iloc[0]) and pd.isna(df.b.iloc[2])


def test_floats_round_trip_exactly(tmp_path):
    path = tmp_path / "r.csv"
    x = 0.1 + 0.2
    append_row(path, {"x": x})
    with open(path) as f:
        assert float(next(csv.DictReader(f))["x"]) == x


def _appender(path, worker, n):
    for i in range(n):
        append_row(path, {"worker": worker, "i": i, "payload": "x" * 200})
        if i == n // 2 and worker == 0:
            append_row(path, {"worker": worker, "i": -1, "payload": "widen", "extra": 1})


def test_concurrent_appends_from_processes(tmp_path):
    path = tmp_path / "r.csv"
    procs = [mp.get_context("fork").Process(target=_appender, args=(path, w, 50)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    df = pd.read_csv(path)
    assert len(df) == 4 * 50 + 1
    for w in range(4):
        assert sorted(df[(df.worker == w) & (df.i >= 0)].i) == list(range(50))
    assert (df.payload.str.len() >= 5).all()


def test_provenance_names_versions_and_commit():
    p = provenance("cpu")
    assert p["torch_version"] and p["python_version"] and p["device_name"] == "cpu"
    assert p["git_commit"] == git_commit()


def test_records_keep_one_row_per_run_id_and_legacy_rows(tmp_path):
    from bench.store.records import read_record, rebuild_csv, result_rows, write_record
    legacy = {"run_id": "old", "task": "t", "status": "ok", "x": "1"}
    append_row(tmp_path / "t.csv", legacy)
    append_row(tmp_path / "t.csv", {**legacy, "x": "2"})  # an old folder's duplicate: the last one wins
    write_record(tmp_path, {"run_id": "a", "task": "t", "status": "failed", "note": "boom"})
    write_record(tmp_path, {"run_id": "a", "task": "t", "status": "ok", "acc": 0.1 + 0.2, "nan": float("nan")})
    df = pd.read_csv(tmp_path / "t.csv")
    assert list(df.run_id) == ["old", "a"] and df.run_id.is_unique
    assert df.x[0] == 2 and df.status[1] == "ok" and df.acc[1] == 0.1 + 0.2 and pd.isna(df["nan"][1])
    assert read_record(tmp_path, "a")["status"] == "ok"
    write_record(tmp_path, {"run_id": "old", "task": "t", "status": "ok", "x": 3})  # a record replaces it
    df = pd.read_csv(tmp_path / "t.csv").set_index("run_id")
    assert len(df) == 2 and df.x["old"] == 3
    # a crash between the record and the CSV rebuild: the CSV is behind, never doubled; rebuilding repairs it
    (tmp_path / "runs" / "b").mkdir()
    (tmp_path / "runs" / "b" / "result.json").write_text('{"run_id": "b", "task": "t", "status": "ok"}')
    assert "b" not in set(pd.read_csv(tmp_path / "t.csv").run_id)
    assert {r["run_id"] for r in result_rows(tmp_path)} == {"old", "a", "b"}
    rebuild_csv(tmp_path, "t")
    assert sorted(pd.read_csv(tmp_path / "t.csv").run_id) == ["a", "b", "old"]
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob("runs/*/.*.tmp"))
