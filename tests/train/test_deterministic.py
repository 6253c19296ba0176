"""--deterministic: deterministic algorithms, cudnn.benchmark off and cuBLAS's workspace for the run, recorded in
its row, restored afterwards; refused with --compile where this torch cannot compile deterministically; an op
without a deterministic implementation is one line."""
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from bench import gpu
from bench.train import runtime
from bench.cli.main import app
from bench.config import RunConfig
from tasks.models import global_avg_pool

runner = CliRunner()
RUN = ["run", "digits-noise", "--epochs", "1", "--device", "cpu", "--quiet"]


def test_a_deterministic_run_records_it_and_leaves_the_process_as_it_was(tmp_path):
    r = runner.invoke(app, [*RUN, "--deterministic", "--results-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    row = pd.read_csv(tmp_path / "digits-noise.csv").iloc[0]
    assert row.deterministic and row.deterministic_algorithms and not row.cudnn_benchmark
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    plain = runner.invoke(app, [*RUN, "--results-dir", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    other = pd.read_csv(tmp_path / "plain" / "digits-noise.csv").iloc[0]
    assert other.run_id == row.run_id and not other.deterministic_algorithms  # how, not what: the same run id


def test_deterministic_with_compile_where_torch_cannot_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu, "compile_can_be_deterministic", lambda: False)
    r = runner.invoke(app, [*RUN, "--deterministic", "--compile", "--results-dir", str(tmp_path)])
    assert r.exit_code == 2 and "no deterministic mode for torch.compile" in r.output
    assert "Traceback" not in r.output and not list(tmp_path.iterdir())


def test_compile_can_be_deterministic_on_this_torch():
    """This torch's compiler has a deterministic mode: the pair runs, with it switched on inside the run."""
    assert gpu.compile_can_be_deterministic()
    import torch._inductor.config as inductor
    with runtime.deterministic_mode(True):
        assert inductor.deterministic and torch.are_deterministic_algorithms_enabled()
    assert not inductor.deterministic and not torch.are_deterministic_algorithms_enabled()


def test_an_op_without_a_deterministic_implementation_is_one_line():
    with pytest.raises(runtime.UserError, match="--deterministic: .*does not have a deterministic implementation"):
        with runtime.deterministic_mode(True):
            raise RuntimeError("adaptive_max_pool2d_backward_cuda does not have a deterministic implementation, "
                               "but you set 'torch.use_deterministic_algorithms(True)'")
    with pytest.raises(RuntimeError, match="other"), runtime.deterministic_mode(True):
        raise RuntimeError("other")


def test_benchmark_is_off_on_cuda_when_deterministic():
    saved = torch.backends.cudnn.benchmark
    try:
        cfg = RunConfig.of(task="t", model="m", minimizer="sgd", deterministic=True)
        runtime.set_backend_flags(cfg, torch.device("cuda"))  # sets flags only: no GPU needed
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = saved


def test_global_pooling_under_deterministic_algorithms_avoids_the_refused_op(monkeypatch):
    """torch refuses adaptive_avg_pool2d's CUDA backward under deterministic algorithms (whatever the output size):
    the models' global pooling is then the plain mean, equal up to rounding."""
    x = torch.randn(4, 3, 7, 7)
    eager = global_avg_pool(x)
    with runtime.deterministic_mode(True):
        import torch.nn.functional as F
        monkeypatch.setattr(F, "adaptive_avg_pool2d", lambda *a, **k: pytest.fail("adaptive pooling under "
                                                                                 "deterministic algorithms"))
        assert torch.allclose(global_avg_pool(x), eager, atol=1e-6)
