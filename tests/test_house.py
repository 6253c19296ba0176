"""The layout holds: every import arrow points down the wings (cli at the top; store and the leaves at the bottom),
no import cycle but the task registry's lazy plugin loop, and the report and the store load no torch."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Wings from the top floor down; a module may import from its own floor or below (architecture.md).
FLOORS = [
    ["bench.__main__"],
    ["bench.cli"],
    ["bench.sweep", "bench.doctor"],
    ["bench.report"],
    ["bench.tables", "bench.perf", "bench.sharpness"],
    ["bench.recipes"],
    ["bench.train"],
    ["tasks"],
    ["bench.registry"],
    ["bench.store", "bench.task", "bench.data", "bench.augment", "bench.download", "bench.gpu", "bench.minimizers",
     "bench.distributed"],
    ["bench.config", "bench.options", "bench.text", "bench.errors", "bench"],
]
ALLOWED_UP = {("bench.registry", "tasks")}  # the lazy plugin loop: the registry imports the tasks it registers


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the bench/tasks modules it imports, at the top or inside a function."""
    mods = {module_name(p): p for d in ("bench", "tasks") for p in (ROOT / d).rglob("*.py")}
    out: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod and name.split(".")[0] in ("bench", "tasks"):
                    out[mod].add(name)
    return out


def floor(mod: str) -> int:
    best = max((w for fl in FLOORS for w in fl if mod == w or mod.startswith(w + ".")), key=len)
    return next(i for i, fl in enumerate(FLOORS) if best in fl)


def wing(mod: str) -> str:
    return max((w for fl in FLOORS for w in fl if mod == w or mod.startswith(w + ".")), key=len)


def test_every_arrow_points_down():
    up = sorted((a, b) for a, bs in imports().items() for b in bs
                if floor(b) < floor(a) and (wing(a), wing(b)) not in ALLOWED_UP and wing(a) != wing(b))
    assert not up, "imports that run back up: " + ", ".join(f"{a} -> {b}" for a, b in up)


def test_no_import_cycle_but_the_task_registrys():
    graph = imports()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(comp)

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    others = [c for c in cycles if not ("bench.registry" in c and all(m == "bench.registry" or m.startswith("tasks")
                                                                      for m in c))]
    assert not others, f"import cycles: {others}"


def test_the_report_and_the_store_load_no_torch():
    code = ("import sys; import bench.report.write, bench.report.render, bench.report.load, bench.store.records, "
            "bench.store.claims, bench.store.history, bench.tables.layout, bench.tables.cells; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_run_starts_without_torchvision_or_sklearn():
    """Every run is a process of its own (bench.sweep.child): torchvision (~1.5 s) and scikit-learn (~1 s) are
    imported by the tasks that need them, when they need them, not by the task registry."""
    code = ("import sys; import bench.sweep.child, bench.registry; bench.registry.get_task('digits-noise'); "
            "print(sorted(m for m in ('torchvision', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
