"""Declared options: a minimizer's (its `Hparams`) and a task's (its `Options`) are frozen dataclasses whose fields
carry their default, one line of meaning and their valid range (`option(...)`). `bench list`, the CLI's `--mopt`
and `--topt`, the recipes and the tables all read them; `make_options` is the one range check."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import field, fields
from typing import Any, Iterable

from bench.errors import UserError


class OptionError(UserError, ValueError):
    """An option outside its range, or unknown: one line for the CLI, a ValueError for callers."""


def option(default, help: str, *, ge=None, gt=None, le=None, lt=None, integer: bool = False,
           choices: tuple | None = None):
    """An option field: its default, one line of meaning, and its valid range."""
    return field(default=default, metadata={"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt,
                                            "integer": integer, "choices": choices})


def describe_range(f: dataclasses.Field) -> str:
    m = f.metadata
    if isinstance(f.default, bool):
        return "true or false"
    if m.get("choices"):
        return "one of " + ", ".join(map(str, m["choices"]))
    lo = f"[{m['ge']}" if m.get("ge") is not None else f"({m['gt']}" if m.get("gt") is not None else "(-inf"
    hi = f"{m['le']}]" if m.get("le") is not None else f"{m['lt']})" if m.get("lt") is not None else "inf)"
    return ("an integer in " if m.get("integer") else "in ") + f"{lo}, {hi}"


def check_value(owner: str, f: dataclasses.Field, value, flag: bool = False) -> Any:
    """The value converted to the field's type, or a one-line OptionError that names the range. `owner` says
    whose option it is ("minimizer gsam", "task cifar10"); `flag`: the option has a flag of its own (--noise),
    which the message names."""
    m, default = f.metadata, f.default
    bad = OptionError(f"--{f.name.replace('_', '-')} must be {describe_range(f)}, got {value!r} ({owner}: "
                      f"{m.get('help', '')})" if flag else
                      f"{owner}: {f.name}={value!r} must be {describe_range(f)} ({m.get('help', '')})")
    if m.get("choices"):
        if value not in m["choices"]:
            raise bad
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise OptionError(f"{owner}: {f.name}={value!r} must be true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad
    if m.get("integer") and float(value) != int(value):
        raise bad
    value = int(value) if m.get("integer") else float(value)
    if ((m.get("ge") is not None and not value >= m["ge"]) or (m.get("gt") is not None and not value > m["gt"])
            or (m.get("le") is not None and not value <= m["le"]) or (m.get("lt") is not None and not value < m["lt"])):
        raise bad
    return value


def make_options(owner: str, cls: type, values: dict[str, Any], flags: Iterable[str] = ()):
    """cls(**values) with every value checked; an unknown key is refused with the valid list. `flags`: the
    options with a flag of their own."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        valid = ", ".join(known) or "none"
        raise OptionError(f"unknown option(s) {', '.join(unknown)} for {owner}; its options: {valid}")
    return cls(**{k: check_value(owner, known[k], v, k in flags) for k, v in values.items()})


def resolve(owner: str, cls: type, *layers: dict[str, Any], flags: Iterable[str] = ()) -> dict[str, Any]:
    """Every option of `cls`, resolved: its defaults, then each layer in turn (a recipe's, then the user's),
    checked once."""
    values = {f.name: f.default for f in fields(cls)}
    for layer in layers:
        values.update(layer)
    return dataclasses.asdict(make_options(owner, cls, values, flags))


def option_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Nothing to set."""
