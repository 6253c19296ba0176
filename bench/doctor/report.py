"""What a doctor check is (`Check`: a verdict, what it saw, what to do), the sections they come in, and how they
are shown: one line each as they come, and the whole as markdown."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.errors import UserError

OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"


@dataclass(frozen=True)
class Check:
    name: str
    verdict: str          # ok | warn | fail | info
    detail: str
    fix: str = ""         # what to do, where not ok


@dataclass
class Section:
    title: str
    checks: list[Check] = field(default_factory=list)
    table: str = ""       # a markdown table shown after the checks (--full's timings)


@dataclass(frozen=True)
class Context:
    data_dir: Path
    results_dir: Path
    cuda: bool            # torch can use a GPU here


def first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:240]}" if text else type(error).__name__


def check_line(c: Check) -> str:
    return f"  {c.verdict:<4}  {c.name}: {c.detail}" + (f"  -> {c.fix}" if c.fix else "")


def show(section: Section, say: Callable[[str], None]) -> None:
    say(f"[{section.title}]")
    for c in section.checks:
        say(check_line(c))
    if section.table:
        say(section.table)


def markdown(header: list[str], sections: list[Section]) -> str:
    cell = lambda s: s.replace("|", "\\|")  # noqa: E731
    out = ["# bench doctor", "", *[f"{h}  " for h in header], "", summary(sections), ""]
    for s in sections:
        out += [f"## {s.title}", "", "| verdict | check | detail | what to do |", "| --- | --- | --- | --- |"]
        out += [f"| {c.verdict} | {cell(c.name)} | {cell(c.detail)} | {cell(c.fix)} |" for c in s.checks]
        out += ["", s.table, ""] if s.table else [""]
    return "\n".join(out)


def summary(sections: list[Section]) -> str:
    verdicts = [c.verdict for s in sections for c in s.checks]
    return f"{verdicts.count(FAIL)} failed, {verdicts.count(WARN)} warnings, {verdicts.count(OK)} ok"


def write_report(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    except OSError as e:
        raise UserError(f"cannot write the report to {path}: {first_line(e)}; pass --out FILE") from None
