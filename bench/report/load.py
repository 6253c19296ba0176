"""Reading what the report reports on: every results CSV of a folder (one row per run id) and the papers'
published cells, each a one-line error naming the file when it cannot be read."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import UserError
from bench.report.paper import MARKS, TARGET_KEY
from bench.store.records import results_csvs

REQUIRED = ["run_id", "task", "model", "minimizer"]


OPTIONAL = {"noise": 0.0, "synthetic": False, "status": "ok"}  # older CSVs predate these columns


TARGET_COLUMNS = [*TARGET_KEY, "mean"]


TARGET_OPTIONAL = ["spread", "spread_kind", "confidence", "source"]


def _read_csv(path: Path, what: str, required: list[str], **kw: Any) -> pd.DataFrame | None:
    """A CSV, or None for a 0-byte file; anything unreadable is a UserError naming the file (one line)."""
    try:
        df = pd.read_csv(path, **kw)
    except pd.errors.EmptyDataError:
        return None
    except (ValueError, UnicodeDecodeError, OSError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{path} is not a readable {what} ({reason}); fix or move it away") from None
    missing = [c for c in required if c not in df]
    if missing:
        raise UserError(f"{path} is not a readable {what} (no column {', '.join(missing)}); "
                        "fix or move it away")
    return df


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Add the optional columns and give them one type, whichever CSVs the rows came from. Idempotent."""
    df = df.copy()
    for col in REQUIRED:
        if col not in df:
            df[col] = pd.Series(dtype=object)
    for col, default in OPTIONAL.items():
        if col not in df:
            df[col] = default
    df["noise"] = pd.to_numeric(df["noise"], errors="coerce").fillna(0.0).astype(float)
    # bools, "True"/"False" strings, or empty (rows written before the column existed)
    df["synthetic"] = df["synthetic"].map(
        lambda v: v if isinstance(v, bool) else str(v).strip().lower() in {"true", "1", "1.0"}).astype(bool)
    df["status"] = df["status"].fillna("ok").astype(str).str.strip().replace("", "ok")
    return df


def load_results(results_dir: str | Path) -> pd.DataFrame:
    """Every `<results_dir>/<task>.csv` (bench.store.records.results_csvs), one row per run_id (a re-run wins)."""
    folder = Path(results_dir)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; point to the folder holding the results CSVs")
    frames = []
    for path in results_csvs(folder):
        df = _read_csv(path, "results CSV", REQUIRED, dtype={c: str for c in [*REQUIRED, "status", "note"]})
        if df is not None:  # a 0-byte file holds no runs
            frames.append(df)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=REQUIRED)
    df = normalise(df).drop_duplicates("run_id", keep="last").reset_index(drop=True)
    df.attrs["results_dir"] = str(folder)
    return df


def load_targets(path: str | Path) -> pd.DataFrame:
    """The papers' published cells. Kept as text, so a figure prints exactly as the CSV spells it ("81.6"
    stays, a spread "<0.1" too)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; pass the papers' cells (results/paper/paper-cells.csv)")
    df = _read_csv(path, "paper-cells CSV", TARGET_COLUMNS, dtype=str, keep_default_na=False)
    if df is None:
        df = pd.DataFrame(columns=TARGET_COLUMNS)
    for col in TARGET_OPTIONAL:
        if col not in df:
            df[col] = ""
    df = df.apply(lambda c: c.str.strip())
    for bad, what in ((pd.to_numeric(df["mean"], errors="coerce").isna(), "mean {!r} is not a number"),
                      (~df["confidence"].isin([*MARKS, ""]), f"confidence {{!r}} is none of {', '.join(MARKS)}")):
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            value = df["mean" if "mean" in what else "confidence"].iloc[i]
            raise UserError(f"{path} line {i + 2}: {what.format(value)}; fix it")
    return df
