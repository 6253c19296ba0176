"""bench/perf_loop.py (`bench perf --what loop`): the arithmetic on planted timings, the interleaving, the real
loop on tiny synthetic data (CIFAR-10 and IWSLT'14), perf.csv shared with step mode, the CLI's refusals (CPU)."""
from __future__ import annotations

import csv

import pytest
import torch
from typer.testing import CliRunner

from bench.perf import loop as perf_loop
from bench.train.batch import Cost
from bench.cli.main import app
from bench.errors import UserError
from bench.perf.loop import Chunk
from corpus import write_synthetic_corpus

# Tiny: CIFAR-10 resnet20 at batch 16, chunks of 2 steps, 2 warm-up rounds, 2 timed chunks per minimizer.
TINY = ["--batch-size", "16", "--steps", "4", "--warmup", "2", "--chunk", "2", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: a second OpenMP thread gains nothing on a busy 2-core machine."""


class TickTimer:
    """A fake wall clock: every now() is one second after the previous; sync() calls are counted."""

    def __init__(self):
        self.t, self.syncs = 0.0, 0

    def now(self):
        self.t += 1.0
        return self.t

    def sync(self):
        self.syncs += 1


class FakeContestant:
    """Records its fetch/step calls, in order, into a shared list; `items` per batch."""

    def __init__(self, name, calls, items=4):
        self.name, self.calls, self.items = name, calls, items

    def fetch(self):
        self.calls.append(("fetch", self.name))
        return None, None, self.items

    def step(self, x, y):
        self.calls.append(("step", self.name))


# -- arithmetic on planted numbers ---------------------------------------------------------------------------

def test_summarize_loop_on_planted_timings():
    chunks = {  # chunks of 5 steps: per-step times 10, 12, 11 ms (sgd) and 22, 25, 23 ms (sam)
        "sgd": [Chunk(0.050, 0.005, 5, 640), Chunk(0.060, 0.005, 5, 640), Chunk(0.055, 0.005, 5, 640)],
        "sam": [Chunk(0.110, 0.010, 5, 640), Chunk(0.125, 0.000, 5, 640), Chunk(0.115, 0.005, 5, 640)],
    }
    out = perf_loop.summarize_loop(chunks, {"sgd": 0.5, "sam": 0.9}, "sgd", compiled=False)
    sgd, sam = out["sgd"], out["sam"]
    assert sgd["steps"] == sam["steps"] == 15
    assert sgd["ms_median"] == pytest.approx(11.0) and sam["ms_median"] == pytest.approx(23.0)
    assert sgd["ms_p10"] == pytest.approx(10.2) and sgd["ms_p90"] == pytest.approx(11.8)  # linear interpolation
    assert sgd["ratio_to_sgd"] == 1.0 and sam["ratio_to_sgd"] == pytest.approx(23.0 / 11.0)
    assert sam["ms_mean"] == pytest.approx(1e3 * 0.350 / 15)
    assert sgd["items_per_s"] == pytest.approx(640 / 0.055) and sam["items_per_s"] == pytest.approx(640 / 0.115)
    assert sgd["data_ms"] == pytest.approx(1.0) and sam["data_ms"] == pytest.approx(1e3 * 0.015 / 15)
    assert sgd["first_step_ms"] == pytest.approx(500.0) and sgd["compile_s"] is None  # no compile: none


def test_ratio_is_to_the_base_optimizer_whatever_its_name():
    chunks = {"adam": [Chunk(0.02, 0.0, 2, 100)], "asam": [Chunk(0.05, 0.0, 2, 100)]}
    out = perf_loop.summarize_loop(chunks, {}, "adam", compiled=False)
    assert out["adam"]["ratio_to_sgd"] == 1.0 and out["asam"]["ratio_to_sgd"] == pytest.approx(2.5)
    assert out["asam"]["first_step_ms"] is None and out["asam"]["items_per_s"] == pytest.approx(2000.0)


def test_compile_s_is_the_first_step_minus_the_steady_median():
    chunks = {"sgd": [Chunk(0.10, 0.0, 5, 1), Chunk(0.10, 0.0, 5, 1)], "sam": [Chunk(0.20, 0.0, 5, 1)]}
    out = perf_loop.summarize_loop(chunks, {"sgd": 30.02, "sam": 41.04}, "sgd", compiled=True)
    assert out["sgd"]["compile_s"] == pytest.approx(30.0) and out["sam"]["compile_s"] == pytest.approx(41.0)
    assert out["sgd"]["ms_median"] == pytest.approx(20.0)  # the first step is never in ms/step


def test_passes_per_step_counts_only_between_the_snapshots():
    before, after = Cost(fwd=3, bwd=3, steps=3), Cost(fwd=3 + 8, bwd=3 + 8, steps=3 + 4)
    assert perf_loop.passes_per_step(before, after) == 2.0
    assert perf_loop.passes_per_step(before, before) is None


def test_minimizer_names_base_first_defaults_and_dedup():
    from bench.registry import get_task
    assert perf_loop.minimizer_names(get_task("cifar10"), None) == ["sgd", "sam", "asam"]
    assert perf_loop.minimizer_names(get_task("iwslt14-de-en"), None) == ["adam", "sam", "asam"]
    assert perf_loop.minimizer_names(get_task("cifar10"), ["gsam", "sgd", "gsam"]) == ["sgd", "gsam"]


# -- the rounds ----------------------------------------------------------------------------------------------

def test_rounds_interleave_chunks_of_every_contestant_in_turn():
    calls, trace = [], []
    contestants = [FakeContestant(n, calls) for n in ("sgd", "sam", "asam")]
    out = perf_loop.run_rounds(contestants, rounds=2, chunk=3, timer=TickTimer(), trace=trace)
    assert trace == [(r, n) for r in range(2) for n in ("sgd", "sam", "asam")]
    expected = [(kind, n) for _ in range(2) for n in ("sgd", "sam", "asam") for _ in range(3)
                for kind in ("fetch", "step")]
    assert calls == expected
    assert {n: len(cs) for n, cs in out.items()} == {"sgd": 2, "sam": 2, "asam": 2}


def test_a_chunk_is_synced_at_both_ends_and_its_data_wait_measured_apart():
    timer = TickTimer()
    c = perf_loop.time_chunk(FakeContestant("sgd", [], items=7), 3, timer)
    # now(): start, then 2 per step around fetch, then the end: wall 7 ticks, data 3 (one per fetch)
    assert (c.wall_s, c.data_s, c.steps, c.items) == (7.0, 3.0, 3, 21.0)
    assert timer.syncs == 2


def test_bad_loop_arguments_are_user_errors():
    with pytest.raises(UserError, match="--chunk >= 1"):
        perf_loop.measure_loop("cifar10", {"device": "cpu"}, chunk=0)
    with pytest.raises(UserError, match="unknown minimizer 'nope'"):
        perf_loop.measure_loop("cifar10", {"device": "cpu", "model": "resnet20"}, ["nope"], steps=1)


# -- the real loop -------------------------------------------------------------------------------------------

def test_contestants_start_from_the_same_weights():
    from bench.registry import get_task
    from bench.recipes import make_config
    task = get_task("digits-noise")
    cfgs = [make_config("digits-noise", minimizer=m, epochs=1, device="cpu") for m in ("sgd", "sam", "asam")]
    cs, _, written = perf_loop.build_all(task, cfgs, torch.device("cpu"), False, None, 10, print)
    assert not written and [c.name for c in cs] == ["sgd", "sam", "asam"]
    ref = cs[0].st.model.state_dict()
    for c in cs[1:]:
        assert all(torch.equal(v, c.st.model.state_dict()[k]) for k, v in ref.items())


@pytest.fixture(scope="module")
def cifar_loop(tmp_path_factory):
    """`bench perf --what loop` on CIFAR-10 (no --data-dir: synthetic data), then step mode into the same CSV."""
    results = tmp_path_factory.mktemp("perf")
    r = CliRunner().invoke(app, ["perf", "--what", "loop", "--task", "cifar10", "--model", "resnet20", *TINY,
                                 "--results-dir", str(results)])
    step = CliRunner().invoke(app, ["perf", "--model", "resnet20", "--batch-size", "4", "--steps", "1", "--warmup",
                                    "0", "--minimizer", "sam", "--device", "cpu", "--results-dir", str(results)])
    with open(results / "perf.csv") as f:
        rows = list(csv.DictReader(f))
    return r, step, rows


def test_loop_rows_for_sgd_sam_asam_name_every_option(cifar_loop):
    r, _, rows = cifar_loop
    assert r.exit_code == 0, r.output
    assert "timed on synthetic data" in r.output and "| sam |" in r.output and "images/s" in r.output
    loop = [row for row in rows if row["what"] == "loop"]
    assert [row["minimizer"] for row in loop] == ["sgd", "sam", "asam"]
    for row in loop:
        assert (row["task"], row["model"], row["batch_size"], row["precision"]) == ("cifar10", "resnet20", "16", "fp32")
        assert (row["channels_last"], row["compile"], row["loader"], row["workers"]) == ("False", "False",
                                                                                        "torchvision", "0")
        assert (row["steps"], row["chunk"], row["warmup"], row["items_unit"]) == ("4", "2", "2", "images/s")
        assert row["synthetic"] == "True" and row["device_name"] and row["torch_version"] and row["timestamp"]
        assert float(row["ms_p10"]) <= float(row["ms_median"]) <= float(row["ms_p90"])
        assert float(row["items_per_s"]) > 0 and float(row["data_ms"]) >= 0 and row["compile_s"] == ""
    assert [float(row["passes_per_step"]) for row in loop] == [1.0, 2.0, 2.0]
    assert float(loop[0]["ratio_to_sgd"]) == 1.0 and float(loop[1]["ratio_to_sgd"]) > 1.0


def test_step_and_loop_rows_share_perf_csv(cifar_loop):
    _, step, rows = cifar_loop
    assert step.exit_code == 0, step.output
    assert [(row["what"], row["minimizer"]) for row in rows] == [("loop", "sgd"), ("loop", "sam"), ("loop", "asam"),
                                                                   ("step", "sgd"), ("step", "sam")]
    assert rows[3]["passes"] == "1.0" and rows[0]["passes"] == "" and rows[3]["passes_per_step"] == ""
    assert rows[3]["task"] == "cifar10" and rows[0]["ms_median"] and rows[3]["ms_median"]


def test_translation_loop_reports_tokens_per_s(tmp_path):
    corpus = write_synthetic_corpus(tmp_path / "iwslt", n_train=120, n_valid=8, n_test=8)
    notes: list = []
    rows = perf_loop.measure_loop("iwslt14-de-en", {"model": "transformer_tiny", "batch_size": 256,
                                                    "data_dir": str(corpus), "device": "cpu", "workers": 0},
                                  steps=4, warmup=2, chunk=2, log=notes.append)
    assert [r["minimizer"] for r in rows] == ["adam", "sam", "asam"]
    assert all(r["items_unit"] == "tokens/s" and r["items_per_s"] > 0 for r in rows)
    assert [r["passes_per_step"] for r in rows] == [1.0, 2.0, 2.0] and rows[0]["ratio_to_sgd"] == 1.0
    assert rows[0]["loader"] == "TokenBatchLoader" and rows[0]["batch_size"] == 256 and rows[0]["synthetic"]
    assert any("synthetic" in n for n in notes)
    assert "tokens/s" in perf_loop.format_loop_table(rows) and "× adam" in perf_loop.format_loop_table(rows)


def test_device_loader_and_channels_last_are_named_in_the_rows():
    """Fashion-MNIST's MLP demo (its real data where the machine has it, else synthetic) on the device loader."""
    rows = perf_loop.measure_loop("fmnist-demo", {"model": "mlp", "batch_size": 32, "loader": "device",
                                                  "channels_last": True, "device": "cpu", "workers": 0},
                                  ["sam"], steps=2, warmup=1, chunk=2)
    assert [r["minimizer"] for r in rows] == ["sgd", "sam"] and [r["passes_per_step"] for r in rows] == [1.0, 2.0]
    assert all(r["loader"] == "device" and r["channels_last"] is True and r["workers"] == 0 for r in rows)


# -- the CLI -------------------------------------------------------------------------------------------------

def test_step_mode_refuses_translation_in_one_line():
    r = CliRunner().invoke(app, ["perf", "--task", "iwslt14-de-en", "--device", "cpu"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--what loop" in lines[0] and "iwslt14-de-en" in lines[0]


def test_bad_what_and_loop_only_options_in_step_mode_are_refused():
    r = CliRunner().invoke(app, ["perf", "--what", "epoch", "--device", "cpu"])
    assert r.exit_code == 2 and "--what must be step or loop" in r.output
    r = CliRunner().invoke(app, ["perf", "--compile", "--chunk", "3", "--device", "cpu"])
    assert r.exit_code == 2 and "--compile, --chunk: for --what loop only" in r.output
    r = CliRunner().invoke(app, ["perf", "--what", "loop", "--peer", "--device", "cpu"])
    assert r.exit_code == 2 and "--peer applies to --what step" in r.output


def test_peak_memory_is_each_contestants_own_footprint(monkeypatch):
    """A contestant's peak_mem_mib is what its build left allocated plus the rise during its first step, not the
    GPU's total (other contestants' weights sit there too). A fake allocator stands in for CUDA's counters."""
    from types import SimpleNamespace
    mem = {"alloc": 1000, "peak": 1000}  # 1000 bytes held by whatever came before

    def device_memory(device, reset_peak=False):
        if reset_peak:
            mem["peak"] = mem["alloc"]
        return mem["alloc"]

    class Grows(FakeContestant):
        def __init__(self, name, built, kept, transient):
            super().__init__(name, [])
            self.st = SimpleNamespace(device=torch.device("cuda", 0))
            self.built_bytes, self.peak_bytes, self.kept, self.transient = built, None, kept, transient
            mem["alloc"] += built  # its weights, allocated when it was built

        def step(self, x, y):  # optimizer state kept, activations freed
            mem["peak"] = max(mem["peak"], mem["alloc"] + self.kept + self.transient)
            mem["alloc"] += self.kept

    monkeypatch.setattr(perf_loop, "device_memory", device_memory)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: mem["peak"])
    a, b = Grows("sgd", built=100, kept=50, transient=30), Grows("sam", built=100, kept=150, transient=60)
    perf_loop.first_steps([a, b], TickTimer())
    assert (a.peak_bytes, b.peak_bytes) == (180, 310)


def test_loop_rows_have_an_empty_peak_on_the_cpu(cifar_loop):
    _, _, rows = cifar_loop
    assert all(row["peak_mem_mib"] == "" for row in rows)  # step and loop rows: one column, empty on the CPU
