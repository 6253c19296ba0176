"""`--download` under concurrency (issue 19): one process downloads, the others wait and read the finished data.

torchvision's network fetch (`download_url`) is replaced by a fake that serves synthetic files, written slowly and
stamped in a shared log; the rest is torchvision's and the tasks' own: the md5 checks (with the fake files' sums
patched into the dataset classes, no SYNTHETIC marker), the archive extraction, the loading."""
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import tarfile
import time
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as tmp_mp
from torchvision import datasets
from torchvision.datasets import svhn as tv_svhn
from torchvision.datasets import utils as tv_utils

import tasks.fashion_mnist as F
from bench.errors import UserError
from bench.registry import get_task
from bench.recipes import make_config
from tasks.cifar import write_fake_cifar
from tasks.fashion_mnist import write_fake_fashion_mnist
from tasks.svhn import write_fake_svhn

CHUNKS, PAUSE = 4, 0.08  # each served file is written in CHUNKS parts, PAUSE seconds apart


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _stamp(log: Path, event: str, name: str) -> None:
    rank = dist.get_rank() if dist.is_initialized() else -1
    with open(log, "a") as f:  # one short appended line per event: atomic enough between processes
        f.write(json.dumps({"event": event, "pid": os.getpid(), "rank": rank, "name": name, "t": time.time()}) + "\n")


def _events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _serve(monkeypatch, payloads: dict[str, bytes], log: Path, fail: bool = False) -> None:
    """Replace torchvision's download_url (also SVHN's own import of it) by a slow local copy of `payloads`."""
    def download_url(url, root, filename=None, md5=None, max_redirect_hops=3):
        name = os.path.basename(filename or url)
        path = os.path.join(os.path.expanduser(root), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if tv_utils.check_integrity(path, md5):  # as the real one: a complete file is not fetched again
            return
        _stamp(log, "start", name)
        if fail:
            time.sleep(CHUNKS * PAUSE)
            _stamp(log, "fail", name)
            raise URLError("[Errno 101] Network is unreachable")
        data, step = payloads[name], -(-len(payloads[name]) // CHUNKS)
        with open(path, "wb") as f:
            for i in range(0, len(data), step):
                f.write(data[i:i + step])
                f.flush()
                time.sleep(PAUSE)
        _stamp(log, "end", name)
        if not tv_utils.check_integrity(path, md5):
            raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(tv_utils, "download_url", download_url)
    monkeypatch.setattr(tv_svhn, "download_url", download_url)


def _digest(task_name: str, data_dir, train: bool, download: bool) -> str:
    cfg = make_config(task_name, minimizer="sgd", data_dir=str(data_dir), download=download)
    ds = get_task(task_name).load(cfg, train)
    return _md5(np.ascontiguousarray(ds.data).tobytes() + np.asarray(ds.targets, dtype=np.int64).tobytes())


def _cifar10(staging: Path, monkeypatch) -> dict[str, bytes]:
    folder = write_fake_cifar(staging, "cifar10", 60, 20)
    md5 = {p.name: _md5(p.read_bytes()) for p in folder.iterdir() if p.name != "SYNTHETIC"}
    cls = datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[name, md5[name]] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, md5[name]] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5[cls.meta["filename"]]})
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for p in sorted(folder.iterdir()):
            if p.name != "SYNTHETIC":
                tar.add(p, arcname=f"{cls.base_folder}/{p.name}")
    monkeypatch.setattr(cls, "tgz_md5", _md5(archive.getvalue()))
    return {cls.filename: archive.getvalue()}


def _svhn(staging: Path, monkeypatch) -> dict[str, bytes]:
    folder = write_fake_svhn(staging, 40, 20)
    payloads = {name: (folder / name).read_bytes() for _, name, _ in datasets.SVHN.split_list.values()}
    monkeypatch.setattr(datasets.SVHN, "split_list", {split: [url, name, _md5(payloads[name])]
                                                      for split, (url, name, _) in datasets.SVHN.split_list.items()})
    return {name: payloads[name] for name in ("train_32x32.mat", "extra_32x32.mat")}  # the training splits


def _fmnist(staging: Path, monkeypatch) -> dict[str, bytes]:
    folder = write_fake_fashion_mnist(staging, 60, 20)
    payloads = {p.name: p.read_bytes() for p in folder.iterdir() if p.name.endswith(".gz")}
    monkeypatch.setattr(datasets.FashionMNIST, "resources", [(name, _md5(data)) for name, data in payloads.items()])
    monkeypatch.setattr(datasets.FashionMNIST, "mirrors", ["http://fake.invalid/"])
    monkeypatch.setattr(F, "SYSTEM_DIR", staging / "not-installed")
    return payloads


SERVED = {"cifar10": _cifar10, "svhn": _svhn, "fashion-mnist": _fmnist}


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A dataset's fake files on the fake server: (the data folder to download into, the log, the expected
    digest of the training set)."""
    def serve(task_name: str, fail: bool = False):
        staging = tmp_path / "staging"
        payloads = SERVED[task_name](staging, monkeypatch)
        _serve(monkeypatch, payloads, tmp_path / "downloads.log", fail)
        expected = None if fail else _digest(task_name, staging, True, download=False)
        return tmp_path / "data", tmp_path / "downloads.log", expected, payloads
    return serve


def _load_in_child(task_name, data_dir, go, out):
    go.wait()
    try:
        result = {"digest": _digest(task_name, data_dir, True, download=True)}
    except UserError as e:
        result = {"error": str(e)}
    Path(out).write_text(json.dumps(result))


@pytest.mark.parametrize("task_name", ["cifar10", "svhn", "fashion-mnist"])
def test_concurrent_downloads_fetch_once(served, tmp_path, task_name):
    """Three processes load with --download at once: each file is downloaded once, all read the full data."""
    data_dir, log, expected, payloads = served(task_name)
    ctx = multiprocessing.get_context("fork")  # the fake server and md5 patches travel with the fork
    go = ctx.Event()
    outs = [tmp_path / f"out{i}.json" for i in range(3)]
    procs = [ctx.Process(target=_load_in_child, args=(task_name, data_dir, go, out)) for out in outs]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(60)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0, 0]
    starts = [e["name"] for e in _events(log) if e["event"] == "start"]
    assert sorted(starts) == sorted(payloads), _events(log)  # each file once
    results = [json.loads(out.read_text()) for out in outs]
    assert results == [{"digest": expected}] * 3  # nobody read a half-written file


def _rank_main(rank, world, rdv, data_dir, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    t0 = time.time()
    try:
        result = {"digest": _digest("cifar10", data_dir, True, download=True)}
    except UserError as e:
        result = {"error": str(e)}
    result["seconds"] = time.time() - t0
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _run_ranks(tmp_path, data_dir, timeout=60.0) -> list[dict]:
    """Two gloo ranks loading CIFAR-10 with --download; a rank still running after `timeout` fails the test."""
    ctx = tmp_mp.start_processes(_rank_main, args=(2, str(tmp_path / "rdv"), str(data_dir), str(tmp_path)),
                                 nprocs=2, start_method="fork", join=False)
    deadline = time.time() + timeout
    while not ctx.join(timeout=0.5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks still running after {timeout:.0f} s (a hang)")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_torchrun_rank0_downloads_and_rank1_waits(served, tmp_path):
    data_dir, log, expected, _ = served("cifar10")
    r0, r1 = _run_ranks(tmp_path, data_dir)
    events = _events(log)
    assert [(e["event"], e["rank"]) for e in events] == [("start", 0), ("end", 0)]
    assert r0["digest"] == expected and r1["digest"] == expected


def test_rank0_download_failure_leaves_no_rank_hanging(served, tmp_path):
    """No network: rank 0 fails with the one-line UserError; rank 1 does not wait for ever, and tries only
    once rank 0 has given up (never at the same time)."""
    data_dir, log, _, _ = served("cifar10", fail=True)
    r0, r1 = _run_ranks(tmp_path, data_dir)
    assert r0["error"].startswith(f"could not download cifar10 into {data_dir}: ") and "unreachable" in r0["error"]
    assert "error" in r1 and "\n" not in r0["error"] + r1["error"]
    assert r0["seconds"] < 20 and r1["seconds"] < 20
    events = _events(log)
    assert [(e["event"], e["rank"]) for e in events][:2] == [("start", 0), ("fail", 0)]
    assert all(e["t"] >= events[1]["t"] for e in events[2:])


def _hold_lock(path, held, release):
    from filelock import FileLock
    with FileLock(path):
        held.set()
        release.wait(30)


def test_lock_wait_timeout_names_the_lock(served, tmp_path, monkeypatch):
    data_dir, log, _, _ = served("cifar10")
    monkeypatch.setattr("bench.download.WAIT_S", 0.5)
    lock = data_dir / "cifar-10-batches-py.lock"
    data_dir.mkdir()
    ctx = multiprocessing.get_context("fork")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(lock), held, release))
    holder.start()
    try:
        assert held.wait(10)
        with pytest.raises(UserError) as e:
            _digest("cifar10", data_dir, True, download=True)
    finally:
        release.set()
        holder.join(10)
    msg = str(e.value)
    assert str(lock) in msg and "delete" in msg and "\n" not in msg
    assert _events(log) == []  # waited, downloaded nothing


def test_second_process_after_the_first_downloads_nothing(served, tmp_path):
    """Complete data is found complete under the lock: nothing fetched, nothing extracted again."""
    data_dir, log, expected, _ = served("cifar10")
    assert _digest("cifar10", data_dir, True, download=True) == expected
    archive = data_dir / datasets.CIFAR10.filename
    batch = data_dir / "cifar-10-batches-py" / "data_batch_1"
    before = batch.stat().st_mtime_ns
    shutil.move(archive, tmp_path / "archive-moved-away")  # an extraction now would fail loudly
    assert _digest("cifar10", data_dir, True, download=True) == expected
    assert batch.stat().st_mtime_ns == before and len(_events(log)) == 2
