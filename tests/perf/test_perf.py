"""bench/perf.py: the timing arithmetic, the interleaving, same start for all, perf.csv, the peer (CPU)."""
from __future__ import annotations

import csv
import importlib.util
import sys

import pytest
import torch

from bench.perf import step as perf
from bench.perf.common import Timer, append_perf_rows, percentile
from tasks.models import create_model
from bench.errors import UserError
from bench.perf.step import PASS, PEER, StepTiming

HAS_PEER = importlib.util.find_spec("pytorch_optimizer") is not None
CPU = torch.device("cpu")


def measure(model_name, num_classes, *args, **kwargs):
    """perf.measure with the CIFAR zoo as the model builder (what `bench perf` passes for CIFAR tasks)."""
    from tasks.models import create_model
    return perf.measure(model_name, num_classes, *args, builder=lambda: create_model(model_name, num_classes),
                        **kwargs)


class TickTimer:
    """A fake timer: every mark is 1 ms after the previous one, so each duration counts marks."""

    def __init__(self):
        self.now = 0.0

    def mark(self):
        self.now += 1.0
        return self.now

    def ms(self, a, b):
        return b - a

    def sync(self):
        pass


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: a second OpenMP thread gains nothing and, on a busy 2-core machine, costs ~10x."""


@pytest.fixture(scope="module")
def ticked(one_thread):
    """measure() on resnet20, batch 8, with the fake timer; (rows, trace)."""
    trace: list = []
    rows = measure("resnet20", 10, 8, steps=2, device="cpu", warmup=1, peer=HAS_PEER,
                        timer=TickTimer(), trace=trace)
    return rows, trace


def test_percentile_is_linear_interpolation():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 10) == pytest.approx(1.4)
    assert percentile(values, 90) == pytest.approx(4.6)
    assert percentile([7.0], 10) == 7.0


def test_summarize_arithmetic_on_hand_made_numbers():
    def st(step, opt, passes):
        return StepTiming(step, [1.0] * passes, opt)
    timings = {
        PASS: [st(s, 0.1, 1) for s in (9.0, 10.0, 11.0)],
        "sgd": [st(s, o, 1) for s, o in ((12.0, 1.0), (10.0, 1.0), (11.0, 1.0))],
        "sam": [st(s, o, 2) for s, o in ((25.0, 4.0), (22.0, 3.0), (23.0, 3.5))],
    }
    out = perf.summarize(timings, {PASS: 1, "sgd": 1, "sam": 2}, batch_size=64)
    assert set(out) == {"sgd", "sam"}
    sgd, sam = out["sgd"], out["sam"]
    assert sgd["ratio_to_sgd"] == 1.0 and sgd["minimizer_ms"] == 0.0 and sgd["overhead_pct"] == 0.0
    assert sgd["ms_median"] == 11.0 and sam["ms_median"] == 23.0
    assert sam["ratio_to_sgd"] == pytest.approx(23.0 / 11.0)
    assert sam["pass_ms"] == sgd["pass_ms"] == 10.0
    assert sam["opt_ms"] == 3.5 and sam["minimizer_ms"] == pytest.approx(2.5)   # 3.5 - sgd's 1.0
    assert sam["overhead_pct"] == pytest.approx(2.5 / 23.0 * 100)
    assert sam["overhead_ms"] == pytest.approx(23.0 - 2 * 10.0)
    assert sgd["overhead_ms"] == pytest.approx(11.0 - 10.0)
    assert sam["ms_p10"] == pytest.approx(22.2) and sam["ms_p90"] == pytest.approx(24.6)
    assert sam["images_per_s"] == pytest.approx(64 * 1000 / 23.0)


def test_to_timings_splits_a_step_at_the_closure_marks():
    # start=0, pass 1 [1, 5], ascent until 6, pass 2 [6, 11], descent until 13
    t = perf.to_timings([0.0, 1.0, 5.0, 6.0, 11.0, 13.0], Timer())
    assert t.step_ms == pytest.approx(13e3)
    assert t.pass_ms == pytest.approx([4e3, 5e3]) and t.opt_ms == pytest.approx(3e3)
    with pytest.raises(ValueError):
        perf.to_timings([0.0, 1.0, 2.0], Timer())


def test_measure_wiring_with_a_fake_timer(ticked):
    """Each mark is 1 ms: pass and sgd steps have 4 marks (3 ms, 1 ms after the closure), SAM steps 6
    (5 ms, 2 ms after the closures)."""
    rows, _ = ticked
    by = {r["minimizer"]: r for r in rows}
    assert list(by) == ["sgd", "sam", "asam"] + ([PEER] if HAS_PEER else [])
    assert by["sgd"]["ms_median"] == 3.0 and by["sgd"]["ratio_to_sgd"] == 1.0
    assert by["sgd"]["minimizer_ms"] == 0.0 and by["sgd"]["overhead_ms"] == 0.0
    for name in by:
        r = by[name]
        assert r["pass_ms"] == 3.0 and r["param_mib"] == pytest.approx(0.272474 * 4 / 1.048576, rel=0.001)  # homura resnet20
        assert r["peak_mem_mib"] is None  # CPU
        assert r["model"] == "resnet20" and r["batch_size"] == 8 and r["steps"] == 2
        assert r["precision"] == "fp32" and r["torch_version"] == torch.__version__
        assert r["ms_p10"] <= r["ms_median"] <= r["ms_p90"]
        assert list(r) == perf.COLUMNS
    for name in ["sam", "asam"] + ([PEER] if HAS_PEER else []):
        r = by[name]
        assert r["passes"] == 2 and r["ms_median"] == 5.0 and r["ratio_to_sgd"] == pytest.approx(5 / 3)
        assert r["opt_ms"] == 2.0 and r["minimizer_ms"] == 1.0
        assert r["overhead_pct"] == pytest.approx(20.0) and r["overhead_ms"] == -1.0
        assert r["images_per_s"] == pytest.approx(8 * 1000 / 5)
    assert by["sam"]["rho"] == 0.05 and by["asam"]["rho"] == 0.5 and by["asam"]["eta"] == 0.01
    assert by["sgd"]["rho"] is None


def test_steps_are_interleaved(ticked):
    _, trace = ticked
    order = [PASS, "sgd", "sam", "asam"] + ([PEER] if HAS_PEER else [])
    expected = [(r, n) for r in range(1) for n in order] + [(r, n) for r in range(2) for n in order]
    assert trace == expected


def test_sgd_is_always_measured_first_and_order_kept():
    trace: list = []
    rows = measure("resnet20", 10, 4, steps=1, device="cpu", warmup=0, minimizers=("asam", "sam"),
                        timer=TickTimer(), trace=trace)
    assert [r["minimizer"] for r in rows] == ["sgd", "asam", "sam"]
    assert [n for _, n in trace] == [PASS, "sgd", "asam", "sam"]


def test_same_initial_weights_and_same_batch_rho0_sam_equals_sgd():
    names = ["sgd", "sam", "asam"] + ([PEER] if HAS_PEER else [])
    init = perf.make_initial_model(lambda: create_model("resnet20", 10), seed=0)
    torch.manual_seed(123)  # the initial model depends on `seed` only
    assert all(torch.equal(a, b) for a, b in zip(init.state_dict().values(),
                                                 perf.make_initial_model(lambda: create_model("resnet20", 10), 0).state_dict().values()))
    hp = {"sam": {"rho": 0.0}, "asam": {"rho": 0.0, "eta": 0.01}, PEER: {"rho": 0.0}}
    cs = perf.build_contestants(init, names, hp, CPU)
    ref = cs[0].model.state_dict()
    for c in cs[1:]:
        assert c.model is not cs[0].model
        for k, v in c.model.state_dict().items():
            assert torch.equal(v, ref[k]), (c.name, k)
    x, y = perf.make_batch(8, 10, CPU, seed=0)
    x2, y2 = perf.make_batch(8, 10, CPU, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    perf.run_rounds(cs, x, y, 1, Timer())
    sgd_params = dict(cs[0].model.named_parameters())
    assert any(not torch.equal(p, init.state_dict()[n]) for n, p in sgd_params.items())  # it did step
    for c in cs[1:]:
        for n, p in c.model.named_parameters():
            torch.testing.assert_close(p, sgd_params[n], rtol=1e-6, atol=1e-7, msg=f"{c.name} {n}")


def test_real_timer_short_run_cpu():
    rows = measure("resnet20", 10, 8, steps=3, device=CPU, warmup=1)
    by = {r["minimizer"]: r for r in rows}
    assert set(by) == {"sgd", "sam", "asam"}
    assert by["sgd"]["ratio_to_sgd"] == 1.0
    for r in rows:
        assert r["ms_median"] > 0 and r["pass_ms"] > 0 and r["ms_p10"] <= r["ms_median"] <= r["ms_p90"]
        assert r["ratio_to_sgd"] == pytest.approx(r["ms_median"] / by["sgd"]["ms_median"])
        assert r["peak_mem_mib"] is None and "threads" in r["device_name"]
    table = perf.format_table(rows)
    assert "resnet20" in table and all(f"| {n} |" in table for n in by)


def test_bf16_autocast_runs_on_cpu():
    rows = measure("resnet20", 10, 2, steps=1, device="cpu", warmup=0, minimizers=("sam",),
                        precision="bf16", timer=TickTimer())
    assert [r["precision"] for r in rows] == ["bf16", "bf16"]


def test_perf_csv_rows(ticked, tmp_path):
    rows, _ = ticked
    path = append_perf_rows(rows, tmp_path)
    append_perf_rows(rows[:1], tmp_path)
    assert path == tmp_path / "perf.csv"
    with open(path, newline="") as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(rows) + 1
    assert [g["minimizer"] for g in got] == [r["minimizer"] for r in rows] + ["sgd"]
    for g, r in zip(got, rows):
        assert float(g["ms_median"]) == r["ms_median"] and g["model"] == "resnet20"
        assert g["device_name"] == r["device_name"] and g["torch_version"] == torch.__version__
        assert g["timestamp"] and g["git_commit"] and g["sambench_version"] and g["peak_mem_mib"] == ""
    assert len({g["timestamp"] for g in got[:len(rows)]}) == 1  # one call, one timestamp


def test_peer_missing_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)  # makes `import pytorch_optimizer` fail
    with pytest.raises(UserError, match=r"pip install pytorch-optimizer .*sambench\[peer\]"):
        measure("resnet20", 10, 4, steps=1, device="cpu", warmup=0, peer=True, timer=TickTimer())


@pytest.mark.skipif(not HAS_PEER, reason="pytorch-optimizer is not installed")
def test_peer_row(ticked):
    rows, _ = ticked
    peer = rows[-1]
    assert peer["minimizer"] == PEER and peer["impl"].startswith("pytorch-optimizer ")
    assert peer["rho"] == 0.05 and peer["passes"] == 2
    assert f"{PEER} (pytorch-optimizer" in perf.format_table(rows)


def test_bad_input_is_refused():
    for kw, match in [({"minimizers": ("sgd", "adamw")}, "unknown minimizer"),
                      ({"precision": "fp16"}, "precision"), ({"steps": 0}, "steps")]:
        with pytest.raises(UserError, match=match):
            measure("resnet20", 10, 4, device="cpu", **{"steps": 1, **kw})
    with pytest.raises(UserError, match="unknown model"):
        measure("resnet21", 10, 4, steps=1, device="cpu")


def test_format_table_shapes():
    assert perf.format_table([]) == "(no measurements)"
    row = {k: None for k in perf.COLUMNS} | {"minimizer": "sgd", "impl": "sambench", "model": "m",
                                            "ms_median": 1.5, "ratio_to_sgd": 1.0}
    other = row | {"model": "n", "minimizer": "sam"}
    table = perf.format_table([row, other])
    assert "model m" not in table.splitlines()[0] and "| model | minimizer |" in table
    assert "| m | sgd | 1.50 |" in table and "| n | sam |" in table  # differing models get a column


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_peak_memory_target():
    """The target: SAM's peak <= SGD's peak + one copy of the parameters (small allocator slack)."""
    rows = measure("resnet20", 10, 32, steps=3, device="cuda", warmup=1)
    by = {r["minimizer"]: r for r in rows}
    for r in rows:
        assert r["peak_mem_mib"] > r["param_mib"] and r["ms_median"] > 0
    slack = 0.02 * by["sgd"]["peak_mem_mib"] + 1.0
    assert by["sam"]["peak_mem_mib"] <= by["sgd"]["peak_mem_mib"] + by["sam"]["param_mib"] + slack


def test_bench_perf_command(tmp_path):
    from typer.testing import CliRunner

    from bench.cli.main import app
    r = CliRunner().invoke(app, ["perf", "--model", "resnet20", "--batch-size", "4", "--steps", "1", "--warmup", "0",
                                 "--device", "cpu", "--results-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    with open(tmp_path / "perf.csv") as f:
        rows = list(csv.DictReader(f))
    from bench.minimizers import MINIMIZERS
    assert [row["minimizer"] for row in rows] == ["sgd", *MINIMIZERS] and float(rows[0]["ratio_to_sgd"]) == 1.0
    assert all(row["device_name"] and row["git_commit"] for row in rows)
    passes = {row["minimizer"]: float(row["passes"]) for row in rows}  # counted by the batch, one step each
    assert (passes["sgd"], passes["sam"], passes["looksam"]) == (1.0, 2.0, 2.0)
    assert passes["esam"] == pytest.approx(1 + 1 / 3 + 0.5)
    r = CliRunner().invoke(app, ["perf", "--model", "resnet20", "--batch-size", "4", "--steps", "1", "--warmup", "0",
                                 "--device", "cpu", "--results-dir", str(tmp_path), "--minimizer", "gsam"])
    assert r.exit_code == 0 and "| gsam |" in r.output and "| sam |" not in r.output
    r = CliRunner().invoke(app, ["perf", "--model", "gpt5", "--device", "cpu"])
    assert r.exit_code == 2 and "unknown model 'gpt5'" in r.output


def test_step_mode_times_with_the_training_loops_backend_flags(monkeypatch):
    """`--what step` runs its steps under the flags `bench run` trains with (cudnn.benchmark on CUDA), records
    them in its rows, and leaves the process's flags as they were. No GPU: the training flags are planted."""
    from bench.train import runtime
    before = torch.backends.cudnn.benchmark
    seen = []
    monkeypatch.setattr(runtime, "set_backend_flags",
                        lambda cfg, device: setattr(torch.backends.cudnn, "benchmark", True))  # CUDA's choice
    rounds = perf.run_rounds
    monkeypatch.setattr(perf, "run_rounds", lambda *a, **k: seen.append(torch.backends.cudnn.benchmark)
                        or rounds(*a, **k))
    rows = measure("resnet20", 10, 2, 1, "cpu", warmup=0, minimizers=["sam"], timer=TickTimer())
    assert seen and all(seen) and all(r["cudnn_benchmark"] is True for r in rows)
    assert torch.backends.cudnn.benchmark == before


def test_a_schedule_is_timed_as_its_steps_alternate():
    from bench.perf.step import schedule_of
    assert schedule_of("sam@every5") == ("sam", 5) and schedule_of("asam@from0.875") == ("asam", 8)
    assert schedule_of("sam") is None
    for bad in ("sam@from0.7", "sam@each3", "sgd@every2", "looksam@every2", "sam@every0"):
        with pytest.raises(UserError):
            schedule_of(bad)
    rows = measure("resnet20", 10, 4, steps=4, device="cpu", warmup=0, minimizers=["sam@every2"], memory_steps=0)
    by = {r["minimizer"]: r for r in rows}
    assert by["sam@every2"]["passes"] == 1.5 and by["sam@every2"]["rho"] == 0.05  # two passes at steps 2 and 4


@pytest.mark.skipif(not HAS_PEER, reason="pytorch-optimizer is not installed")
def test_peer_wsam_is_timed_beside_ours_with_the_same_options():
    rows = measure("resnet20", 10, 4, steps=1, device="cpu", warmup=0, minimizers=["wsam"], peer=True, memory_steps=0)
    assert [r["minimizer"] for r in rows] == ["sgd", "wsam", PEER, "peer-wsam"]
    assert rows[-1]["impl"].startswith("pytorch-optimizer") and rows[-1]["passes"] == 2
