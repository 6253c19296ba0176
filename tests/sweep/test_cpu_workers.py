"""Local CPU workers (`--launcher local --workers-per-node N` without --gpus) share the machine's cores: each
runs torch with cores // N threads (OMP_NUM_THREADS) unless the caller set a number."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.sweep import launch


@pytest.mark.parametrize("workers, cores, environ, expected", [
    (2, 2, {}, {"OMP_NUM_THREADS": "1"}),
    (4, 16, {}, {"OMP_NUM_THREADS": "4"}),
    (3, 2, {}, {"OMP_NUM_THREADS": "1"}),              # more workers than cores: one thread each, never 0
    (1, 16, {}, {}),                                    # one worker: torch's own default
    (2, 2, {"OMP_NUM_THREADS": "2"}, {}),               # the caller's choice stands
])
def test_each_worker_gets_its_share_of_the_cores(monkeypatch, workers, cores, environ, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert launch.cpu_worker_env(workers, environ) == expected


@dataclass
class _ThreadSpec:
    """A sweep spec whose workers, instead of sweeping, write the OMP_NUM_THREADS they run under."""
    out: str
    results_dir: str
    device: str = "cpu"

    def sweeper(self, label: str) -> _ThreadSweeper:
        return _ThreadSweeper(Path(self.out) / label.replace(" ", "_"))


@dataclass
class _ThreadSweeper:
    path: Path

    def run(self) -> dict[str, int]:
        self.path.write_text(os.environ.get("OMP_NUM_THREADS", "<unset>"))
        return {"ok": 0}

    def say(self, text: str) -> None:
        pass


def test_spawned_cpu_workers_run_under_their_share(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert launch.run_local(_ThreadSpec(str(tmp_path), str(tmp_path)), None, 2) == [0, 0]
    share = str(max(1, cores // 2))
    assert [(tmp_path / f"worker_{i}").read_text() for i in (0, 1)] == [share, share]
