"""Numbers as people read them, in logs and tables: one formatter for the whole suite."""
from __future__ import annotations

from typing import Any

DASH = "–"  # what a table prints where there is no number


def number(value: Any, digits: int | None = None) -> str:
    """`digits` fixed decimals with thousands separators (tables: "1,234.50"); without, four significant digits, a
    whole float as an integer (logs: "0.1234", "200"). None is a dash; anything else its str()."""
    if value is None:
        return DASH
    if isinstance(value, float):
        if digits is not None:
            return f"{value:,.{digits}f}"
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return str(value)
