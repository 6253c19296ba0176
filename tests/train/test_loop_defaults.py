"""The loop's speed defaults that change no result: checkpoints off the training thread and every N epochs
(resuming to the same result), evaluation under the training precision, the compiled model's partial batch
run uncompiled, cudnn.benchmark and TF32 recorded; `--fast` and `--checkpoint-every` refusals."""
import dataclasses
import time

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bench.train import checkpoint as ckpt
from bench.cli.main import app
from bench.train.control import Interrupted, StopFlag
from bench.train.state import TrainState, setup
from bench.train.loop import evaluate_classification, train
from bench.errors import UserError
from bench.train.runtime import fast_settings, numerics_flags, set_backend_flags
from bench.train.step import step_net
from test_engine import CPU, _metrics, _same_weights, fresh_process_job, tiny_cfg, tiny_job

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one torch thread."""


def _saved_epochs(monkeypatch):
    epochs = []
    real = ckpt.Writer.submit

    def submit(self, path, state):
        epochs.append(state["epoch"])
        return real(self, path, state)
    monkeypatch.setattr(ckpt.Writer, "submit", submit)
    return epochs


def test_checkpoints_every_n_epochs_and_after_the_last(tmp_path, monkeypatch):
    epochs = _saved_epochs(monkeypatch)
    train(tiny_cfg(epochs=5, checkpoint_every=2), tiny_job(), CPU, checkpoint=tmp_path / "c.pt")
    assert epochs == [2, 4, 5]
    assert ckpt.load(tmp_path / "c.pt", tiny_cfg(epochs=5, checkpoint_every=2).run_id)["epoch"] == 5


def test_a_stop_checkpoints_off_schedule(tmp_path, monkeypatch):
    epochs = _saved_epochs(monkeypatch)
    stop = StopFlag()
    stop.set = True
    with pytest.raises(Interrupted, match="after epoch 1 of 4"):
        train(tiny_cfg(epochs=4, checkpoint_every=3), tiny_job(), CPU, checkpoint=tmp_path / "c.pt", stop=stop)
    assert epochs == [1] and ckpt.load(tmp_path / "c.pt", tiny_cfg(epochs=4).run_id)["epoch"] == 1


def test_a_crash_between_checkpoints_resumes_to_the_same_result(tmp_path, monkeypatch):
    cfg = tiny_cfg(epochs=4, checkpoint_every=2)
    real_save = ckpt.save

    def slow_save(path, state):  # a slow disk: the crash comes while epoch 2's write is still under way
        time.sleep(0.5)
        real_save(path, state)
    monkeypatch.setattr(ckpt, "save", slow_save)
    straight_job = fresh_process_job(cfg, 0)
    straight = train(cfg, straight_job, CPU)

    def crash(history):
        if len(history) == 3:  # epoch 3 trained, its checkpoint not due: the file still holds epoch 2
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, fresh_process_job(cfg, 0), CPU, checkpoint=tmp_path / "c.pt", on_epoch=crash)
    assert ckpt.load(tmp_path / "c.pt", cfg.run_id)["epoch"] == 2
    torch.manual_seed(123)
    job = fresh_process_job(cfg, 0)
    resumed = train(cfg, job, CPU, checkpoint=tmp_path / "c.pt")
    assert resumed["resumed_from"] == 2 and _metrics(resumed) == _metrics(straight)
    assert _same_weights(straight_job.model.state_dict(), job.model.state_dict())


def test_the_writer_saves_a_copy_and_hands_back_its_error(tmp_path, monkeypatch):
    w = torch.ones(3)
    writer = ckpt.Writer()
    writer.submit(tmp_path / "a.pt", {"version": ckpt.VERSION, "run_id": "r", "epoch": 1, "w": w})
    w.add_(1)  # training goes on at once: the file holds the state as submitted
    writer.wait()
    assert torch.equal(ckpt.load(tmp_path / "a.pt", "r")["w"], torch.ones(3))
    writer.submit(tmp_path / "a2.pt", {"version": ckpt.VERSION, "run_id": "r", "epoch": 2, "w": w})  # reuses buffers
    w.add_(1)
    writer.wait()
    assert torch.equal(ckpt.load(tmp_path / "a2.pt", "r")["w"], torch.full((3,), 2.0))
    assert torch.equal(ckpt.load(tmp_path / "a.pt", "r")["w"], torch.ones(3))

    def broken(path, state):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt, "save", broken)
    writer.submit(tmp_path / "b.pt", {"epoch": 1})
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    writer.wait()  # the error is handed back once


def test_evaluation_runs_under_the_training_precision():
    seen = []

    class Probe(nn.Linear):
        def forward(self, x):
            seen.append(torch.is_autocast_enabled("cpu"))
            return super().forward(x)
    job = tiny_job()
    model = nn.Sequential(Probe(6, 3))
    from bench.train.runtime import autocast_for
    evaluate_classification(model, job.test_loader, CPU, autocast=autocast_for("bf16", CPU))
    evaluate_classification(model, job.test_loader, CPU, autocast=autocast_for("fp32", CPU))
    assert seen == [True, True, False, False]


def test_a_compiled_models_partial_batch_runs_uncompiled():
    cfg = tiny_cfg(compile=True)
    st = TrainState(cfg, tiny_job(), CPU, model=nn.Linear(2, 2), net="compiled", base=None, minimizer=None,
                    scheduler=None, sched_unit="epoch")
    assert step_net(st, cfg.per_replica_batch) == "compiled" and step_net(st, 3) is st.model
    st.job.fixed_batch = False  # token-bucketed batches vary: the compiled model takes them all
    assert step_net(st, 3) == "compiled"
    st = dataclasses.replace(st, cfg=tiny_cfg(compile=False), net=st.model)
    assert step_net(st, 3) is st.model


def test_backend_flags_cudnn_benchmark_on_cuda_and_tf32_with_fast():
    saved = numerics_flags()
    try:
        torch.backends.cudnn.benchmark = False
        set_backend_flags(tiny_cfg(), CPU)
        assert numerics_flags()["cudnn_benchmark"] is False
        set_backend_flags(tiny_cfg(), torch.device("cuda"))  # sets flags only: no GPU needed
        set_backend_flags(tiny_cfg(fast=True), CPU)
        assert numerics_flags() == {"tf32_matmul": True, "tf32_cudnn": True, "cudnn_benchmark": True,
                                    "deterministic_algorithms": False}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved["tf32_matmul"]
        torch.backends.cudnn.allow_tf32 = saved["tf32_cudnn"]
        torch.backends.cudnn.benchmark = saved["cudnn_benchmark"]


def test_fast_settings_and_refusal_on_cpu():
    assert fast_settings("cuda", {}) == {"fast": True, "channels_last": True, "compile": True, "precision": "bf16"}
    assert "precision" not in fast_settings("cuda:1", {"precision": "fp16"})  # a precision given wins
    with pytest.raises(UserError, match="--fast is for CUDA GPUs .*pass --compile"):
        fast_settings("cpu", {})


def test_setup_keeps_the_faithful_defaults():
    st = setup(tiny_cfg(), tiny_job(), CPU)
    assert st.net is st.model and st.compile_s == 0.0


@pytest.mark.parametrize("args,words", [
    (["--fast", "--device", "cpu"], ["--fast is for CUDA GPUs", "--compile"]),
    (["--checkpoint-every", "0"], ["--checkpoint-every must be an integer >= 1"]),
    (["--log", "mlflow"], ["--log", "mlflow", "tensorboard"]),
])
def test_bad_loop_options_are_one_line(tmp_path, args, words):
    r = runner.invoke(app, ["run", "digits-noise", "--epochs", "1", "--results-dir", str(tmp_path), *args])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and all(w in r.output for w in words), r.output


def test_the_row_records_the_backend_flags_compile_and_checkpoint_time(tmp_path):
    r = runner.invoke(app, ["run", "digits-noise", "--epochs", "2", "--checkpoint-every", "2", "--quiet",
                            "--results-dir", str(tmp_path), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    import pandas as pd
    row = pd.read_csv(tmp_path / "digits-noise.csv").iloc[0]
    assert {"tf32_matmul", "tf32_cudnn", "cudnn_benchmark", "compile_s", "checkpoint_s", "checkpoint_every",
            "fast", "log"} <= set(row.index)
    assert row.compile_s == 0 and row.checkpoint_s >= 0 and not row.fast and row.checkpoint_every == 2


def test_log_tensorboard_through_bench_run(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    r = runner.invoke(app, ["run", "digits-noise", "--minimizer", "sam", "--epochs", "2", "--log", "tensorboard",
                            "--quiet", "--results-dir", str(tmp_path), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    import pandas as pd
    row = pd.read_csv(tmp_path / "digits-noise.csv").iloc[0]
    acc = EventAccumulator(str(tmp_path / "runs" / row.run_id / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"step/loss", "step/lr", "epoch/test_acc", "epoch/surrogate_gap"} <= tags, tags
    assert len(acc.Scalars("step/loss")) == row.steps and [e.step for e in acc.Scalars("epoch/test_acc")] == [1, 2]
    assert acc.Scalars("epoch/test_acc")[-1].value == pytest.approx(row.final_test_acc, rel=1e-6)


def test_reproduce_forwards_log_and_checkpoint_every_without_changing_run_ids(tmp_path):
    from bench.sweep.sweeper import SweepSpec
    plain = SweepSpec(("demo",), "demo", str(tmp_path)).plans()[0].runs
    logged = SweepSpec(("demo",), "demo", str(tmp_path), log="tensorboard", checkpoint_every=5).plans()[0].runs
    assert [c.run_id for c in plain] == [c.run_id for c in logged]
    assert {(c.log, c.checkpoint_every) for c in logged} == {("tensorboard", 5)}
    r = runner.invoke(app, ["reproduce", "demo", "--preset", "demo", "--checkpoint-every", "0", "--dry-run",
                            "--results-dir", str(tmp_path)])
    assert r.exit_code == 2 and "--checkpoint-every must be" in r.output and len(r.output.strip().splitlines()) == 1
