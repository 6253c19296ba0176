"""`bench doctor`: every check of bench.doctor.checks (and, with --full on a GPU, the training sequence of
bench.doctor.full), printed as they come and written as markdown; the exit status says whether one failed."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from bench.doctor import full as doctor_full
from bench.doctor.checks import SECTIONS, header_lines, run_section
from bench.doctor.report import FAIL, Context, markdown, show, summary, write_report
from bench.errors import UserError


def check_folder_option(flag: str, value: str) -> Path:
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {value} is a file, not a folder; pass a folder")
    return path


def run_doctor(data_dir: str, results_dir: str, out: str | None = None, *, full: bool = False,
               say: Callable[[str], None] = print, **tiny) -> int:
    """Run every check (and with `full`, bench.doctor.full's GPU sequence; `tiny`: its device, model,
    batch_size, steps), print them as they come, write the markdown report; the exit status (1: a fail)."""
    data, results = check_folder_option("--data-dir", data_dir), check_folder_option("--results-dir", results_dir)
    out_path = Path(out) if out else results / "doctor.md"
    if out_path.is_dir():
        raise UserError(f"--out {out} is a folder; pass a file name, e.g. {out_path / 'doctor.md'}")
    given = [f"--{k.replace('_', '-')}" for k, v in tiny.items() if v is not None]
    if given and not full:
        raise UserError(f"{', '.join(given)}: for --full only")
    plan = None
    if full:
        plan = doctor_full.make_plan(**tiny)  # bad options fail here, before any check runs
    ctx, header = Context(data, results, torch.cuda.is_available()), header_lines()
    for line in header:
        say(line)
    sections = []
    for title, fn in SECTIONS:
        sections.append(run_section(title, fn, ctx))
        show(sections[-1], say)
    if full:
        sections += doctor_full.run_full(plan, ctx, lambda s: show(s, say), say)
    write_report(out_path, markdown(header, sections))
    say(f"{summary(sections)}; wrote {out_path}")
    return 1 if any(c.verdict == FAIL for s in sections for c in s.checks) else 0
