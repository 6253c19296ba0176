"""Test-accuracy curves per epoch, one PNG per task and model: seeds averaged, settings never."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.report.load import normalise
from bench.store.files import atomic_replace
from bench.store.history import read_history
from bench.tables.cells import pct
from bench.tables.layout import NAMES

ORDER = ["sgd", "adam", "sam", "asam"]  # plot legend order; table columns follow tables.toml


def _test_acc(path: Path) -> pd.Series | None:
    """A run's test accuracy by epoch (None when its log has none: a BLEU task, nothing to plot as accuracy)."""
    acc = {h["epoch"]: h["test_acc"] for h in read_history(path) if "test_acc" in h}
    return pd.Series(acc, dtype=float).dropna() if acc else None


def plot_curves(results_dir: str | Path, results: pd.DataFrame, task: str, model: str, out_png: str | Path,
                noise: float | None = None, synthetic: bool | None = None) -> bool:
    """Test accuracy per epoch: mean over seeds, band = min..max. False (nothing written) without logs.
    Runs with a `variant` column (from match_plans) get one line per variant."""
    runs = normalise(results)
    runs = runs[(runs["task"] == task) & (runs["model"] == model) & (runs["status"] == "ok")]
    if noise is not None:
        runs = runs[(runs["noise"] - noise).abs() < 1e-9]
    if synthetic is not None:
        runs = runs[runs["synthetic"] == bool(synthetic)]
    curves: dict[tuple, list[pd.Series]] = {}
    for r in runs.itertuples(index=False):
        path = Path(results_dir) / "runs" / str(r.run_id) / "epochs.csv"
        acc = _test_acc(path) if path.is_file() else None
        if acc is not None and len(acc):
            # Separate lines per noise rate, data kind and setting: those are never averaged together.
            curves.setdefault((r.minimizer, r.noise, r.synthetic, getattr(r, "variant", "")), []).append(acc)
    if not curves:
        return False

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: keeps `bench` startup fast
    from matplotlib.figure import Figure  # no pyplot: no global state, always the Agg canvas
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    many_noise = len({k[1] for k in curves}) > 1
    many_kinds = len({k[2] for k in curves}) > 1
    rank = {m: i for i, m in enumerate(ORDER)}
    for key in sorted(curves, key=lambda k: (rank.get(k[0], len(ORDER)), k[0], k[1], k[2], k[3])):
        m, rate, fake, variant = key
        seeds = pd.concat(curves[key], axis=1).sort_index()  # epochs x runs
        n = seeds.shape[1]
        label = NAMES.get(m, m.upper()) + (f", noise {pct(rate)}" if many_noise else "")
        label += (" (synthetic)" if fake and many_kinds else "") + (f", {variant}" if variant else "")
        label += f" ({n} run{'s' * (n > 1)})"
        (line,) = ax.plot(seeds.index, seeds.mean(axis=1), label=label)
        ax.fill_between(seeds.index, seeds.min(axis=1), seeds.max(axis=1), color=line.get_color(),
                        alpha=0.2, lw=0)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=plot_title(task, model, noise, synthetic))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, Path(out_png), dpi=120)
    return True


def plot_title(task: str, model: str, noise: float | None, synthetic: bool | None) -> str:
    return (f"{task} / {model}" + (f", noise {pct(noise)}" if noise else "")
            + (" (synthetic data)" if synthetic else ""))


def save_png(fig, path: Path, dpi: int = 110) -> None:
    """A figure as a PNG, written whole (a temporary file and an atomic rename)."""
    atomic_replace(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
