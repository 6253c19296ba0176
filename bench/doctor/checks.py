"""`bench doctor`: is this machine ready for a sweep? One line per check, each ok / warn / fail / info, with what
to do where it is not ok, in the spirit of `python -m torch.utils.collect_env`, `accelerate env` and DeepSpeed's
`ds_report`, plus what sambench itself relies on: each task's data under `--data-dir`, file locks that work in
the results folder (run claims and CSV appends depend on them), SLURM and torchrun.

It runs from a checkout without installing (`PYTHONPATH=. python3 -m bench doctor`) on a Python that has torch
and maybe nothing else: optional packages are imported lazily and reported missing, and a check that breaks
becomes a `fail` line, never a crash. Nothing here trains; `--full` (bench.doctor.full) does, on a GPU. Exit
status 1 when a check failed, else 0; the same report goes to a markdown file (`--out`).
"""
from __future__ import annotations

import datetime
import importlib
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

import bench
from bench import gpu
from bench.doctor.report import FAIL, INFO, OK, WARN, Check, Context, Section, first_line

LOW_DISK_GIB = 10.0  # a sweep keeps a checkpoint per running run (WRN-28-10: ~0.3 GiB) and kept weights


# -- small probes ---------------------------------------------------------------------------------------------


def module_version(name: str) -> tuple[str | None, str]:
    """(version, '') when `name` imports, else (None, why). Imported here and only here: an optional package
    that is missing or broken is a line of the report, never a crash."""
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return None, first_line(e)
    return str(getattr(mod, "__version__", "") or _dist_version(name) or "installed"), ""


def installed_version(name: str) -> str | None:
    """The version of a package that is merely findable (not imported: wandb and tensorboard import slowly)."""
    import importlib.util
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    return (_dist_version(name) or "installed") if found else None


def _dist_version(name: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def cudnn_version() -> str:
    """cuDNN's version as 9.24.0 (cuDNN 9 encodes M*10000 + m*100 + p, cuDNN 8 M*1000 + m*100 + p)."""
    v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if not v:
        return "none"
    major, rest = divmod(v, 10000) if v >= 90000 else divmod(v, 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def nccl_version() -> str:
    try:
        v = torch.cuda.nccl.version()
    except Exception:  # a CPU-only build has none
        return "none"
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def arch_supported(cc: tuple[int, int], arches: list[str]) -> bool:
    """Whether a wheel built for `arches` (torch.cuda.get_arch_list()) runs kernels on compute capability `cc`:
    a cubin of the same major and a minor not above it, or PTX of a capability not above it."""
    for arch in arches:
        kind, _, num = arch.partition("_")
        digits = re.match(r"\d+", num)
        if digits:
            major, minor = divmod(int(digits.group()), 10)
            if (kind == "sm" and major == cc[0] and minor <= cc[1]) or (kind == "compute" and (major, minor) <= cc):
                return True
    return not arches


def filesystem_type(path: Path) -> str:
    """The type of the filesystem `path` is on (ext4, nfs4, lustre...), from /proc/self/mounts; '' if unknown."""
    try:
        mounts = [ln.split() for ln in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        return ""
    target, best = str(existing(path).resolve()), ("", "")
    for parts in mounts:
        point = parts[1].replace("\\040", " ") if len(parts) > 2 else ""
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best[0]):
            best = (point, parts[2])
    return best[1]


def existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (where a folder not yet made will live)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_gib(path: Path) -> float:
    return shutil.disk_usage(existing(path)).free / 2**30


# -- the sections ---------------------------------------------------------------------------------------------

def build_kind() -> str:
    return f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"


def software_checks(ctx: Context) -> list[Check]:
    from bench.store.provenance import git_commit
    root = Path(bench.__file__).resolve().parent.parent
    return [Check("python", INFO, f"{platform.python_version()} ({sys.executable})"),
            Check("sambench", INFO, f"{root}, commit {git_commit()}"),
            Check("torch", INFO, f"{torch.__version__}, {build_kind()}, cuDNN {cudnn_version()}, NCCL "
                                 f"{nccl_version()}")]


def gpu_checks(ctx: Context) -> list[Check]:
    driver = gpu.driver_version()
    checks = [Check("NVIDIA driver", INFO, driver or "no NVIDIA driver"), cuda_check()]
    if ctx.cuda:
        checks += [device_check(i) for i in range(torch.cuda.device_count())]
    return checks


def cuda_check() -> Check:
    """The verdict that matters most: a GPU here that this torch cannot use (an old driver for the wheel's
    CUDA) is a fail with the driver, the wheel's CUDA and the torch to install (bench.gpu.cuda_problem, the
    diagnosis `bench run` refuses `--device auto` with); a CUDA build on a machine without any NVIDIA driver
    is a warning (a SLURM job given no GPU looks like that)."""
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return Check("CUDA", OK, f"usable: {torch.cuda.device_count()} GPU(s)"
                     + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""))
    problem = gpu.cuda_problem()
    if problem:
        return Check("CUDA", FAIL, problem)
    if torch.version.cuda:
        return Check("CUDA", WARN, f"{build_kind()} of torch, but no NVIDIA driver or GPU on this machine: runs "
                     "train on the CPU", "on a GPU node, check that the job was given GPUs (SLURM: --gpus or "
                     "--gres=gpu:N) and that nvidia-smi lists them")
    return Check("CUDA", INFO, "a CPU-only torch and no NVIDIA GPU: runs train on the CPU")


def device_check(index: int) -> Check:
    """One GPU: name, memory, compute capability, native bf16; a fail where this wheel has no kernels for it or a
    tiny computation on it fails (a GPU in a bad state, or held in exclusive mode by another process)."""
    p, device = torch.cuda.get_device_properties(index), torch.device("cuda", index)
    detail = f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}"
    if not arch_supported((p.major, p.minor), torch.cuda.get_arch_list()):
        return Check(f"GPU {index}", FAIL, f"{detail}; {gpu.torch_build()} has no kernels for it (built for "
                     f"{', '.join(torch.cuda.get_arch_list())})", "install a torch whose CUDA still supports this "
                     "GPU (docs/clusters.md: 'Choosing a torch wheel for a cluster's driver')")
    try:
        (torch.ones(8, device=device) * 2).sum().item()
        bf16 = gpu.native_bf16(device)
    except Exception as e:
        return Check(f"GPU {index}", FAIL, f"{detail}; a tiny computation failed: {first_line(e)}",
                     "check nvidia-smi (another process holding it in exclusive mode? ECC errors?)")
    detail += f", bf16 {'native' if bf16 else 'emulated (slower than fp32)'}"
    if not bf16:
        return Check(f"GPU {index}", WARN, detail, "train with --precision fp32 or fp16 here (bf16 needs compute "
                     "capability 8.0, Ampere, or later)")
    return Check(f"GPU {index}", OK, detail)


def compile_checks(ctx: Context) -> list[Check]:
    """--compile and --fast: torch.compile's inductor needs Triton on a GPU and a C compiler."""
    version, why = module_version("triton")
    if version:
        triton = Check("Triton", OK, version)
    elif ctx.cuda:
        triton = Check("Triton", WARN, f"not importable ({why})", "pip install triton (the version this torch "
                       "pins), or run without --compile / --fast")
    else:
        triton = Check("Triton", INFO, f"not importable ({why}); torch.compile needs it on GPUs only")
    cc = next((p for p in (os.environ.get("CC"), "cc", "gcc", "clang") if p and shutil.which(p)), None)
    compiler = (Check("C compiler", OK, shutil.which(cc) or cc) if cc else
                Check("C compiler", WARN, "none on PATH (cc, gcc, clang, $CC): torch.compile cannot build kernels",
                      "install gcc (apt-get install gcc, or `module load gcc`), or run without --compile / --fast"))
    return [triton, compiler]


def results_checks(ctx: Context) -> list[Check]:
    folder = ctx.results_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return [Check("results folder", FAIL, f"cannot create {folder}: {first_line(e)}",
                      "pass a --results-dir you can write to")]
    free = free_gib(folder)
    disk = Check("free disk (results)", OK if free >= LOW_DISK_GIB else WARN, f"{free:.1f} GiB under {folder}",
                 "" if free >= LOW_DISK_GIB else "free some space or use another --results-dir (a sweep keeps a "
                 "checkpoint per running run, ~0.3 GiB for WRN-28-10, and weights for bench sharpness)")
    return [lock_check(folder), disk]


def cluster_checks(ctx: Context) -> list[Check]:
    sbatch = shutil.which("sbatch")
    version, why = module_version("submitit")
    if version:
        submitit = Check("submitit", OK, version)
    else:
        submitit = Check("submitit", WARN if sbatch else INFO, f"missing ({why}); `bench reproduce --launcher "
                         "slurm` needs it", "pip install 'sambench[cluster]'")
    checks = [submitit, Check("sbatch", INFO, sbatch or "not on PATH (no SLURM here, or its module is not loaded)")]
    checks.append(distributed_check(ctx.cuda))
    for name in ("tensorboard", "wandb"):
        found = installed_version(name)
        checks.append(Check(name, INFO, found or "missing; `--log " + name + "` needs it (pip install "
                            "'sambench[tracking]')"))
    return checks


def distributed_check(cuda: bool) -> Check:
    """torchrun: torch.distributed with gloo (CPU) and NCCL (GPUs)."""
    dist = torch.distributed
    if not dist.is_available():
        return Check("torchrun", WARN if cuda else INFO, "torch.distributed is not available in this build",
                     "install a torch built with distributed support for multi-GPU runs")
    backends = [b for b, on in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available())) if on]
    runner = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    detail = f"{runner}; backends: {', '.join(backends) or 'none'}"
    if cuda and "nccl" not in backends:
        return Check("torchrun", WARN, detail, "multi-GPU runs need NCCL: install a CUDA build of torch")
    return Check("torchrun", OK, detail)


def machine_checks(ctx: Context) -> list[Check]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    checks = [Check("CPUs", INFO, f"{os.cpu_count()} on the machine, {usable} usable by this process, torch "
                    f"uses {torch.get_num_threads()} threads")]
    available = mem_available_gib()
    if available is not None:
        checks.append(Check("memory", INFO, f"{available:.1f} GiB available"))
    checks.append(Check("free disk (data)", INFO, f"{free_gib(ctx.data_dir):.1f} GiB under {existing(ctx.data_dir)}"))
    return checks


def mem_available_gib() -> float | None:
    try:
        line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 2**20


# -- file locks -----------------------------------------------------------------------------------------------

LOCK_CHILD = """import sys, filelock
lock = filelock.FileLock(sys.argv[1])
try:
    lock.acquire(timeout=float(sys.argv[2]))
except filelock.Timeout:
    print("blocked")
else:
    print("acquired")
    lock.release()
"""


def other_process_lock(path: Path, wait_s: float = 1.0) -> str:
    """'acquired' or 'blocked': whether a second process takes the file lock at `path` within `wait_s`."""
    proc = subprocess.run([sys.executable, "-c", LOCK_CHILD, str(path), str(wait_s)], capture_output=True,
                          text=True, timeout=60)
    answer = proc.stdout.strip()
    if proc.returncode != 0 or answer not in ("acquired", "blocked"):
        raise RuntimeError(f"the second process failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return answer


def lock_check(folder: Path) -> Check:
    """Claims and CSV appends rely on OS file locks (filelock). On some network filesystems a lock silently
    does nothing: two sweepers would then train the same run and interleave rows. So: hold a lock here and
    let a second process try to take it (it must wait), then release it (the second must get it)."""
    fs = filesystem_type(folder) or "unknown"
    fix = ("use a results folder on a local disk (--results-dir), or a filesystem whose locks work (NFS with its "
           "lock manager running, Lustre mounted with -o flock)")
    try:
        from filelock import FileLock
    except ImportError as e:
        return Check("file locks", FAIL, f"filelock is missing ({first_line(e)}); run claims and results need it",
                     "pip install filelock (or `make install`)")
    path = folder / f".doctor-{os.getpid()}.lock"
    try:
        with FileLock(str(path)).acquire(timeout=5):
            held = other_process_lock(path)
        free = other_process_lock(path)
    except Exception as e:
        return Check("file locks", FAIL, f"locking in {folder} ({fs}) failed: {first_line(e)}", fix)
    finally:
        path.unlink(missing_ok=True)
    if held == "acquired":
        return Check("file locks", FAIL, f"a second process took a lock this one held in {folder} ({fs}): locks do "
                     "nothing there, so sweepers would train the same runs and interleave rows", fix)
    if free == "blocked":
        return Check("file locks", FAIL, f"a released lock stayed taken for a second process in {folder} ({fs})",
                     fix)
    return Check("file locks", OK, f"a second process waits for a held lock and gets it once released ({folder}, {fs})")


# -- data -------------------------------------------------------------------------------------------------------

def data_checks(ctx: Context) -> list[Check]:
    from bench.registry import get_task, task_names
    return [data_check(name, get_task(name), ctx.data_dir) for name in task_names()]


def data_check(name: str, task, root: Path) -> Check:
    """Whether a task's data is where `bench run --data-dir` looks (the task's own `data_status`: file checks
    only, no dataset is loaded); data written by `bench data fake` (its SYNTHETIC marker) is labelled synthetic."""
    from bench.task import SYNTHETIC_MARKER
    status = task.data_status(root)
    if status is None:
        return Check(name, INFO, "no cheap check for this task", f"`bench run {name}` says what it misses")
    if status.bundled:
        return Check(name, OK, status.looked)
    if status.found is None:
        return Check(name, INFO, f"not found (looked for {status.looked})", status.how)
    if (status.found / SYNTHETIC_MARKER).exists():
        return Check(name, WARN, f"synthetic data (bench data fake) in {status.found}: its rows say synthetic=True",
                     f"for the papers' numbers, real data: {status.how}")
    return Check(name, OK, f"found in {status.found}")


# -- the report -----------------------------------------------------------------------------------------------

SECTIONS: list[tuple[str, Callable[[Context], list[Check]]]] = [
    ("software", software_checks), ("GPU", gpu_checks), ("torch.compile (--compile, --fast)", compile_checks),
    ("data", data_checks), ("results folder", results_checks), ("cluster and tracking", cluster_checks),
    ("machine", machine_checks)]


def run_section(title: str, fn: Callable[[Context], list[Check]], ctx: Context) -> Section:
    """A section's checks; a check that itself breaks is a fail line (doctor never crashes on a sick machine)."""
    try:
        return Section(title, fn(ctx))
    except Exception as e:
        return Section(title, [Check(title, FAIL, f"the check itself failed: {first_line(e)}",
                                     "report this with the output of `python -m torch.utils.collect_env`")])


def header_lines() -> list[str]:
    """Where and what: host, date, and the GPU named (name, memory, driver, torch and CUDA versions)."""
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    if torch.cuda.is_available():
        names = [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} "
                 "GiB)" for i in range(torch.cuda.device_count())]
        what = ", ".join(f"{names.count(n)} x {n}" for n in dict.fromkeys(names))
    else:
        what = "no usable CUDA GPU"
    return [f"host {platform.node()}, {when}",
            f"GPU: {what}; driver {gpu.driver_version() or 'none'}; {gpu.torch_build()}, cuDNN {cudnn_version()}"]
