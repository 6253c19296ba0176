"""--log tensorboard|wandb|none (bench/tracking.py): one-line refusals, no host sync per step, what each backend
gets. The backend logic runs against fakes put in sys.modules (so it is tested whatever is installed); the real
packages, where importable, write files that are read back (W&B offline: never the network)."""
from __future__ import annotations

import importlib.util
import math
import sys
import types

import pytest
import torch

from bench.train import tracking
from bench.config import RunConfig
from bench.errors import UserError
from bench.train.tracking import KINDS, Tracker, check_tracking, hparams, make_tracker


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


HAVE_TB = _importable("tensorboard")
HAVE_WANDB = _importable("wandb")


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """No W&B credentials, settings or network from the machine running the tests."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_DISABLED",
                 "WANDB_CONSOLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("NETRC", str(home / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "wandb-data"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.chdir(tmp_path)


def cfg(**kw) -> RunConfig:
    return RunConfig.of(task="demo", model="mlp", minimizer="sam", rho=0.05, epochs=3, **kw)


# ------------------------------------------------------------------------------------------------- fakes


class FakeWriter:
    made: list["FakeWriter"] = []

    def __init__(self, log_dir=None, purge_step=None, **kw):
        self.log_dir, self.purge_step = log_dir, purge_step
        self.scalars: list[tuple[str, float, int]] = []
        self.texts: dict[str, str] = {}
        self.summaries: list = []
        self.closed = False
        self.fail = False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        if self.fail:
            raise OSError("disk full")
        self.scalars.append((tag, value, step))

    def add_text(self, tag, text, global_step=None):
        self.texts[tag] = text

    def _get_file_writer(self):
        return types.SimpleNamespace(add_summary=lambda s, step: self.summaries.append((s, step)))

    def flush(self):
        pass

    def close(self):
        self.closed = True

    def tag(self, name):
        return [(step, value) for tag, value, step in self.scalars if tag == name]


@pytest.fixture
def fake_tb(monkeypatch):
    """torch.utils.tensorboard (and tensorboard) replaced by fakes that record what they are given."""
    FakeWriter.made = []
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeWriter
    summary = types.ModuleType("torch.utils.tensorboard.summary")
    summary.calls = []

    def fake_hparams(hparam_dict, metric_dict, hparam_domain_discrete=None):
        summary.calls.append((hparam_dict, metric_dict))
        return ("exp", "ssi", "sei")

    summary.hparams = fake_hparams
    module.summary = summary
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard.summary", summary)
    return summary


class FakeRun:
    def __init__(self, start_step=0):
        self.step = start_step
        self.logged: list[tuple[dict, int]] = []
        self.defined: list[tuple] = []
        self.summary: dict = {}
        self.exit_code = None

    def define_metric(self, name, step_metric=None):
        self.defined.append((name, step_metric))

    def log(self, row, step=None):
        self.logged.append((dict(row), step))

    def finish(self, exit_code=None):
        self.exit_code = exit_code


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.run = None
    module.inits = []
    module.start_step = 0
    module.init_error = None

    def init(**kw):
        if module.init_error:
            raise module.init_error
        module.inits.append(kw)
        module.last = FakeRun(module.start_step)
        return module.last

    module.init = init
    module.Settings = lambda **kw: ("Settings", kw)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def drive(tracker: Tracker, epochs=2, steps_per_epoch=5, first_step=1, gap=True):
    """Train-like calls: device-tensor losses with a graph, lr per step, epoch metrics. Returns what was sent."""
    w = torch.ones(3, requires_grad=True)
    sent, step = [], first_step
    for epoch in range(1, epochs + 1):
        for i in range(steps_per_epoch):
            loss = (w * (step * 0.5)).sum()
            lr = 0.1 / step
            tracker.step(step, loss, lr)
            sent.append((step, 1.5 * step, lr))
            step += 1
        metrics = {"epoch": epoch, "lr": 0.1, "train_loss": 1.0 / epoch, "train_acc": 50.0 + epoch,
                   "test_loss": 2.0, "test_acc": 40.0 + epoch, "passes": 10 * epoch, "wall_s": 3.5}
        if gap:
            metrics["surrogate_gap"] = 0.01 * epoch
        tracker.epoch(epoch, metrics)
    return sent


# ------------------------------------------------------------------------------------------ check_tracking


def test_check_tracking_refuses_unknown_kind_in_one_line():
    check_tracking("none")
    with pytest.raises(UserError) as e:
        check_tracking("mlflow")
    msg = str(e.value)
    assert "\n" not in msg and "mlflow" in msg and all(k in msg for k in KINDS)


@pytest.mark.parametrize("kind", ["wandb", "tensorboard"])
def test_check_tracking_refuses_missing_package_in_one_line(kind, monkeypatch):
    monkeypatch.setitem(sys.modules, kind, None)  # import of it now raises ImportError
    with pytest.raises(UserError) as e:
        check_tracking(kind)
    assert str(e.value) == (f"--log {kind} needs the {kind} package: pip install 'sambench[tracking]' "
                            f"(or pip install {kind})")
    with pytest.raises(UserError):
        make_tracker(kind, cfg(), tracking.Path("unused"))


def test_check_tracking_accepts_importable_packages(fake_tb, fake_wandb):
    check_tracking("tensorboard")
    check_tracking("wandb")


def test_make_tracker_none_does_nothing(tmp_path):
    t = make_tracker("none", cfg(), tmp_path / "run")
    assert type(t) is Tracker
    drive(t)
    t.close({"status": "ok"})
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ the buffering


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_step_does_not_sync_and_epoch_flushes_steps(kind, fake_tb, fake_wandb, monkeypatch, tmp_path):
    monkeypatch.setattr(tracking, "CHUNK", 3)  # the stacking of chunks runs too
    t = make_tracker(kind, cfg(), tmp_path)
    w = torch.ones(3, requires_grad=True)

    def boom(*a, **k):
        raise AssertionError("host sync in Tracker.step")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu"):
            m.setattr(torch.Tensor, name, boom)
        m.setattr(torch.cuda, "synchronize", boom)
        for step in range(11, 19):  # a resumed run: global steps go on from the checkpoint
            loss = (w * step).sum()
            t.step(step, loss, 0.1 * step)
    assert t.failed is None
    assert len(t._losses) < 8  # chunks of 3 stacked into one tensor each
    t.epoch(2, {"train_loss": 1.0})
    assert t.failed is None and t.last_step == 18
    expected = [(s, 3.0 * s, pytest.approx(0.1 * s)) for s in range(11, 19)]
    if kind == "tensorboard":
        writer = FakeWriter.made[-1]
        assert writer.tag("step/loss") == [(s, v) for s, v, _ in expected]
        assert writer.tag("step/lr") == [(s, lr) for s, _, lr in expected]
        assert writer.purge_step == 11  # drops what a crashed process logged after its checkpoint
    else:
        rows = [(r, step) for r, step in fake_wandb.last.logged if "step/loss" in r]
        assert rows == [({"global_step": s, "step/loss": v, "step/lr": lr}, s) for s, v, lr in expected]


def test_step_keeps_its_own_copy_of_the_loss(fake_tb, tmp_path):
    t = make_tracker("tensorboard", cfg(), tmp_path)
    loss = torch.tensor(2.0)
    t.step(1, loss, 0.1)
    loss.fill_(7.0)  # the caller reuses its tensor
    t.epoch(1, {})
    assert FakeWriter.made[-1].tag("step/loss") == [(1, 2.0)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_does_not_sync_on_cuda(fake_tb, tmp_path):
    t = make_tracker("tensorboard", cfg(), tmp_path)
    x = torch.randn(64, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 2 * tracking.CHUNK + 5):
            t.step(step, (x * x).mean(), 0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    t.epoch(1, {})
    assert t.failed is None and len(FakeWriter.made[-1].tag("step/loss")) == 2 * tracking.CHUNK + 4


# --------------------------------------------------------------------------------------- epoch metrics


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_epoch_metrics_numbers_only_gap_when_present(kind, fake_tb, fake_wandb, tmp_path):
    t = make_tracker(kind, cfg(), tmp_path)
    t.step(1, torch.tensor(1.0), 0.1)
    t.epoch(1, {"epoch": 1, "lr": 0.1, "train_loss": 1.25, "train_acc": 50.0, "surrogate_gap": 0.02,
                "test_acc": float("nan"), "test_loss": None, "note": "text", "synthetic": True, "passes": 30,
                "epoch_time_s": torch.tensor(2.5), "per_class": [1, 2]})
    t.step(2, torch.tensor(1.0), 0.1)
    t.epoch(2, {"epoch": 2, "lr": 0.05, "train_loss": 1.0, "test_acc": 60.0})  # a one-pass run: no gap
    first = {"lr": 0.1, "train_loss": 1.25, "train_acc": 50.0, "surrogate_gap": 0.02, "passes": 30,
             "epoch_time_s": 2.5}
    second = {"lr": 0.05, "train_loss": 1.0, "test_acc": 60.0}
    if kind == "tensorboard":
        writer = FakeWriter.made[-1]
        got = {}
        for tag, value, step in writer.scalars:
            if tag.startswith("epoch/"):
                got.setdefault(step, {})[tag[len("epoch/"):]] = value
        assert got == {1: first, 2: second}  # x axis: the epoch
    else:
        rows = [(r, s) for r, s in fake_wandb.last.logged if "epoch" in r]
        assert rows == [({"epoch": 1, **{f"epoch/{k}": v for k, v in first.items()}}, 1),
                        ({"epoch": 2, **{f"epoch/{k}": v for k, v in second.items()}}, 2)]
        assert ("epoch/*", "epoch") in fake_wandb.last.defined
        assert ("step/*", "global_step") in fake_wandb.last.defined


def test_numbers_of_skips_what_is_not_a_finite_number():
    got = tracking.numbers_of({"a": 1, "b": 2.5, "c": float("inf"), "d": math.nan, "e": "x", "f": None,
                               "g": True, "h": torch.tensor(3), "i": torch.zeros(2)})
    assert got == {"a": 1, "b": 2.5, "h": 3}


# ----------------------------------------------------------------------------------------- hyperparameters


def test_hparams_are_the_run_settings(fake_tb, fake_wandb, tmp_path):
    c = cfg(mopts={"layers": [1, 2]}, dropout=0.0)
    hp = hparams(c)
    row = c.to_row()
    assert hp["run_id"] == c.run_id and set(hp) == {"run_id", *row}
    assert all(isinstance(v, (str, int, float, bool)) for v in hp.values())
    assert hp["rho"] == 0.05 and hp["minimizer"] == "sam" and hp["mopts"] == row["mopts"]
    assert hp["m_layers"] == "[1, 2]"

    tb = make_tracker("tensorboard", c, tmp_path / "a")
    drive(tb, epochs=1)
    writer = FakeWriter.made[-1]
    assert "| rho | 0.05 |" in writer.texts["settings"] and f"| run_id | {c.run_id} |" in writer.texts["settings"]
    (hp_given, metrics), = fake_tb.calls
    assert hp_given == hp and "epoch/test_acc" in metrics and "epoch/surrogate_gap" in metrics
    assert writer.summaries == [("exp", 0), ("ssi", 0), ("sei", 0)]  # in this run, not a sub-run

    make_tracker("wandb", c, tmp_path / "b")
    assert fake_wandb.inits[-1]["config"] == hp


# ------------------------------------------------------------------------------------------------ W&B


def test_wandb_init_resumes_by_run_id_offline_when_not_logged_in(fake_wandb, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE")
    c = cfg()
    t = make_tracker("wandb", c, tmp_path / "runs" / c.run_id)
    kw = fake_wandb.inits[-1]
    assert kw["id"] == kw["name"] == c.run_id and kw["resume"] == "allow"
    assert kw["dir"] == str(tmp_path / "runs" / c.run_id) and kw["project"] == "sambench"
    assert kw["mode"] == "offline" == t.mode
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    make_tracker("wandb", c, tmp_path)
    assert fake_wandb.inits[-1]["project"] == "mine"


def test_wandb_mode(monkeypatch, tmp_path):
    netrc = tmp_path / "home" / "netrc"
    monkeypatch.delenv("WANDB_MODE")
    assert tracking.wandb_mode() == "offline"  # no credentials anywhere
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's explicit choice wins
    assert tracking.wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY")
    netrc.write_text("machine example.com login user password abc\n")
    assert tracking.wandb_mode() == "offline"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert tracking.wandb_logged_in() and tracking.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.mycompany.com")  # a self-hosted server: its own entry
    assert tracking.wandb_mode() == "offline"
    netrc.write_text("machine wandb.mycompany.com login user password " + "k" * 40 + "\n")
    assert tracking.wandb_mode() == "online"
    config = tmp_path / "home" / "wandb-config"  # `wandb offline` stored a mode
    config.mkdir()
    (config / "settings").write_text("[default]\nmode = offline\n")
    assert tracking.wandb_mode() == "offline"


def test_wandb_steps_stay_monotonic_across_a_resume(fake_wandb, tmp_path):
    fake_wandb.start_step = 8  # an online resume: the server has rows up to step 7
    t = make_tracker("wandb", cfg(), tmp_path)
    drive(t, epochs=2, steps_per_epoch=5, first_step=6)  # steps 6..15 (6 and 7 logged before the crash)
    logged = fake_wandb.last.logged
    steps = [s for _, s in logged]
    assert steps == sorted(steps) and min(steps) == 8
    assert [r["epoch"] for r, s in logged if "epoch" in r] == [1, 2]
    assert [s for r, s in logged if "epoch" in r] == [10, 15]  # an epoch's row: at its last step


@pytest.mark.parametrize("status,code", [("ok", 0), ("diverged", 0), ("failed", 1)])
def test_wandb_close_sets_summary_and_finishes(status, code, fake_wandb, tmp_path):
    t = make_tracker("wandb", cfg(), tmp_path)
    drive(t, epochs=1)
    t.step(6, torch.tensor(9.0), 0.01)  # an epoch that never ended: its steps are still logged
    t.close({"status": status, "note": "", "max_test_acc": 41.0, "final_test_acc": 41.0, "epochs": [{}],
             "surrogate_gap": 0.01})
    run = fake_wandb.last
    assert run.summary == {"summary/max_test_acc": 41.0, "summary/final_test_acc": 41.0,
                           "summary/surrogate_gap": 0.01, "status": status, "note": ""}
    assert run.exit_code == code
    assert ({"global_step": 6, "step/loss": 9.0, "step/lr": 0.01}, 6) in run.logged
    t.close({"status": "ok"})  # twice: nothing more
    t.epoch(9, {"train_loss": 1.0})
    assert not any(r.get("epoch") == 9 for r, _ in run.logged)


def test_wandb_start_failure_is_one_line(fake_wandb, tmp_path):
    fake_wandb.init_error = RuntimeError("network\nunreachable")
    with pytest.raises(UserError) as e:
        make_tracker("wandb", cfg(), tmp_path)
    assert "\n" not in str(e.value) and "network unreachable" in str(e.value)


# ---------------------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_close_logs_summary_and_closes(fake_tb, tmp_path):
    t = make_tracker("tensorboard", cfg(), tmp_path)
    drive(t, epochs=2)
    t.close({"status": "ok", "note": "", "max_test_acc": 42.0, "epochs": [{}, {}], "steps": 10})
    writer = FakeWriter.made[-1]
    assert writer.log_dir == str(tmp_path / "tensorboard")
    assert writer.tag("summary/max_test_acc") == [(2, 42.0)] and writer.tag("summary/steps") == [(2, 10)]
    assert "| status | ok |" in writer.texts["summary"]
    assert writer.closed


def test_backend_error_switches_the_tracker_off(fake_tb, tmp_path, capsys):
    t = make_tracker("tensorboard", cfg(), tmp_path)
    drive(t, epochs=1)
    FakeWriter.made[-1].fail = True
    drive(t, epochs=1, first_step=6)  # no exception reaches training
    assert t.failed == "disk full"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--log tensorboard switched off: disk full" in err[0]
    t.step(20, torch.tensor(1.0), 0.1)
    assert t._steps == []
    t.close({"status": "ok"})
    assert FakeWriter.made[-1].closed


# -------------------------------------------------------------------------------------------- real packages


@pytest.mark.skipif(not HAVE_TB, reason="tensorboard not installed")
def test_real_tensorboard_event_files_read_back_and_resume_purges(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    c = cfg()
    t = make_tracker("tensorboard", c, tmp_path)
    drive(t, epochs=2, steps_per_epoch=5)  # steps 1..10, epochs 1, 2
    t.close({"status": "failed", "note": "killed", "max_test_acc": 42.0})
    # a new process resumes from the checkpoint of epoch 1: steps 6..10 again, other values
    t = make_tracker("tensorboard", c, tmp_path)
    for step in range(6, 11):
        t.step(step, torch.tensor(100.0 + step), 0.5)
    t.epoch(2, {"train_loss": 0.5, "surrogate_gap": 0.02})  # bit-identical resume: epoch 2's metrics again
    t.close({"status": "ok", "max_test_acc": 43.0})
    log_dir = tmp_path / "tensorboard"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2  # appended, not clobbered
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("step/loss")]
    assert loss == [(s, 1.5 * s) for s in range(1, 6)] + [(s, 100.0 + s) for s in range(6, 11)]
    lr = [(e.step, e.value) for e in acc.Scalars("step/lr")]
    assert [s for s, _ in lr] == list(range(1, 11)) and lr[0][1] == pytest.approx(0.1)
    # the purge goes by step, and an epoch metric's step is its epoch: epoch 2, logged before the crash (after
    # its checkpoint) and again after the resume, shows twice, with the same values
    assert [(e.step, e.value) for e in acc.Scalars("epoch/train_loss")] == [(1, 1.0), (2, 0.5), (2, 0.5)]
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("epoch/surrogate_gap")] == [(1, 0.01), (2, 0.02),
                                                                                         (2, 0.02)]
    assert [e.value for e in acc.Scalars("summary/max_test_acc")] == [42.0, 43.0]
    assert "settings/text_summary" in acc.Tags()["tensors"]
    from tensorboard.plugins.hparams import plugin_data_pb2
    content = acc.PluginTagToContent("hparams")  # the HParams dashboard's summaries, in this same run
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["rho"].number_value == 0.05
    assert start.session_start_info.hparams["run_id"].string_value == c.run_id
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert "epoch/test_acc" in {m.name.tag for m in experiment.metric_infos}
    text = acc.Tensors("settings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert c.run_id in text and "| rho | 0.05 |" in text


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb not installed")
def test_real_wandb_offline_run_directory(tmp_path):
    import wandb
    c = cfg()
    folder = tmp_path / "runs" / c.run_id
    t = make_tracker("wandb", c, folder)
    assert t.mode == "offline"
    drive(t, epochs=2)
    t.close({"status": "ok", "max_test_acc": 42.0})
    assert t.failed is None
    runs = list((folder / "wandb").glob(f"offline-run-*-{c.run_id}"))
    assert len(runs) == 1
    data = runs[0] / f"run-{c.run_id}.wandb"
    assert data.is_file() and data.stat().st_size > 0
    if hasattr(wandb, "teardown"):
        wandb.teardown()
