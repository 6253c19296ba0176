"""Every command the README and docs/ show is checked, so that no documented command can rot.

Where commands are read (README.md and docs/*.md):
- block commands: the lines of fenced code blocks tagged bash, sh, shell, console, zsh or untagged (```python and
  ```toml blocks are code, not commands), continuation lines (a trailing backslash) joined, a leading `$ ` prompt
  and a trailing `# comment` dropped, split at `&&`, `||`, `;` and `|`;
- inline commands: code spans in the prose (`...`) whose first word, after VAR=value prefixes, is `bench`,
  `.../bench`, `make`, `torchrun`, `pip` or `python[3]` (a span may wrap across lines).

What each kind must pass:
- bench (the first word after VAR=value prefixes is `bench` or ends in `/bench`, or the line runs `-m bench`:
  `python -m bench`, `PYTHONPATH=. python3 -m bench`, `torchrun ... -m bench`):
  1. every subcommand exists, every `--option` is one of that subcommand's options (as the click command Typer
     builds declares them), and `bench <subcommand> --help` exits 0;
  2. unless it is a sketch (a placeholder word: ALL_CAPS such as RUN_ID or DIR, or <angle brackets>) or, inline, a
     fragment that leaves out a required argument (`bench run`), click parses it (option types, argument counts),
     and then it runs as far as it safely can, with --results-dir a fresh temporary folder and its VAR=value
     prefixes as its environment: `bench reproduce` with --dry-run added (unless it asks for --status): tables,
     presets, launcher and SLURM options are resolved, nothing trains; `bench run` up to its RunConfig (training
     stubbed out: task, model, minimizer and every option value are resolved); `bench list` and `bench report`
     as they are. `bench show`, `sharpness`, `perf`, `doctor` and `data` stop at the parse: they need a run's
     files, time steps, inspect the machine or write datasets.
  `...` stands for options left out and is dropped; `[--opt X]` (optional, as in usage lines) is read as
  `--opt X`.
- torchrun: its own options must parse with torchrun's parser (torch.distributed.run), and the bench command after
  `-m bench` is checked as above.
- make: `make -n ARGS` (a dry run: targets and VAR=value) must exit 0 in the repository.
- pip install: the extras of `sambench[...]` must be extras pyproject.toml defines. Other pip lines install other
  people's packages and are skipped.
Skipped, as no command of ours: apt-get, export/cd and other shell set-up, sbatch scripts' bodies, python and toml
code. Besides: every `--option` the prose names in a code span (outside make/pip/torchrun spans) must be an option
of some bench command, and every relative link (images included, and #anchors into markdown) must resolve.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from unittest import mock

import pytest
import typer
from typer.testing import CliRunner

import bench.cli.run as cli_run
from bench.cli.main import app

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"", "bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$|<[^>]*>")  # RUN_ID, DIR, TASK, <hash>, digits-...-<hash>
INLINE_FIRST = re.compile(r"^(bench|\S*/bench|make|torchrun|pip3?|python3?)$")
SAFE_TO_RUN = {("reproduce",), ("run",), ("list",), ("report",)}


@dataclass(frozen=True)
class Shown:
    """One command a doc shows: where (file:line), the words, and whether it is an inline span of the prose."""
    where: str
    words: tuple[str, ...]
    inline: bool

    def __str__(self) -> str:
        return f"{self.where}: {' '.join(self.words)}"


# ---- reading the docs ---------------------------------------------------------------------------------------------

def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of a markdown text's shell blocks, continuation lines joined onto their first line."""
    out, block, joined, start = [], None, "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        fence = FENCE.match(raw)
        if fence:
            block = None if block is not None else fence.group(2).lower()
            continue
        if block is None or block not in SHELLS:
            continue
        line = re.sub(r"^\s*\$ ", "", raw) if not joined else raw
        start = start if joined else n
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        out.append((start, joined + line))
        joined = ""
    return out


def prose(text: str) -> str:
    """The text with its fenced blocks blanked (their lines kept, so that offsets still give line numbers)."""
    out, inside = [], False
    for raw in text.splitlines():
        if FENCE.match(raw):
            inside = not inside
            out.append("")
        else:
            out.append("" if inside else raw)
    return "\n".join(out)


def code_spans(text: str) -> list[tuple[int, str]]:
    """(line number, text) of the prose's inline code spans, a span wrapped across lines joined with a space."""
    body = prose(text)
    return [(body.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
            for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", body)]


def commands(line: str) -> list[list[str]]:
    """A shell line's commands as words (comments dropped, split at && || ; |); [] for what shlex cannot read."""
    try:
        lex = shlex.shlex(line, posix=True, punctuation_chars="&|;")
        lex.whitespace_split = True
        lex.commenters = "#"
        words = list(lex)
    except ValueError:
        return []
    out, current = [], []
    for w in words:
        if w and set(w) <= set("&|;"):
            out.append(current)
            current = []
        else:
            current.append(w)
    return [c for c in out + [current] if c]


def inline_command(span: str) -> list[str] | None:
    """The words of a prose code span that is a command of the kinds checked here, else None."""
    found = commands(span)
    if len(found) != 1:
        return None
    words = found[0]
    rest = [w for w in words if not ENV.match(w)]
    if len(rest) < 2 or not INLINE_FIRST.match(rest[0]):  # `bench`, `make` alone name a tool, not a command
        return None
    if rest[0].startswith(("python", "pip")) and not (bench_args(words) is not None or is_pip_install(words)):
        return None  # python -m bench.sweep.child, python code: not a command of ours
    return words


@cache
def documented() -> tuple[Shown, ...]:
    out = []
    for path in DOCS:
        name = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        for n, line in code_lines(text):
            out += [Shown(f"{name}:{n}", tuple(w), False) for w in commands(line)]
        for n, span in code_spans(text):
            words = inline_command(span)
            if words is not None:
                out.append(Shown(f"{name}:{n}", tuple(words), True))
    return tuple(out)


# ---- the kinds of command -----------------------------------------------------------------------------------------

def split_env(words) -> tuple[dict[str, str], list[str]]:
    env, rest = {}, list(words)
    while rest and ENV.match(rest[0]):
        key, _, value = rest.pop(0).partition("=")
        env[key] = value
    return env, rest


def bench_args(words) -> list[str] | None:
    """The arguments a command passes to bench, or None when it does not run bench."""
    words = list(words)
    for i, w in enumerate(words[:-1]):
        if w == "-m" and words[i + 1] == "bench":
            return words[i + 2:]
    _, rest = split_env(words)
    if rest and (rest[0] == "bench" or rest[0].endswith("/bench")):
        return rest[1:]
    return None


def is_torchrun(words) -> bool:
    _, rest = split_env(words)
    return bool(rest) and rest[0] == "torchrun"


def is_make(words) -> bool:
    _, rest = split_env(words)
    return bool(rest) and rest[0] == "make"


def is_pip_install(words) -> bool:
    _, rest = split_env(words)
    rest = rest[2:] if rest[1:3] == ["-m", "pip"] else rest[1:] if rest[:1] in (["pip"], ["pip3"]) else []
    return rest[:1] == ["install"]


def tidy(args) -> list[str]:
    """Drop `...` (options left out) and read `[--opt X]` as `--opt X`."""
    return [a.strip("[]") for a in args if a.strip("[]") not in ("...", "")]


def resolve(args: list[str]):
    """(subcommand path, click command, remaining args), or a problem string for a subcommand that does not exist."""
    command, path = typer.main.get_command(app), []
    while getattr(command, "commands", None) and args and not args[0].startswith("-"):
        sub = command.commands.get(args[0])
        if sub is None:
            return f"no command `bench {' '.join(path + [args[0]])}`"
        command, path, args = sub, path + [args[0]], args[1:]
    return path, command, args


def check_bench(args: list[str]) -> str | None:
    """Kind 1: what is wrong with `bench ARGS` (a subcommand or an option that does not exist), or None."""
    found = resolve(tidy(args))
    if isinstance(found, str):
        return found
    path, command, rest = found
    known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
    unknown = [a.split("=", 1)[0] for a in rest if a.startswith("--") and a.split("=", 1)[0] not in known]
    if unknown:
        return f"`bench {' '.join(path)}` has no option {', '.join(unknown)}"
    result = CliRunner().invoke(app, [*path, "--help"])
    return None if result.exit_code == 0 else f"`bench {' '.join(path)} --help` exited {result.exit_code}"


def click_exceptions(command):
    """click.exceptions of the click that built the command (Typer >= 0.29 brings its own copy, typer._click)."""
    core = next(k for k in type(command).__mro__ if k.__module__.endswith("click.core"))
    return importlib.import_module(core.__module__.rpartition(".")[0] + ".exceptions")


def with_results_dir(args: list[str], folder: str) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--results-dir":
            skip = True
        elif not a.startswith("--results-dir="):
            out.append(a)
    return out + ["--results-dir", folder]


def run_bench(args: list[str], env: dict[str, str] | None = None, inline: bool = False) -> str | None:
    """Kind 2: parse `bench ARGS` and run it as far as is safe (the module docstring); a problem string or None."""
    args = tidy(args)
    if any(PLACEHOLDER.search(a) for a in args):
        return None  # a sketch: kind 1 only
    found = resolve(args)
    if isinstance(found, str):
        return found
    path, command, rest = found
    errors = click_exceptions(command)
    try:
        command.make_context(" ".join(["bench", *path]), list(rest))
    except errors.UsageError as e:
        if inline and isinstance(e, errors.MissingParameter):
            return None  # a fragment of the prose (`bench run`): kind 1 only
        return f"`bench {' '.join(path)}` does not parse: {e.format_message()}"
    if tuple(path) not in SAFE_TO_RUN:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        run = list(rest)
        if path != ["list"]:
            run = with_results_dir(run, tmp)
        if path == ["reproduce"] and "--status" not in run and "--dry-run" not in run:
            run.append("--dry-run")
        built = []
        with mock.patch.object(cli_run, "train_and_show", lambda cfg, quiet, **how: built.append(cfg)):
            result = CliRunner().invoke(app, [*path, *run], env=env or {})
    if result.exit_code != 0:
        tail = " | ".join(result.output.strip().splitlines()[-3:]) or repr(result.exception)
        return f"`bench {' '.join([*path, *run])}` exited {result.exit_code}: {tail}"
    if path == ["run"] and not built:
        return f"`bench run {' '.join(run)}` built no run"
    return None


def check_torchrun(words) -> str | None:
    """torchrun's own options must parse with its parser (argparse: unknown options, missing values)."""
    from torch.distributed.run import get_args_parser
    _, rest = split_env(words)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser = get_args_parser()
            parser.allow_abbrev = False  # the docs spell options out: --nproc-per-nod is a typo, not a prefix
            parser.parse_args(rest[1:])
    except SystemExit:
        return f"torchrun does not parse: {err.getvalue().strip().splitlines()[-1]}"
    return None


@cache
def pyproject_extras() -> frozenset[str]:
    return frozenset(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def check_pip(words) -> str | None:
    """The extras of `pip install 'sambench[...]'` must exist; other packages are not ours."""
    for w in words:
        m = re.match(r"^(?:sambench|\.)\[([^\]]*)\]$", w)  # sambench[cluster], or .[test] in a checkout
        if m:
            missing = {e.strip() for e in m.group(1).split(",")} - pyproject_extras()
            if missing:
                return f"pyproject.toml defines no extra {', '.join(sorted(missing))}"
    return None


def check_make(words) -> str | None:
    _, rest = split_env(words)
    done = subprocess.run(["make", "-n", *rest[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    return None if done.returncode == 0 else f"`make -n {' '.join(rest[1:])}`: {done.stderr.strip()}"


@cache
def every_bench_option() -> frozenset[str]:
    out = set()

    def walk(command):
        out.update(o for p in command.params for o in (*p.opts, *p.secondary_opts))
        for sub in getattr(command, "commands", {}).values():
            walk(sub)
    walk(typer.main.get_command(app))
    return frozenset(out)


def prose_options(text: str) -> list[tuple[int, str, str]]:
    """(line, option, span) of every --option a prose code span names, outside make/pip/torchrun spans."""
    out = []
    for n, span in code_spans(text):
        words = inline_command(span)
        if words is not None and (is_make(words) or is_pip_install(words) or is_torchrun(words)):
            continue
        out += [(n, o, span) for o in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", span)]
    return out


# ---- the docs' commands -------------------------------------------------------------------------------------------

def unique(shown, key=lambda s: s.words):
    """One check per distinct command: where a block shows it too, as a block command (the stricter)."""
    first: dict[tuple, Shown] = {}
    for s in shown:
        k = key(s)
        if k not in first or first[k].inline and not s.inline:
            first[k] = s
    return list(first.values())


BENCH = unique((s for s in documented() if bench_args(s.words) is not None),
               key=lambda s: (tuple(bench_args(s.words)), tuple(sorted(split_env(s.words)[0].items()))))
MAKE = unique(s for s in documented() if is_make(s.words))
TORCHRUN = unique(s for s in documented() if is_torchrun(s.words))
PIP = unique(s for s in documented() if is_pip_install(s.words))


def test_the_rules_find_the_docs_commands():
    """A guard on the rules themselves: if they stopped matching, the checks below would pass on nothing."""
    assert len([s for s in BENCH if not s.inline]) >= 25
    assert len([s for s in BENCH if s.inline]) >= 30
    targets = {s.words[1] for s in MAKE if len(s.words) > 1}
    assert {"smoke", "test", "demo", "install"} <= targets
    assert TORCHRUN and PIP


@pytest.mark.parametrize("shown", BENCH, ids=str)
def test_every_documented_bench_command(shown):
    env, _ = split_env(shown.words)
    args = bench_args(shown.words)
    problem = check_bench(args) or run_bench(args, env, inline=shown.inline)
    assert problem is None, f"{shown}\n    {problem}"


@pytest.mark.parametrize("shown", MAKE, ids=str)
def test_every_documented_make_command_dry_runs(shown):
    problem = check_make(shown.words)
    assert problem is None, f"{shown}\n    {problem}"


@pytest.mark.parametrize("shown", TORCHRUN + PIP, ids=str)
def test_torchrun_options_and_pip_extras(shown):
    problem = check_torchrun(shown.words) if is_torchrun(shown.words) else check_pip(shown.words)
    assert problem is None, f"{shown}\n    {problem}"


def test_every_option_the_prose_names_exists():
    unknown = [f"{path.relative_to(ROOT)}:{n}: {option} (in `{span}`)" for path in DOCS
               for n, option, span in prose_options(path.read_text()) if option not in every_bench_option()]
    assert not unknown, "options no bench command has:\n" + "\n".join(unknown)


# ---- the checker fails where it should ------------------------------------------------------------------------------

@pytest.mark.parametrize("line, problem", [
    ("bench run cifar10 --minimiser sam", "`bench run` has no option --minimiser"),
    ("CUDA_VISIBLE_DEVICES=0 .venv/bin/bench reproduce asam2 --dry-run --seedz 3", "has no option --seedz"),
    ("torchrun --nproc-per-node 8 -m bench runn imagenet", "no command `bench runn`"),
    ("PYTHONPATH=. python3 -m bench doctr", "no command `bench doctr`"),
    ("bench data fake cifar10 DIR --clases 4", "`bench data fake` has no option --clases"),
])
def test_a_misspelled_command_or_option_is_caught(line, problem):
    [words] = commands(line)
    assert problem in check_bench(bench_args(words))


@pytest.mark.parametrize("line, problem", [
    ("bench reproduce asam22 --seeds 3", "unknown table"),                      # a table that does not exist
    ("bench reproduce asam2 --preset smok", "exited 2"),                          # nor a preset
    ("bench run cifar10 --minimizer asamm", "unknown minimizer 'asamm'"),        # a value, not an option
    ("bench run cifar10 --model wrn28_11", "exited 2"),
    ("bench run fashion-mnist --augment cutoutt", "--augment must be one of"),
    ("bench run cifar10 --epochs fifty", "does not parse"),                      # click's own type check
    ("bench sharpness", "does not parse"),                                       # a block line missing its run id
])
def test_a_wrong_value_is_caught(line, problem):
    [words] = commands(line)
    assert check_bench(bench_args(words)) is None  # the options exist: only the deeper check sees it
    assert problem in (run_bench(bench_args(words)) or "")


def test_the_deeper_check_passes_sketches_and_fragments():
    assert run_bench(["sharpness", "RUN_ID", "--rho", "0.2"]) is None             # a placeholder: kind 1 only
    assert run_bench(["run"], inline=True) is None                                 # `bench run` in the prose
    assert run_bench(["run"], inline=False) is not None                            # ... but not in a block
    assert run_bench(["reproduce", "asam2", "asam3", "--launcher", "slurm", "...", "--dry-run"]) is None


def test_other_tools_are_checked_too():
    assert check_make(["make", "smok"]) is not None
    assert check_make(["make", "install", "TORCH_SPEC=torch"]) is None
    assert "torchrun does not parse" in check_torchrun(["torchrun", "--nproc-per-nod", "8", "-m", "bench", "list"])
    assert check_torchrun(["torchrun", "--nnodes", "2", "--nproc-per-node", "8", "-m", "bench", "list"]) is None
    assert "no extra clusters" in check_pip(commands("pip install 'sambench[clusters]'")[0])
    assert check_pip(commands("pip install 'sambench[cluster,peer]'")[0]) is None
    assert prose_options("Use `bench run --rhoo 0.1`, `--seed`; `make install TORCH_SPEC=\"x --index-url y\"`.") == [
        (1, "--rhoo", "bench run --rhoo 0.1"), (1, "--seed", "--seed")]


def test_the_rules_read_blocks_continuations_comments_and_spans():
    text = ("Run `bench\n  doctor` first.\n```bash\n$ bench reproduce asam2 --launcher slurm \\\n    --partition gpu"
            "  # submit\nmake smoke && make test\nOMP_NUM_THREADS=1 bench list | head\n```\n```python\nbench = 1\n"
            "```\n```toml\nx = \"`bench nope`\"\n```\n")
    lines = code_lines(text)
    assert [n for n, _ in lines] == [4, 6, 7]
    assert [w for _, line in lines for w in commands(line)] == [
        ["bench", "reproduce", "asam2", "--launcher", "slurm", "--partition", "gpu"], ["make", "smoke"],
        ["make", "test"], ["OMP_NUM_THREADS=1", "bench", "list"], ["head"]]
    assert code_spans(text) == [(1, "bench doctor")]
    assert inline_command("bench doctor") == ["bench", "doctor"]
    assert inline_command("python -m bench.sweep.child") is None and inline_command("bench") is None
    assert split_env(["OMP_NUM_THREADS=1", "bench", "list"]) == ({"OMP_NUM_THREADS": "1"}, ["bench", "list"])
    assert tidy(["doctor", "[--data-dir", "DIR]", "..."]) == ["doctor", "--data-dir", "DIR"]


# ---- links -------------------------------------------------------------------------------------------------------

def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in prose(path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-"))
    return out


def broken_links(path: Path) -> list[str]:
    """The relative links (images included) of a markdown file whose file, or #heading in a markdown file, is not
    there; links out (https:, mailto:) are not followed."""
    broken = []
    for target in re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose(path.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{path.name} -> {target}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{path.name} -> {target} (no such heading)")
    return broken


def test_relative_links_point_at_files_and_headings_that_exist():
    broken = [b for path in [*DOCS, ROOT / "ARCHITECTURE.md"] for b in broken_links(path)]
    assert not broken, broken


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a.png").write_bytes(b"")
    page = tmp_path / "docs" / "page.md"
    page.write_text("# Page\n\n## Where to go: next\n\n![a](../results/a.png) ![b](results/a.png)\n"
                    "[c](#where-to-go-next) [d](page.md#nowhere) [e](https://example.org/x) [f](../README.md)\n"
                    "```bash\n[g](nothere.md)\n```\n")
    assert broken_links(page) == ["page.md -> results/a.png", "page.md -> page.md#nowhere (no such heading)",
                                  "page.md -> ../README.md"]
