"""Every command the README and docs/ show is checked, so that no documented command can rot.

What is a documented command: a line of a fenced code block (``` with no language, bash, sh, shell or console)
of README.md or docs/*.md, continuation lines (a trailing backslash) joined, a trailing `# comment` dropped, split
at `&&` and `;`. Of those:
- a `bench` command: the first word (after VAR=value prefixes) is `bench` or ends in `/bench`, or the line runs
  `-m bench` (python -m bench, torchrun ... -m bench). Its subcommands must exist, and every `--option` it uses must
  be one of that command's options (read from the click command Typer builds); `bench <command> --help` must
  exit 0. `...` stands for options left out and is skipped.
- a `make TARGET` command: `make -n TARGET` (a dry run) must exit 0 in the repository.
Other lines (pip install, python code, sbatch scripts' bodies, shell set-up) are not commands of ours and are
skipped. Relative links of those files must point at files that exist.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from bench.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"", "bash", "sh", "shell", "console"}


def code_lines(text: str) -> list[str]:
    """The shell lines of a markdown text's fenced code blocks, continuation lines joined."""
    lines, block, joined = [], None, ""
    for raw in text.splitlines():
        fence = re.match(r"^\s*```\s*(\S*)", raw)
        if fence:
            block = None if block is not None else fence.group(1).lower()
            continue
        if block is None or block not in SHELLS:
            continue
        if raw.rstrip().endswith("\\"):
            joined += raw.rstrip()[:-1] + " "
            continue
        lines.append(joined + raw)
        joined = ""
    return lines


def commands(line: str) -> list[list[str]]:
    """A shell line's commands as words (comments dropped, split at && and ;); [] for what shlex cannot read."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return []
    out, current = [], []
    for w in words:
        if w in ("&&", ";", "||", "|"):
            out.append(current)
            current = []
        else:
            current.append(w)
    return [c for c in out + [current] if c]


def bench_args(words: list[str]) -> list[str] | None:
    """The arguments a command passes to bench, or None when it does not run bench."""
    if "-m" in words and words.index("-m") + 1 < len(words) and words[words.index("-m") + 1] == "bench":
        return words[words.index("-m") + 2:]
    rest = [w for w in words if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)] or [""]
    if rest[0] == "bench" or rest[0].endswith("/bench"):
        return rest[1:]
    return None


def documented() -> list[tuple[str, list[str]]]:
    """(where, words) of every command the docs show."""
    out = []
    for path in DOCS:
        for line in code_lines(path.read_text()):
            for words in commands(line):
                out.append((f"{path.relative_to(ROOT)}: {line.strip()}", words))
    return out


def check_bench(args: list[str]) -> str | None:
    """What is wrong with `bench ARGS` (a command or option that does not exist), or None."""
    command = typer.main.get_command(app)  # Typer's own click: a group is what has subcommands
    path = []
    while getattr(command, "commands", None) and args and not args[0].startswith("-"):
        sub = command.commands.get(args[0])
        if sub is None:
            return f"no command `bench {' '.join(path + [args[0]])}`"
        command, path, args = sub, path + [args[0]], args[1:]
    known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
    unknown = [a.split("=", 1)[0] for a in args if a.startswith("--") and a.split("=", 1)[0] not in known]
    if unknown:
        return f"`bench {' '.join(path)}` has no option {', '.join(unknown)}"
    result = CliRunner().invoke(app, [*path, "--help"])
    return None if result.exit_code == 0 else f"`bench {' '.join(path)} --help` exited {result.exit_code}"


def test_the_docs_show_commands_and_every_bench_command_and_option_exists():
    found = [(where, bench_args(words)) for where, words in documented()]
    bench_lines = [(where, args) for where, args in found if args is not None]
    assert len(bench_lines) >= 20, "the docs' commands were not found: has the rule above stopped matching them?"
    problems = [f"{where}\n    {problem}" for where, args in bench_lines
                if (problem := check_bench([a for a in args if a != "..."])) is not None]
    assert not problems, "\n".join(problems)


def test_every_documented_make_target_dry_runs():
    targets = sorted({words[1] for _, words in documented() if words[0] == "make" and len(words) > 1})
    assert {"smoke", "test"} <= set(targets)
    for target in targets:
        done = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"make -n {target}: {done.stderr}"


@pytest.mark.parametrize("line, problem", [
    ("bench run cifar10 --minimiser sam", "`bench run` has no option --minimiser"),
    ("CUDA_VISIBLE_DEVICES=0 .venv/bin/bench reproduce asam2 --dry-run --seedz 3", "has no option --seedz"),
    ("torchrun --nproc-per-node 8 -m bench runn imagenet", "no command `bench runn`"),
])
def test_a_misspelled_command_or_option_is_caught(line, problem):
    [words] = commands(line)
    assert problem in check_bench(bench_args(words))


def test_the_rule_reads_blocks_continuations_and_comments():
    text = "```bash\nbench reproduce asam2 --launcher slurm \\\n    --partition gpu  # submit\nmake smoke && make test\n" \
           "```\n```python\nbench = 1\n```\n"
    lines = code_lines(text)
    assert [w for line in lines for w in commands(line)] == [
        ["bench", "reproduce", "asam2", "--launcher", "slurm", "--partition", "gpu"], ["make", "smoke"],
        ["make", "test"]]
    assert check_bench(["reproduce", "asam2", "--launcher", "slurm", "--partition", "gpu"]) is None


def test_relative_links_point_at_files_that_exist():
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if not re.match(r"^[a-z]+:", target) and not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, broken
