"""The `bench` command line through typer's CliRunner: end to end runs, rows, and one-line errors."""
import pandas as pd
import pytest
from typer.testing import CliRunner

from bench.cli.main import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_list_shows_tasks_models_minimizers_defaults():
    r = invoke("list")
    assert r.exit_code == 0, r.output
    for word in ("cifar10", "cifar100", "resnet20", "wrn28_10", "sam rho=0.05", "asam rho=0.5", "asam rho=1.0 eta=0.0",
                 "lr=0.1", "epochs=200", "gsam", "alpha=", "Zhuang", "esam", "looksam", "fsam", "samon",
                 "sam_adaptive_all"):
        assert word in r.output


@pytest.fixture(scope="module")
def three_runs(fake_cifar10, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    outputs = {}
    for m in ("sgd", "sam", "asam"):
        r = invoke("run", "cifar10", "--minimizer", m, "--epochs", 2, "--batch-size", 64, "--workers", 0,
                   "--data-dir", fake_cifar10, "--results-dir", results, "--seed", 7)
        assert r.exit_code == 0, r.output
        outputs[m] = r.output
    return results, outputs


def test_runs_append_one_row_each(three_runs):
    results, outputs = three_runs
    df = pd.read_csv(results / "cifar10.csv")
    assert list(df.minimizer) == ["sgd", "sam", "asam"]
    assert list(df.rho) == [0.0, 0.05, 0.5] and list(df.eta) == [0.0, 0.0, 0.0]
    for col in ("run_id", "status", "seed", "model", "lr", "weight_decay", "batch_size", "max_test_acc",
                "final_test_acc", "wall_time_s", "images_per_s", "device_name", "torch_version", "git_commit",
                "synthetic", "train_size"):
        assert col in df.columns, col
    assert (df.status == "ok").all() and df.synthetic.all() and (df.seed == 7).all()
    assert (df.epochs_done == 2).all() and (df.images_per_s > 0).all()
    assert df.run_id.is_unique
    for _, row in df.iterrows():
        epochs = pd.read_csv(results / "runs" / row.run_id / "epochs.csv")
        assert list(epochs.epoch) == [1, 2]
        assert row.max_test_acc == pytest.approx(epochs.test_acc.max())
        assert row.final_test_acc == pytest.approx(epochs.test_acc.iloc[-1])
        assert epochs.lr.iloc[1] < epochs.lr.iloc[0]  # cosine per epoch
        assert {"train_loss", "train_acc", "test_loss", "test_acc"} <= set(epochs.columns)
    assert "max_test_acc" in outputs["asam"] and "epoch   2" in outputs["asam"]


def test_same_seed_same_result(three_runs, fake_cifar10, tmp_path):
    results, _ = three_runs
    r = invoke("run", "cifar10", "--minimizer", "sam", "--epochs", 2, "--batch-size", 64, "--workers", 0,
               "--data-dir", fake_cifar10, "--results-dir", tmp_path, "--seed", 7, "--quiet")
    assert r.exit_code == 0, r.output
    a = pd.read_csv(results / "cifar10.csv").set_index("minimizer").loc["sam"]
    b = pd.read_csv(tmp_path / "cifar10.csv").iloc[0]
    assert a.run_id == b.run_id
    assert a.final_train_loss == b.final_train_loss and a.final_test_acc == b.final_test_acc


@pytest.mark.parametrize("args,needle", [
    (["run", "cifar11"], "unknown task 'cifar11'; choose one of: cifar10, cifar10-noise, cifar100"),
    (["run", "cifar10", "--model", "resnet21"], "unknown model 'resnet21'"),
    (["run", "cifar10", "--minimizer", "adamw"], "unknown minimizer 'adamw' for task cifar10; choose one of: sgd, sam, asam"),
    (["run", "cifar10", "--minimizer", "sam", "--rho", "-0.1"], "minimizer sam: rho=-0.1 must be in [0, inf)"),
    (["run", "cifar10", "--minimizer", "asam", "--eta", "-1"], "minimizer asam: eta=-1.0 must be in [0, inf)"),
    (["run", "cifar10", "--minimizer", "sam", "--mopt", "alpha=0.1"],
     "unknown option(s) alpha for minimizer sam; its options: rho"),
    (["run", "cifar10", "--minimizer", "sam", "--mopt", "rho"], "--mopt takes KEY=VALUE"),
    (["run", "cifar10", "--minimizer", "sam", "--mopt", "rho=big"], "minimizer sam: rho='big' must be in [0, inf)"),
    (["run", "cifar10", "--minimizer", "sam", "--rho", "0.1", "--mopt", "rho=0.2"], "rho given twice"),
    (["run", "cifar10", "--mopt", "rho=0.2"], "sgd alone takes no minimizer options"),
    (["run", "cifar10", "--batch-size", "128", "--accumulate", "3"], "--accumulate 3 must be >= 1 and divide"),
    (["run", "cifar10", "--accumulate", "4", "--m", "64"], "--m 64 is larger than a micro-batch (32 examples"),
    (["run", "cifar10", "--minimizer", "esam", "--mopt", "beta=1.5"], "minimizer esam: beta=1.5 must be in (0, 1]"),
    (["run", "cifar10", "--minimizer", "esam", "--mopt", "gamma=0"], "minimizer esam: gamma=0 must be in (0, 1]"),
    (["run", "cifar10", "--minimizer", "looksam", "--mopt", "k=0"], "minimizer looksam: k=0 must be an integer in [1, inf)"),
    (["run", "cifar10", "--minimizer", "looksam", "--mopt", "k=2.5"], "k=2.5 must be an integer"),
    (["run", "cifar10", "--minimizer", "gsam", "--mopt", "alpha=-1"], "minimizer gsam: alpha=-1 must be in [0, inf)"),
    (["run", "cifar10", "--minimizer", "gsam", "--m", "32"], "--m (m-sharpness) is not defined for gsam"),
    (["run", "cifar10", "--minimizer", "gsamm"], "unknown minimizer 'gsamm'"),
    (["run", "cifar10", "--precision", "fp8"], "--precision must be one of fp32, bf16, fp16"),
    (["run", "cifar10", "--target-acc", "101"], "--target-acc must be a percentage in [0, 100]"),
    (["run", "cifar10", "--lr", "0"], "--lr must be a finite number > 0"),
    (["run", "cifar10", "--epochs", "0"], "--epochs must be >= 1"),
    (["run", "cifar10", "--seed", "-1"], "--seed and --noise-seed must be >= 0"),
    (["run", "cifar10", "--bn-second-pass", "maybe"], "--bn-second-pass must be 'update' or 'freeze'"),
    (["run", "cifar10", "--data-dir", "/nonexistent/x"], "cifar10 not found (or corrupted) at /nonexistent/x/cifar-10-batches-py/"),
    (["data", "fake", "mnist", "/tmp/x"], "unknown task 'mnist'"),
])
def test_user_errors_are_one_line(args, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run refused after its claim leaves its lock file under ./results, not in the repo
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert needle in r.output
    assert "Traceback" not in r.output
    assert len([ln for ln in r.output.splitlines() if ln.startswith("error:")]) == 1


def test_cuda_without_gpu_is_refused(fake_cifar10, tmp_path, monkeypatch):
    import torch
    monkeypatch.chdir(tmp_path)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = invoke("run", "cifar10", "--device", "cuda", "--data-dir", fake_cifar10, "--quiet")
    assert r.exit_code == 2 and "CUDA is not available" in r.output


def test_data_fake_command(tmp_path):
    r = invoke("data", "fake", "cifar100", tmp_path, "--train", 50, "--test", 20)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cifar-100-python" / "train").exists()


def test_report_command(three_runs, tmp_path):
    results, _ = three_runs
    out = tmp_path / "r.md"
    r = invoke("report", "--results-dir", results, "--out", out, "--plot", "cifar10:resnet20")
    assert r.exit_code == 0, r.output
    text = out.read_text()
    # 2 epochs at batch 64 is no preset's plan: listed apart from the (empty) Table 2, by its differences.
    assert "## ASAM Table 2" not in text and "- ASAM Table 2: 0 of 24 cells run" in text
    assert "#### cifar10 — synthetic data" in text
    assert "| resnet20 | asam | epochs=2, batch_size=64, lr=0.05 | asam2 (full) |" in text  # lr scaled with the batch
    # synthetic runs are pipeline checks: listed last, never drawn, and --plot says why
    assert "- cifar10 / resnet20: synthetic data only (a pipeline check: not drawn)" in text
    assert not list(tmp_path.glob("r-*.png"))
    assert invoke("report", "--results-dir", tmp_path / "none").exit_code == 2
    bad = invoke("report", "--results-dir", results, "--plot", "cifar10")
    assert bad.exit_code == 2 and "TASK:MODEL" in bad.output


def test_typed_flags_win_over_the_config_file_even_at_their_defaults(fake_cifar10, tmp_path):
    # The file sets another lr and seed; the command line types the defaults (0.1, 0). The typed values
    # win; the file still supplies what was not typed (epochs, batch size, workers).
    conf = tmp_path / "c.toml"
    conf.write_text("lr = 0.05\nseed = 3\nepochs = 1\nbatch_size = 64\nworkers = 0\n")
    r = invoke("run", "cifar10", "--config", conf, "--lr", 0.1, "--seed", 0, "--data-dir", fake_cifar10,
               "--results-dir", tmp_path / "res")
    assert r.exit_code == 0, r.output
    assert "epochs=1 batch=64 lr=0.1 seed=0" in r.output
    row = pd.read_csv(tmp_path / "res" / "cifar10.csv").iloc[0]
    assert (row.lr, row.seed, row.epochs, row.batch_size, row.workers) == (0.1, 0, 1, 64, 0)


def test_environment_variable_wins_over_the_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the refused run's claim lock goes under ./results: not the repo's
    conf = tmp_path / "c.toml"
    conf.write_text(f'data_dir = "{tmp_path / "from-file"}"\n')
    r = runner.invoke(app, ["run", "cifar10", "--config", str(conf), "--quiet"],
                      env={"SAMBENCH_DATA_DIR": str(tmp_path / "from-env")})
    assert r.exit_code == 2 and "from-env" in r.output and "from-file" not in r.output


def test_report_preset_smoke_on_a_hand_made_folder(tmp_path):
    from bench.registry import tables_file
    from bench.tables.layout import load_tables
    from bench.tables.plan import planned_settings

    smoke = planned_settings(load_tables(tables_file()), ["smoke"])["asam2"]["smoke"]
    rows = [{**s, "run_id": f"r{i}", "status": "ok", "synthetic": True, "max_test_acc": 30.0 + i}
            for i, s in enumerate(smoke)]
    rows.append({**rows[0], "run_id": "off", "lr": 0.5, "max_test_acc": 90.0})
    pd.DataFrame(rows).to_csv(tmp_path / "cifar10.csv", index=False)
    r = invoke("report", "--results-dir", tmp_path, "--preset", "smoke")
    assert r.exit_code == 0, r.output
    text = (tmp_path / "report.md").read_text()
    assert "## ASAM Table 2: CIFAR-10, maximum test accuracy (%) — synthetic data" in text
    assert "| resnet20 | 30.00 (1) | 31.00 (1) | 32.00 (1) |" in text
    assert "| resnet20 | sgd | lr=0.5 | asam2 (smoke) | 90.00 (1) |" in text
    # The default preset (full) plans none of these: all four are other runs.
    assert "the 4 other runs" in invoke("report", "--results-dir", tmp_path).output
    bad = invoke("report", "--results-dir", tmp_path, "--preset", "huge")
    assert bad.exit_code == 2 and "unknown preset 'huge'" in bad.output


def runs_per_table(output):
    """`bench reproduce --dry-run` output -> table: runs planned plus runs not planned (parts not built yet)."""
    import re
    counts = {}
    for line in output.splitlines():
        if m := re.match(r"(\w+) \(.*\): (\d+) runs", line):
            table = m.group(1)
            counts[table] = int(m.group(2))
        elif m := re.match(r"(\w+): skipped: ", line):
            table = m.group(1)
            counts[table] = sum(int(n) for n in re.findall(r"\((\d+) runs not planned\)", line))
        elif m := re.match(r"  not planned: .* \((\d+) runs\)$", line):
            counts[table] += int(m.group(1))
    return counts


def test_reproduce_a_papers_tables_dry_run(tmp_path):
    r = invoke("reproduce", "sam", "--dry-run", "--results-dir", tmp_path)
    assert r.exit_code == 0, r.output
    # sam1: 2 datasets x 5 rows x 3 augmentations x (SGD at E and 2E epochs + SAM) x 5 seeds; sam2: 3 ResNets x
    # 3 epoch counts x 2 x 5; sam4: 4 noise rates x 2 x 5; sam5: 2 datasets x 2 models x 2 augmentations x 3 x 5.
    assert runs_per_table(r.output) == {"sam1": 450, "sam2": 90, "sam4": 40, "sam5": 120}
    assert "sam2 (imagenet): 90 runs, 0 already done, 90 to run" in r.output
    assert "sam4 (cifar10-noise): 40 runs, 0 already done, 40 to run" in r.output
    r = invoke("reproduce", "sam", "--preset", "smoke", "--dry-run", "--results-dir", tmp_path)
    assert r.exit_code == 0 and runs_per_table(r.output) == {"sam1": 6, "sam2": 2, "sam4": 2, "sam5": 6}
    r = invoke("reproduce", "asam", "--dry-run", "--results-dir", tmp_path)
    assert runs_per_table(r.output) == {"asam2": 120, "asam3": 120, "asam4": 9, "asam5": 9, "asam6": 36}
    bad = invoke("reproduce", "sam3", "--dry-run")
    assert bad.exit_code == 2 and "unknown table(s) sam3" in bad.output and "or a paper: asam, sam" in bad.output
