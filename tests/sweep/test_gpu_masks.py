"""Which GPU a process takes (issue 19), all on the CPU with torch.cuda and torch.distributed monkeypatched:
local workers named through the parent's CUDA_VISIBLE_DEVICES (ordinals, GPU- and MIG- UUIDs), several workers
without --gpus refused on one GPU, one GPU bound per SLURM task, and submitit's export under a stale environment."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from bench import distributed as D
from bench.cli.main import app
from bench.errors import UserError
from bench.sweep import launch

MASK = "CUDA_VISIBLE_DEVICES"
UUID_A = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"
UUID_B = "GPU-41bd1a2c-e0b7-23a8-7d1b-6a0c1f3e9b11"
MIG_A = "MIG-0e8f3a42-7d5c-5b0e-9b1a-2f3c4d5e6f70"
MIG_B = "MIG-1f9a4b53-8e6d-5c1f-8c2b-3a4d5e6f7081"
MIG_OLD = f"MIG-{UUID_A}/1/0"  # before CUDA 11.? (R470): MIG-GPU-<uuid>/<gpu instance>/<compute instance>


def _gpus(monkeypatch, count: int, mask: str | None) -> None:
    """This process as CUDA would show it: `count` GPUs visible through `mask` (None: unset)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    if mask is None:
        monkeypatch.delenv(MASK, raising=False)
    else:
        monkeypatch.setenv(MASK, mask)


# ---- 1. --launcher local --gpus: through the parent's mask ---------------------------------------------

@pytest.mark.parametrize("mask, entries", [
    (None, None),                                     # unset: every GPU, physical order
    ("", []),                                         # empty: no GPU
    ("4,5,6,7", ["4", "5", "6", "7"]),
    (" 2, 03", ["2", "3"]),
    ("1,-1,2", ["1"]),                                # CUDA stops at the first invalid entry
    ("1,x,2", ["1"]),
    ("3gpu,1", ["3", "1"]),                           # strtoul: leading digits
    ("0,0", []),                                      # a repeated ordinal hides every GPU
    (f"{UUID_A},{UUID_B}", [UUID_A, UUID_B]),
    (f"{UUID_B},2,{UUID_A}", [UUID_B]),               # the first entry's kind decides
    (f"{MIG_A},{MIG_B}", [MIG_A, MIG_B]),
    (MIG_OLD, [MIG_OLD]),
    ("4,GPU-abc", ["4"]),
])
def test_visible_devices_follows_cuda_parsing(mask, entries):
    assert launch.visible_devices(mask) == entries


@pytest.mark.parametrize("mask, gpus, expected", [
    (None, ["0", "1"], ["0", "1"]),                   # no mask: the index is the physical ordinal
    ("4,5,6,7", ["0", "1"], ["4", "5"]),              # a SLURM allocation's GPUs, not GPUs 0 and 1
    ("4,5,6,7", ["3", "1"], ["7", "5"]),
    (f"{UUID_A},{UUID_B}", ["1"], [UUID_B]),
    (f"{MIG_A},{MIG_B}", ["0", "1"], [MIG_A, MIG_B]),
    (MIG_OLD, ["0"], [MIG_OLD]),
])
def test_worker_envs_map_indices_through_the_parents_mask(mask, gpus, expected):
    assert launch.worker_envs(gpus, mask) == [{MASK: e} for e in expected]


@pytest.mark.parametrize("mask, count, gpus, message", [
    ("4,5", 2, "0,2", "GPU 2 does not exist (torch sees GPUs 0-1 (CUDA_VISIBLE_DEVICES=4,5)); --gpus takes "
                      "indices 0-1"),
    (UUID_A, 1, "1", f"GPU 1 does not exist (torch sees GPU 0 (CUDA_VISIBLE_DEVICES={UUID_A}))"),
    ("", 0, "0", "GPU 0 does not exist (torch sees no CUDA GPU (CUDA_VISIBLE_DEVICES=)); use --workers-per-node"),
    ("4,x,6", 1, "1", "GPU 1 does not exist (torch sees GPU 0 (CUDA_VISIBLE_DEVICES=4,x,6))"),
])
def test_gpus_the_mask_lacks_are_one_line(monkeypatch, mask, count, gpus, message):
    _gpus(monkeypatch, count, mask)
    with pytest.raises(UserError) as e:
        launch.parse_gpus(gpus, torch.cuda.device_count(), os.environ.get(MASK))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_gpus_with_a_numbered_cuda_device_is_one_line(tmp_path):
    """Each --gpus worker sees its one GPU as cuda:0: --device cuda:1 would name a GPU it does not have."""
    r = CliRunner().invoke(app, ["reproduce", "asam6", "--preset", "smoke", "--results-dir", str(tmp_path / "r"),
                                 "--launcher", "local", "--gpus", "0", "--device", "cuda:1"])
    assert r.exit_code == 2 and "--device cuda:1 would name another" in r.output and not (tmp_path / "r").exists()


def test_gpus_the_mask_lacks_through_the_cli(tmp_path, monkeypatch):
    _gpus(monkeypatch, 2, "4,5")
    r = CliRunner().invoke(app, ["reproduce", "asam6", "--preset", "smoke", "--results-dir", str(tmp_path / "r"),
                                 "--launcher", "local", "--gpus", "1,2"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "GPU 2 does not exist (torch sees GPUs 0-1 (CUDA_VISIBLE_DEVICES=4,5))" in r.output


@dataclass
class _EnvSpec:
    """A sweep spec whose workers, instead of sweeping, write the CUDA_VISIBLE_DEVICES they run under."""
    out: str
    results_dir: str
    device: str = "cuda"

    def sweeper(self, label: str) -> "_EnvSweeper":
        return _EnvSweeper(Path(self.out) / label.replace(" ", "_"))


@dataclass
class _EnvSweeper:
    path: Path

    def run(self) -> dict[str, int]:
        self.path.write_text(os.environ.get(MASK, "<unset>"))
        return {"ok": 0}

    def say(self, text: str) -> None:
        pass


def test_local_workers_run_on_the_parents_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv(MASK, "4,5,6,7")  # spawned workers inherit it, as inside a SLURM allocation
    codes = launch.run_local(_EnvSpec(str(tmp_path), str(tmp_path)), ["0", "2"], 1)
    assert codes == [0, 0]
    assert (tmp_path / "gpu_0").read_text() == "4" and (tmp_path / "gpu_2").read_text() == "6"


def test_launch_local_keeps_uuid_masks(tmp_path, monkeypatch):
    _gpus(monkeypatch, 2, f"{MIG_A},{MIG_B}")
    said = []
    assert launch.launch_local(_EnvSpec(str(tmp_path), str(tmp_path)), "1", 1, said.append)
    assert (tmp_path / "gpu_1").read_text() == MIG_B and said[0].startswith("1 workers finished")


# ---- 2. several workers on one CUDA device ---------------------------------------------------------------

@pytest.mark.parametrize("device, cuda, refused", [
    ("cuda", True, True), ("cuda:1", True, True), ("auto", True, True),
    ("auto", False, False), ("cpu", True, False),
])
def test_workers_per_node_on_cuda_needs_gpus(tmp_path, monkeypatch, device, cuda, refused):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    started = []
    monkeypatch.setattr(launch, "run_local", lambda spec, gpus, workers: started.append(workers) or [0] * workers)
    spec = _EnvSpec(str(tmp_path), str(tmp_path), device=device)
    if not refused:
        assert launch.launch_local(spec, None, 2, lambda _: None) and started == [2]
        return
    with pytest.raises(UserError, match=r"--workers-per-node 2 on device .* would put every worker on the same "
                                        r"GPU; pass --gpus 0,1,\.\.\. \(one worker per GPU\) or --device cpu"):
        launch.launch_local(spec, None, 2, lambda _: None)
    assert not started


def test_workers_per_node_on_cuda_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    r = CliRunner().invoke(app, ["reproduce", "asam6", "--preset", "smoke", "--results-dir", str(tmp_path / "r"),
                                 "--launcher", "local", "--workers-per-node", "2", "--device", "cuda"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "pass --gpus 0,1,... (one worker per GPU) or --device cpu" in r.output


# ---- 3. SLURM binding one GPU per task ------------------------------------------------------------------

@pytest.fixture
def torch_group(monkeypatch):
    """torchrun's environment for rank 3 of 4 with CUDA and the process group faked: the calls they got."""
    calls: dict = {"set_device": [], "init": []}
    for key, value in {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "3"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(D, "_local_rank", 0)
    monkeypatch.setattr(D, "_cuda_index", None, raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls["set_device"].append(i))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: calls["init"].append((a, kw)))
    return calls


def test_one_gpu_bound_per_task_uses_that_gpu(monkeypatch, torch_group):
    _gpus(monkeypatch, 1, "3")  # SLURM --gpu-bind: LOCAL_RANK 3 sees only its own GPU
    assert D.init_from_env("auto") == 3
    assert torch_group["set_device"] == [0] and D.cuda_index() == 0 and D.local_rank() == 3
    (args, kw), = torch_group["init"]
    assert (kw.get("backend") or args[0]) == "nccl"
    assert kw.get("timeout") == D.GROUP_TIMEOUT  # a first collective may wait for rank 0's download


def test_every_gpu_visible_uses_the_local_rank(monkeypatch, torch_group):
    _gpus(monkeypatch, 4, None)
    D.init_from_env("cuda")
    assert torch_group["set_device"] == [3] and D.cuda_index() == 3


def test_local_rank_beyond_several_visible_gpus_is_one_line(monkeypatch, torch_group):
    _gpus(monkeypatch, 2, "0,1")
    with pytest.raises(UserError, match=r"^LOCAL_RANK 3 but this process sees 2 GPUs \(cuda:0-cuda:1\) with "
                                        r"CUDA_VISIBLE_DEVICES=0,1; "):
        D.init_from_env("auto")
    assert torch_group == {"set_device": [], "init": []}


def test_cpu_group_chooses_no_gpu(monkeypatch, torch_group):
    _gpus(monkeypatch, 1, None)
    D.init_from_env("cpu")
    (args, kw), = torch_group["init"]
    assert (kw.get("backend") or args[0]) == "gloo" and torch_group["set_device"] == []


@pytest.mark.parametrize("rank, count, index", [(1, 2, 1), (3, 1, 0), (0, 4, 0), (0, 0, None)])
def test_cuda_index_without_a_choice(monkeypatch, rank, count, index):
    monkeypatch.setattr(D, "_cuda_index", None, raising=False)
    monkeypatch.setattr(D, "_local_rank", rank)
    _gpus(monkeypatch, count, None)
    assert D.cuda_index() == index


# ---- 4. submitit's export under the submitting shell's environment --------------------------------------

STALE = {"MASTER_ADDR": "login3", "MASTER_PORT": "29500", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5",
         "LOCAL_WORLD_SIZE": "8"}


def _slurm_task(monkeypatch, ntasks: int, procid: int) -> None:
    """This process as task `procid` of a `ntasks`-task SLURM array job (one task per node), started from a
    shell that ran torchrun before: SLURM copied its MASTER_*/RANK/... into the job."""
    monkeypatch.delenv("_TEST_CLUSTER_", raising=False)
    nodes = max(ntasks, 1)
    for key, value in {**STALE, "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "9000", "SLURM_ARRAY_JOB_ID": "8990",
                       "SLURM_ARRAY_TASK_ID": "3", "SLURM_NTASKS": str(ntasks), "SLURM_JOB_NUM_NODES": str(nodes),
                       "SLURM_PROCID": str(procid), "SLURM_NODEID": str(procid), "SLURM_LOCALID": "0",
                       "SLURM_JOB_NODELIST": "gpu[12-13]" if ntasks > 1 else "gpu12"}.items():
        monkeypatch.setenv(key, value)


def _run_task(monkeypatch) -> dict[str, str]:
    """SlurmRun's call with run_one replaced: the environment the run would start in."""
    import bench.sweep.child
    from bench.recipes import make_config
    seen = {}
    monkeypatch.setattr(bench.sweep.child, "run_one", lambda cfg, force=False: seen.update(os.environ) or 0)
    cfg = make_config("cifar10", minimizer="sgd", epochs=1, device="cpu")
    assert launch.SlurmRun(asdict(cfg), False)() == 0
    return {k: seen.get(k) for k in STALE}


def test_slurm_task_exports_the_jobs_group_not_the_shells(monkeypatch):
    pytest.importorskip("submitit")
    envs = []
    for procid in (0, 1):
        _slurm_task(monkeypatch, 2, procid)
        envs.append(_run_task(monkeypatch))
    port = envs[0]["MASTER_PORT"]
    assert port != STALE["MASTER_PORT"] and 20000 <= int(port) <= 60000
    for procid, env in enumerate(envs):
        assert env == {"MASTER_ADDR": "gpu12", "MASTER_PORT": port, "RANK": str(procid), "WORLD_SIZE": "2",
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}


def test_one_task_slurm_job_drops_the_shells_group(monkeypatch):
    pytest.importorskip("submitit")
    _slurm_task(monkeypatch, 1, 0)
    assert _run_task(monkeypatch) == dict.fromkeys(STALE)  # a single process, not rank 5 of 8
