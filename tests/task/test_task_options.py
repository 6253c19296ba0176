"""A task declares its own options the way a minimizer declares its Hparams, in its one file: this test-only task
(a corruption severity) is all it takes; `--topt` sets the option, `bench list` prints it, its range is checked
once, the run carries it in one mapping (topts) and its row in a column of its own."""
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bench import registry
from bench.cli.main import app
from bench.data import TensorLoader
from bench.options import option
from bench.recipes import make_config
from bench.task import DataStatus, Job, Task

runner = CliRunner()
NAME = "toy-severity"


# ---- the whole of a new task with a knob of its own ------------------------------------------------------
@dataclass(frozen=True)
class SeverityOptions:
    severity: int = option(1, "how strongly the inputs are corrupted (1: lightly, 5: heavily)", ge=1, le=5,
                           integer=True)


class SeverityTask(Task):
    """Noise of `severity` added to separable points: a knob no other task has."""
    Options = SeverityOptions

    def recipe(self, model=None):
        return {"model": "linear", "models": ["linear"], "epochs": 1, "batch_size": 16, "lr": 0.1,
                "label_smoothing": 0.0, "schedule": "constant"}

    def data_status(self, data_dir):
        return DataStatus(None, "generated in memory", bundled=True)

    def build(self, cfg, device):
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 2, (64,), generator=g)
        x = y[:, None].float() * 2 - 1 + 0.3 * cfg.topts["severity"] * torch.randn(64, 4, generator=g)
        return Job(model=nn.Linear(4, 2), train_loader=TensorLoader(x, y, cfg.per_replica_batch, shuffle=True),
                   test_loader=TensorLoader(x, y, 64, shuffle=False), loss_fn=nn.functional.cross_entropy,
                   num_train=64, info={"severity_used": cfg.topts["severity"]})
# -----------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def toy_task():
    registry._load()
    registry.register_task(NAME)(SeverityTask)
    yield
    registry._TASKS.pop(NAME)


def run(tmp_path, *extra):
    return runner.invoke(app, ["run", NAME, "--device", "cpu", "--quiet", "--results-dir", str(tmp_path), *extra])


def test_the_option_is_set_carried_and_recorded(tmp_path):
    r = run(tmp_path, "--topt", "severity=3")
    assert r.exit_code == 0, r.output
    row = pd.read_csv(tmp_path / f"{NAME}.csv").iloc[0]
    assert row.t_severity == 3 and row.severity_used == 3 and row.topts == '{"severity": 3}'


def test_it_is_part_of_the_run_id_and_resolved_to_its_default():
    default, given = make_config(NAME, minimizer="sgd"), make_config(NAME, minimizer="sgd", topts={"severity": 3})
    assert default.topts == {"severity": 1} and given.topts == {"severity": 3}
    assert default.run_id != given.run_id
    assert make_config(NAME, minimizer="sgd", topts={"severity": 1}).run_id == default.run_id


@pytest.mark.parametrize("topt, message", [
    ("severity=9", "task toy-severity: severity=9 must be an integer in [1, 5]"),
    ("severity=2.5", "must be an integer in [1, 5]"),
    ("strength=2", "unknown option(s) strength for task toy-severity; its options: severity"),
    ("severity", "--topt takes KEY=VALUE"),
])
def test_bad_values_are_one_line(tmp_path, topt, message):
    r = run(tmp_path, "--topt", topt)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / f"{NAME}.csv").exists()


def test_another_tasks_shorthand_is_refused(tmp_path):
    r = run(tmp_path, "--noise", "0.2")
    assert r.exit_code == 2 and "--noise does not apply to task toy-severity" in r.output


def test_bench_list_prints_it():
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 0 and "severity=1" in r.output and "an integer in [1, 5]" in r.output


def test_the_legacy_shorthands_are_options_too():
    """--noise, --noise-seed, --augment and --dropout set the same options --topt does, and keep their run ids."""
    a = make_config("cifar10-noise", minimizer="sgd", noise=0.4)
    b = make_config("cifar10-noise", minimizer="sgd", topts={"noise": 0.4})
    assert a.run_id == b.run_id and a.noise == 0.4 and a.topts["noise"] == 0.4
    with pytest.raises(Exception, match="given twice"):
        make_config("cifar10-noise", minimizer="sgd", noise=0.4, topts={"noise": 0.2})
