"""Consoles, one-line errors and small printing helpers every command shares."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import typer
from rich.console import Console

from bench.errors import UserError

# Wide enough for a results table when output goes to a file or a pipe (rich would assume 80 columns).
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 1000)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A UserError becomes one line on stderr and exit status 2 (no traceback)."""
    try:
        yield
    except UserError as e:
        msg = str(e)
        if "Original Traceback" in msg:  # raised in a DataLoader worker: keep the message, not the trace
            msg = msg.strip().rsplit("UserError: ", 1)[-1]
        err_console.print(f"error: {msg}", style="bold red", highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(2)


def say(text: str) -> None:
    console.print(text, highlight=False, markup=False)


def _print_lines(lines: list[str]) -> None:
    for line in lines:
        say(line)
