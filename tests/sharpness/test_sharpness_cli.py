"""`bench sharpness` end to end (kept weights -> sharpness.csv), its one-line refusals, and the ASAM study's
smoke preset through `bench reproduce` and `bench report`."""
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from bench.cli.main import app
from bench.report.load import load_results
from bench.store.records import result_rows
from bench.sharpness.measures import MEASURES

runner = CliRunner()
FAST = ["--examples", 256, "--m", 128, "--iters", 3, "--device", "cpu"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _run(results, *extra):
    r = invoke("run", "digits-noise", "--minimizer", "sam", "--epochs", 2, "--results-dir", results, "--quiet",
               "--device", "cpu", *extra)
    assert r.exit_code == 0, r.output
    return pd.read_csv(results / "digits-noise.csv").run_id.iloc[-1]


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    return results, _run(results, "--keep-weights")


def test_keep_weights_keeps_the_final_weights_under_the_same_run_id(kept, tmp_path):
    results, run_id = kept
    state = torch.load(results / "runs" / run_id / "weights.pt", weights_only=True)
    assert state["run_id"] == run_id and state["config"]["keep_weights"] is True
    assert _run(tmp_path) == run_id  # keeping weights changes nothing the run computes
    assert not (tmp_path / "runs" / run_id / "weights.pt").exists()


def test_sharpness_writes_one_row_per_measure_and_rho(kept):
    results, run_id = kept
    r = invoke("sharpness", run_id, "--results-dir", results, *FAST)
    assert r.exit_code == 0, r.output
    assert "wrote 8 rows" in r.output and "gap" in r.output
    df = pd.read_csv(results / "sharpness.csv")
    assert sorted(df.measure) == sorted(MEASURES) and (df.run_id == run_id).all()
    assert df.rho.isna().sum() == 2  # the Hessian measures take no radius
    for col in ("value", "train_acc", "test_acc", "gap_acc", "gap_loss", "sh_examples", "sh_m", "sh_seed", "sh_eta",
                "minimizer", "lr", "max_test_acc", "measure_device"):
        assert col in df, col
    assert (df.sh_examples == 256).all() and (df.minimizer == "sam").all()
    assert df.gap_acc.iloc[0] == pytest.approx(df.train_acc.iloc[0] - df.test_acc.iloc[0])
    before = df.set_index("measure").value
    # sharpness.csv holds measures, not runs: neither the report nor the sweeps read it as results
    assert len(load_results(results)) == 1 and "measure" not in load_results(results)
    assert [r["run_id"] for r in result_rows(results)] == [run_id]

    # measured again (same seed): the same values, the rows replaced, not added; new radii add rows
    r = invoke("sharpness", run_id, "--results-dir", results, *FAST, "--measure", "worst_l2", "--measure",
               "avg_l2", "--rho", 0.05, "--rho", 0.02)
    assert r.exit_code == 0, r.output
    df = pd.read_csv(results / "sharpness.csv")
    assert len(df) == 10 and not df.duplicated(["run_id", "measure", "rho"]).any()
    again = df[(df.rho == 0.05) & df.measure.isin(["worst_l2", "avg_l2"])].set_index("measure").value
    assert again["worst_l2"] == before["worst_l2"] and again["avg_l2"] == before["avg_l2"]


@pytest.mark.parametrize("args,words", [
    (["nope-run"], ["no run nope-run", "result.json"]),
    (["RUN", "--rho", "0"], ["--rho must be a number > 0"]),
    (["RUN", "--rho", "-1"], ["--rho must be a number > 0"]),
    (["RUN", "--examples", "100000"], ["more than the 1297 training examples", "at most 1297"]),
    (["RUN", "--measure", "flatness"], ["unknown measure(s) flatness", "worst_l2"]),
    (["RUN", "--m", "0"], ["--m must be an integer >= 1"]),
])
def test_bad_input_is_one_line(kept, args, words):
    results, run_id = kept
    r = invoke("sharpness", *[run_id if a == "RUN" else a for a in args], "--results-dir", results, "--device", "cpu")
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    for w in words:
        assert w in r.output, r.output


def test_a_run_without_kept_weights_says_how_to_keep_them(tmp_path):
    run_id = _run(tmp_path)
    r = invoke("sharpness", run_id, "--results-dir", tmp_path, "--device", "cpu")
    assert r.exit_code == 2 and "kept no weights" in r.output and "--keep-weights" in r.output, r.output


def test_study_smoke_trains_measures_reports_and_resumes(tmp_path):
    """The ASAM study's smoke preset: every grid point trained once, kept and measured; the report's Kendall
    table and scatter plots; a second sweep does nothing; a lost measurement is made again without training."""
    res = tmp_path / "res"
    args = ["reproduce", "asam-correlation", "--preset", "smoke", "--results-dir", res, "--device", "cpu",
            "--workers", 0]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    runs = pd.read_csv(res / "cifar10.csv")
    assert len(runs) == 4 and set(runs.dropout) == {0.0, 0.3} and set(runs.batch_size) == {16, 32}
    sharp = pd.read_csv(res / "sharpness.csv")
    assert len(sharp) == 4 * len(MEASURES) and set(sharp.run_id) == set(runs.run_id)
    assert (sharp.sh_examples == 16).all() and (sharp.sh_iters == 1).all()  # the smoke preset's light protocol

    r = invoke(*args)
    assert r.exit_code == 0 and "4 skipped" in r.output, r.output

    kept = sharp[sharp.run_id != runs.run_id.iloc[0]]
    kept.to_csv(res / "sharpness.csv", index=False)  # one run's measures lost
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    sharp2 = pd.read_csv(res / "sharpness.csv")
    assert len(sharp2) == len(sharp) and len(pd.read_csv(res / "cifar10.csv")) == 4
    first = sharp2[sharp2.run_id == runs.run_id.iloc[0]].set_index("measure").value
    assert first.equals(sharp[sharp.run_id == runs.run_id.iloc[0]].set_index("measure").value.loc[first.index])
    log = (res / "runs" / runs.run_id.iloc[0] / "output.log").read_text()
    assert log.count("already done") == 1  # measured again, not trained again

    # synthetic runs are a pipeline check: the report lists them last, with no Kendall table and no scatter plot
    # (the study's table and plots on real rows: tests/report/test_report_sharpness.py)
    r = invoke("report", "--results-dir", res, "--preset", "smoke")
    assert r.exit_code == 0, r.output
    md = (res / "report.md").read_text()
    checks = md[md.index("## Pipeline checks on synthetic data"):]
    assert "### ASAM's study" in checks and "Kendall" not in md
    assert not list(res.glob("report-sharpness-*.png"))


def test_measures_run_in_exact_fp32_whatever_the_tf32_flags(kept, monkeypatch):
    """The protocol says fp32: TF32 (torch's default in cuDNN convolutions, --fast's in matmuls) is off while
    measuring, and the flags are as they were afterwards."""
    from bench.sharpness import measures as sm
    results, run_id = kept
    seen, measure = [], sm.measure
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return measure(*args, **kwargs)

    monkeypatch.setattr(sm, "measure", spy)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        r = invoke("sharpness", run_id, "--results-dir", results, "--measure", "worst_l2", *FAST)
        after = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert r.exit_code == 0, r.output
    assert seen == [(False, False)] and after == (True, True)
