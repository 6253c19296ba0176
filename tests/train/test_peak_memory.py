"""Every row records `peak_mem_mib`: the device's peak allocated memory during the run (empty on the CPU)."""
import pandas as pd
import torch
from typer.testing import CliRunner

from bench.train import runner as run_module
from bench.cli.main import app


def test_the_row_has_the_column_empty_on_the_cpu(tmp_path):
    r = CliRunner().invoke(app, ["run", "digits-noise", "--epochs", "1", "--device", "cpu", "--quiet",
                                 "--results-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    row = pd.read_csv(tmp_path / "digits-noise.csv").iloc[0]
    assert "peak_mem_mib" in row and pd.isna(row.peak_mem_mib)


def test_on_cuda_it_is_the_allocators_peak_in_mib(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20 + 2**19)
    assert run_module.peak_memory_mib(torch.device("cuda", 0)) == 3.5
    assert run_module.peak_memory_mib(torch.device("cpu")) is None


def test_the_counter_is_reset_when_the_run_starts(monkeypatch):
    """prepare_device resets the device's peak counter before the task builds anything, so a second run in one
    process (a sweep's child runs one, tests many) reports its own peak."""
    calls = []
    monkeypatch.setattr(run_module, "resolve_device", lambda name, local_rank=0: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set", device)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(("reset", device)))
    monkeypatch.setattr(run_module, "precision_note", lambda precision, device: "")
    from bench.recipes import make_config
    device = run_module.prepare_device(make_config("digits-noise", minimizer="sgd"), print)
    assert device == torch.device("cuda", 0) and ("reset", device) in calls and ("set", device) in calls
