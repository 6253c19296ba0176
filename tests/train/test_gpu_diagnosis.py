"""A GPU that torch cannot use is said in one line, never a silent run on the CPU; `--device cuda:N` under
torchrun, `--deterministic` where compile cannot be, and bf16 emulated on an old GPU are each one line.

No GPU here: the driver probes and torch.cuda's answers are planted."""
import pytest
import torch
from typer.testing import CliRunner

from bench import gpu
from bench.train import runtime
from bench.cli.main import app
from bench.errors import UserError
from bench.recipes import make_config

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore:CUDA initialization")


def test_a_gpu_torch_cannot_use_is_one_line_with_the_driver_the_wheel_and_the_fix(old_driver):
    problem = gpu.cuda_problem()
    assert "driver 525.105.17" in problem and "CUDA 13.0 build" in problem and "too old" in problem
    assert "--index-url https://download.pytorch.org/whl/cu126" in problem and "\n" not in problem
    for device in ("auto", "cuda", "cuda:1"):
        with pytest.raises(UserError, match="driver 525.105.17"):
            runtime.resolve_device(device)


def test_the_cli_refuses_auto_there_and_trains_nothing(old_driver, tmp_path):
    r = runner.invoke(app, ["run", "digits-noise", "--epochs", "1", "--results-dir", str(tmp_path)])
    assert r.exit_code == 2 and "an NVIDIA GPU is here (driver 525.105.17)" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "digits-noise.csv").exists()
    r = runner.invoke(app, ["run", "digits-noise", "--epochs", "1", "--device", "cpu", "--results-dir", str(tmp_path),
                            "--quiet"])
    assert r.exit_code == 0, r.output  # asked for in so many words, the CPU is fine


def test_a_machine_without_nvidia_gpu_is_a_cpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "gpu_present", lambda: False)
    assert gpu.cuda_problem() is None and runtime.resolve_device("auto") == torch.device("cpu")
    assert runtime.sweep_device("auto") == "cpu"


def test_wheel_for_each_driver():
    assert [gpu.wheel_for_driver(d) for d in ("580.65.06", "550.54.15", "470.82", "390.1", None)] == \
        ["cu130", "cu126", "cu118", None, None]


def test_a_sweep_started_on_gpus_gives_its_runs_cuda(monkeypatch, tmp_path):
    """`auto` is decided once: where the sweep sees a GPU every run gets `cuda`, so a run whose own process later
    finds none fails in one line (its record says so) instead of training on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.sweep_device("auto") == "cuda" and runtime.sweep_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "gpu_present", lambda: False)
    assert runtime.sweep_device("auto", slurm=True, gpus_per_run=2) == "cuda"   # submitted from a login node
    assert runtime.sweep_device("auto", slurm=True, gpus_per_run=0) == "cpu"
    assert runtime.sweep_device("auto", gpus="0,1") == "cuda"
    from bench.sweep import sweeper
    seen = []
    monkeypatch.setattr(sweeper.SweepSpec, "plans", lambda self: seen.append(self.device) or [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    r = runner.invoke(app, ["reproduce", "demo", "--preset", "demo", "--results-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert seen and set(seen) == {"cuda"}


def test_a_run_planned_for_cuda_refuses_a_process_without_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "gpu_present", lambda: False)
    with pytest.raises(UserError, match="--device cuda: CUDA is not available"):
        runtime.resolve_device("cuda")


def test_device_cuda_n_under_torchrun_is_refused(tmp_path):
    with pytest.raises(UserError, match="would put every rank on that one GPU"):
        make_config("digits-noise", minimizer="sgd", device="cuda:1", world_size=2)
    assert make_config("digits-noise", minimizer="sgd", device="cuda", world_size=2).device == "cuda"
    assert make_config("digits-noise", minimizer="sgd", device="cuda:1").device == "cuda:1"  # one process: fine


def test_cuda_n_beyond_the_visible_gpus_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="sees 2 GPU"):
        runtime.resolve_device("cuda:2")


def test_bf16_emulated_on_an_old_gpu_is_said(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(gpu, "native_bf16", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    note = runtime.precision_note("bf16", cuda)
    assert "Tesla V100" in note and "7.0" in note and "emulated" in note and "\n" not in note
    assert runtime.precision_note("fp32", cuda) == "" and runtime.precision_note("bf16", torch.device("cpu")) == ""
    monkeypatch.setattr(gpu, "native_bf16", lambda device: True)
    assert runtime.precision_note("bf16", cuda) == ""


def test_the_bf16_note_reaches_the_runs_log(monkeypatch, tmp_path):
    from bench.train import runner as run_module
    monkeypatch.setattr(run_module, "precision_note", lambda precision, device: f"note: {precision} here")
    lines = []
    cfg = make_config("digits-noise", minimizer="sgd", epochs=1, device="cpu", results_dir=str(tmp_path))
    run_module.execute(cfg, log=lines.append)
    assert "note: fp32 here" in lines
