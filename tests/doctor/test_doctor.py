"""`bench doctor`: one line per check with a verdict, a fail (exit 1) for a GPU torch cannot use or file locks that
do nothing, missing optional packages reported rather than crashing, each task's data found by file checks, the
markdown report, and `--full`: on a CPU one line saying what a GPU would run, and the whole sequence at a tiny
size through the hidden options (interrupt and resume included).

No GPU here: the CUDA answers and the driver probe are planted where a test needs a GPU."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bench.doctor import checks as doctor
from bench.doctor import full as doctor_full
from bench import gpu
from bench.cli.main import app
from bench.doctor.report import FAIL, INFO, OK, WARN, Context
from bench.registry import task_names

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore:CUDA initialization")
SECTIONS = ("[software]", "[GPU]", "[torch.compile (--compile, --fast)]", "[data]", "[results folder]",
            "[cluster and tracking]", "[machine]")


@pytest.fixture
def no_gpu(monkeypatch):
    """A plain CPU machine, whatever this one is."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "driver_version", lambda: None)
    monkeypatch.setattr(gpu, "gpu_present", lambda: False)


def doctor_run(tmp_path: Path, *args: str):
    return runner.invoke(app, ["doctor", "--data-dir", str(tmp_path / "data"), "--results-dir",
                               str(tmp_path / "results"), *args])


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


def test_the_cpu_report_lists_every_section_and_writes_markdown(no_gpu, tmp_path):
    r = doctor_run(tmp_path)
    assert r.exit_code == 0, r.output
    for title in SECTIONS:
        assert title in r.output
    assert "GPU: no usable CUDA GPU" in r.output and "ok    file locks:" in r.output
    for name in task_names():
        assert f"  {name}: " in r.output
    report = (tmp_path / "results" / "doctor.md").read_text()
    assert report.startswith("# bench doctor") and "## data" in report and "| verdict | check |" in report
    assert not list((tmp_path / "results").glob(".doctor-*"))  # the lock probe's file is gone
    r = doctor_run(tmp_path, "--out", str(tmp_path / "elsewhere" / "node.md"))
    assert r.exit_code == 0 and (tmp_path / "elsewhere" / "node.md").exists()


def test_a_cuda_build_that_cannot_use_the_gpu_fails_with_the_fix(old_driver, tmp_path):
    r = doctor_run(tmp_path)
    assert r.exit_code == 1, r.output
    line = next(ln for ln in r.output.replace("\n", " ").split("  fail  ")[1:] if ln.startswith("CUDA:"))
    assert "driver 525.105.17" in line and "CUDA 13.0 build" in line
    assert "--index-url https://download.pytorch.org/whl/cu126" in line
    assert "1 failed" in r.output and "| fail | CUDA |" in (tmp_path / "results" / "doctor.md").read_text()


def test_locks_that_do_nothing_are_a_fail_and_working_ones_ok(monkeypatch, tmp_path):
    assert doctor.lock_check(tmp_path).verdict == OK
    monkeypatch.setattr(doctor, "other_process_lock", lambda path, wait_s=1.0: "acquired")
    check = doctor.lock_check(tmp_path)
    assert check.verdict == FAIL and "locks do nothing" in check.detail and "local disk" in check.fix
    assert list(tmp_path.iterdir()) == []


def test_missing_optional_packages_are_reported_not_a_crash(monkeypatch, tmp_path):
    for name in ("submitit", "wandb", "tensorboard", "triton"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    ctx = Context(tmp_path, tmp_path, cuda=True)
    checks = by_name(doctor.cluster_checks(ctx))
    assert checks["submitit"].verdict in (INFO, WARN) and "missing" in checks["submitit"].detail
    assert "sambench[cluster]" in checks["submitit"].fix
    assert "missing" in checks["wandb"].detail and "missing" in checks["tensorboard"].detail
    triton = by_name(doctor.compile_checks(ctx))["Triton"]
    assert triton.verdict == WARN and "not importable" in triton.detail


def test_each_tasks_data_is_found_by_its_files_and_synthetic_data_says_so(tmp_path):
    from tasks.cifar import write_fake_cifar
    from tasks.fashion_mnist import write_fake_fashion_mnist
    data = tmp_path / "data"
    write_fake_cifar(data, "cifar10", 20, 10)
    write_fake_fashion_mnist(data, 20, 10)
    for split in ("train", "val"):
        (data / split / "n01440764").mkdir(parents=True)  # ImageNet's layout (no image is read)
    for name in ("train", "valid", "test"):
        for lang in ("de", "en"):
            (data / f"{name}.{lang}").write_text("ein satz\n")  # a prepared IWSLT corpus, real (no marker)
    checks = by_name(doctor.data_checks(Context(data, tmp_path, cuda=False)))
    for name in ("cifar10", "cifar10-noise", "fashion-mnist"):
        assert checks[name].verdict == WARN and "synthetic" in checks[name].detail, checks[name]
    assert checks["cifar100"].verdict == INFO and "not found" in checks["cifar100"].detail
    assert "--download" in checks["cifar100"].fix
    assert checks["imagenet"].verdict == OK and checks["iwslt14-de-en"].verdict == OK
    assert checks["digits-noise"].verdict == OK and checks["svhn"].verdict == INFO
    (data / "cifar-10-batches-py" / "SYNTHETIC").unlink()
    assert by_name(doctor.data_checks(Context(data, tmp_path, cuda=False)))["cifar10"].verdict == OK


def test_full_on_a_cpu_says_what_it_would_run_on_a_gpu(no_gpu, tmp_path):
    r = doctor_run(tmp_path, "--full")
    assert r.exit_code == 0, r.output
    assert r.output.count("On a CUDA GPU --full also runs") == 1 and "[--full: host syncs" not in r.output


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "file").write_text("x")
    for args, said in [(["--results-dir", str(tmp_path / "file")], "is a file"),
                       (["--device", "cpu"], "for --full only"),
                       (["--full", "--device", "cpu", "--batch-size", "3"], "must be even"),
                       (["--full", "--device", "cpu", "--model", "nope"], "unknown model")]:
        r = runner.invoke(app, ["doctor", "--data-dir", str(tmp_path), *args])
        assert r.exit_code == 2 and said in r.output and "Traceback" not in r.output, (args, r.output)


def test_the_sync_guard_catches_host_reads_and_a_planted_sync(monkeypatch, tmp_path):
    x = torch.randn(8)
    with pytest.raises(doctor_full.HostSync, match="_local_scalar_dense"), doctor_full.HostReads():
        x.sum().item()
    with pytest.raises(doctor_full.HostSync), doctor_full.HostReads():
        x[x > 0]
    with doctor_full.HostReads():
        x[x > 0] = 0.0  # masked_fill_: no sync
    from tasks.cifar import CifarTask, write_fake_cifar
    write_fake_cifar(tmp_path, "cifar10", 16, 8)
    build = CifarTask.build

    def syncing_build(self, cfg, device):
        job = build(self, cfg, device)
        loss = job.loss_fn
        job.loss_fn = lambda out, y: loss(out, y) * (1.0 if bool(out.sum() > -1e30) else 0.0)
        return job
    monkeypatch.setattr(CifarTask, "build", syncing_build)
    plan = doctor_full.make_plan("cpu")
    assert "_local_scalar_dense" in doctor_full.first_sync(plan, tmp_path, "sgd", {})



def test_a_sync_is_a_warning_and_a_broken_case_a_fail_the_others_still_run(monkeypatch, tmp_path):
    def first_sync(plan, data, name, settings):
        if name == "asam":
            raise RuntimeError("CUDA out of memory")
        return "aten._local_scalar_dense reads a device value" if name == "sam" else ""
    monkeypatch.setattr(doctor_full, "sync_cases", lambda batch: [("sgd", "fp32", {}), ("sam", "fp32", {}),
                                                                  ("asam", "fp32", {})])
    monkeypatch.setattr(doctor_full, "first_sync", first_sync)
    checks = by_name(doctor_full.sync_checks(doctor_full.make_plan("cpu"), tmp_path)[0])
    assert checks["sgd"].verdict == OK and checks["sam"].verdict == WARN and "host sync" in checks["sam"].detail
    assert checks["asam"].verdict == FAIL and "out of memory" in checks["asam"].detail

def test_arch_list_and_versions():
    assert doctor.arch_supported((8, 9), ["sm_80", "sm_86"]) and doctor.arch_supported((12, 1), ["sm_120"])
    assert not doctor.arch_supported((6, 0), ["sm_75", "sm_80"]) and doctor.arch_supported((9, 0), ["compute_80"])
    assert doctor_full.make_plan("cpu", batch_size=4, steps=1).batch_size == 4


def test_the_tiny_full_sequence_runs_on_a_cpu_with_interrupt_and_resume(no_gpu, tmp_path):
    r = doctor_run(tmp_path, "--full", "--device", "cpu", "--model", "resnet20", "--batch-size", "8", "--steps", "2")
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    for title in ("host syncs in a training step", "loop timings", "interrupt and resume", "bench sharpness"):
        assert f"[--full: {title}]" in out
    assert "ok sam: fp32, accumulate=2, m=2: no host sync" in out
    assert "| fp32 | asam |" in out and "ok default loop: interrupt:" in out and "exit 130" in out
    assert "ok default loop: resume:" in out and "weights bit-identical" in out and "ok worst_l2 rho=0.05:" in out
    assert "fail " not in out
    report = (tmp_path / "results" / "doctor.md").read_text()
    assert "## --full: interrupt and resume" in report and "| ok | default loop: result |" in report


def test_every_task_answers_where_its_data_is(tmp_path):
    """Each task says itself, by file checks, whether its data is under a folder (Task.data_status): the doctor
    knows no task by name, and a new task with data adds its own check."""
    from bench.registry import get_task, task_names
    from tasks.cifar import write_fake_cifar
    write_fake_cifar(tmp_path, "cifar10", 20, 10)
    for name in task_names():
        status = get_task(name).data_status(tmp_path)
        assert status is not None and status.looked, name
    assert get_task("cifar10").data_status(tmp_path).found == tmp_path / "cifar-10-batches-py"
    assert get_task("cifar100").data_status(tmp_path).found is None
    assert get_task("digits-noise").data_status(tmp_path).bundled
