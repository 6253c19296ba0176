"""Which paper cell a results row belongs to: its settings against the tables' plans (`bench report`).

A plan is plain data, table -> preset -> the settings (`RunConfig.identity()`) of every run that
`bench reproduce --preset PRESET` would run for the table, each with the row and variant labels of its cell
(`bench.tables.plan.planned_settings` makes it). A row belongs to a plan, and to that cell, when its settings
equal a planned run's, seed aside. Rows are CSV cells read back (text, or numbers pandas guessed), plans are
typed values: both are brought to one spelling first. No torch and no task registry here: only RunConfig's
field names and defaults.
"""
from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from bench.config import DEFAULTS, NOT_IDENTITY
from bench.store.records import canon

# The settings a plan fixes and a cell holds equal: a run's identity without its seed, in RunConfig's order.
FIELDS = tuple(f for f in DEFAULTS if f not in NOT_IDENTITY and f != "seed")
SHOWN = ("task", "model", "minimizer", "noise")  # a cell's coordinates: the first columns of "Other runs"
Plans = Mapping[str, Mapping[str, list[dict]]]  # table -> preset -> settings of each planned run
# a planned run's cell: its row's and variant's labels, its column's key (bench.tables.layout.columns)
ROW, VARIANT, COLUMN = "cell_row", "cell_variant", "cell_column"


def pct(noise: float) -> str:
    return f"{noise * 100:.4g} %"


def run_settings(row: Mapping[str, Any]) -> tuple:
    """A run's settings, comparable with a plan's; a cell missing (a CSV older than its column) takes
    RunConfig's default."""
    def value(f):
        v = row.get(f)
        gone = v is None or (isinstance(v, str) and not v.strip()) or (pd.api.types.is_scalar(v) and pd.isna(v))
        return DEFAULTS[f] if gone else v
    return tuple(canon(value(f)) for f in FIELDS)


def _owners(plans: Plans) -> dict[tuple, dict[tuple[str, str], tuple[str, str]]]:
    """Planned settings -> {(table, preset) plan naming them: (row, variant, column) of the cell}, in the plans'
    order (a plan written before columns had keys: the minimizer's name)."""
    owners: dict[tuple, dict[tuple[str, str], tuple[str, str]]] = {}
    for table, by_preset in plans.items():
        for preset, runs in by_preset.items():
            for identity in runs:
                cells = owners.setdefault(run_settings(identity), {})
                cells.setdefault((table, preset), (str(identity.get(ROW, "")), str(identity.get(VARIANT, "")),
                                                   str(identity.get(COLUMN, identity.get("minimizer", "")))))
    return owners


def presets(plans: Plans) -> list[str]:
    return list(dict.fromkeys(p for by_preset in plans.values() for p in by_preset))


def _diff(settings: tuple, ref: tuple) -> list[int]:
    return [i for i, (a, b) in enumerate(zip(settings, ref)) if a != b]


def _text(settings: tuple, where: list[int]) -> str:
    return ", ".join(f"{FIELDS[i]}={settings[i]}" for i in where)


def _compared(settings: tuple, owners: dict) -> tuple[str, str, str]:
    """(settings in which a run differs, the planned run it is compared with, that run's preset) for a run
    no plan names: the plan of its own task/model/minimizer/noise if any, else the closest of its task."""
    cell = [FIELDS.index(f) for f in SHOWN]
    same_task = [k for k in owners if k[0] == settings[0]]
    if not same_task:
        return "", "", ""
    ref = min(same_task, key=lambda k: (any(k[i] != settings[i] for i in cell), len(_diff(settings, k))))
    table, preset = next(iter(owners[ref]))
    where = f"{table} ({preset})"
    if any(ref[i] != settings[i] for i in cell):  # not its own cell: name the planned run it is closest to
        noise = float(ref[FIELDS.index("noise")])
        where += f": {ref[1]} {ref[2]}" + (f", noise {pct(noise)}" if noise else "")
    return _text(settings, _diff(settings, ref)), where, preset


def match_plans(results: pd.DataFrame, plans: Plans) -> pd.DataFrame:
    """The (normalised) results, each row with where it belongs: `in_plans`, the (table, preset) plans
    naming its settings, `cells`, {(table, preset): (row, variant, column) of its cell}, and `planned`; for the
    others `differs` and `compared` (see `_compared`); `settings`, its settings as a tuple; `variant`, what
    sets its curve apart (preset or differences)."""
    df = results.copy()
    owners, several = _owners(plans), len(presets(plans)) > 1
    settings = [run_settings(r) for r in df.to_dict("records")]
    df["settings"] = pd.Series(settings, index=df.index, dtype=object)
    df["cells"] = pd.Series([owners.get(k, {}) for k in settings], index=df.index, dtype=object)
    df["in_plans"] = pd.Series([tuple(owners.get(k, ())) for k in settings], index=df.index, dtype=object)
    df["planned"] = df["in_plans"].map(bool).astype(bool)
    differs, compared, variant = [], [], []
    for k, mine in zip(settings, df["in_plans"]):
        text, where, preset = ("", "", "") if mine else _compared(k, owners)
        differs.append(text)
        compared.append(where)
        if mine:  # a curve of planned runs needs naming only beside another preset's
            variant.append(f"preset {mine[0][1]}" if several else "")
        else:  # the same differences from two presets' plans are two settings
            variant.append(text + (f" (vs preset {preset})" if several and preset else ""))
    df["differs"], df["compared"], df["variant"] = differs, compared, variant
    # Tasks no plan covers: no reference, so name the settings that vary among their runs.
    lone = ~df["planned"] & (df["compared"] == "")
    for _, runs in df[lone].groupby("task", dropna=False):
        keys = list(runs["settings"])
        vary = [i for i, f in enumerate(FIELDS) if f not in SHOWN and len({k[i] for k in keys}) > 1]
        df.loc[runs.index, "differs"] = [_text(k, vary) for k in keys]
        df.loc[runs.index, "variant"] = [_text(k, vary) for k in keys]
    return df
