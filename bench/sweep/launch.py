"""Launchers: start sweepers on this machine (one per GPU, or N on a CPU) or on a SLURM cluster through
submitit. Nothing here schedules: every worker pulls claimed runs from the same plan (bench.sweep.sweeper),
so any mix of launchers, machines and re-launches is safe.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.config import RunConfig
from bench.errors import UserError
from bench.tables.plan import TablePlan

LAUNCHERS = ("local", "slurm")
MASK = "CUDA_VISIBLE_DEVICES"


# ---- local: one worker per GPU ------------------------------------------------------------------------

def visible_devices(mask: str | None) -> list[str] | None:
    """The entries of a CUDA_VISIBLE_DEVICES value as CUDA reads it (torch.cuda's own parser does the same),
    None when the variable is unset (every GPU visible, in physical order). Comma separated; the first entry
    decides the kind: GPU-/MIG- UUIDs (MIG-GPU-<uuid>/<gi>/<ci> too), or ordinals read like strtoul ('1x'
    is 1); parsing stops at the first entry of another kind or an invalid one; a repeated entry hides every
    GPU, and so does an empty value. A worker's mask must name the same GPU, so entries are kept verbatim
    (ordinals normalised)."""
    if mask is None:
        return None
    prefix = next((p for p in ("GPU-", "MIG-") if mask.strip().startswith(p)), None)
    out: list[str] = []
    for item in mask.split(","):
        item = item.strip()
        if prefix is None:
            m = re.match(r"\+?(\d+)", item)
            item = str(int(m.group(1))) if m else ""
        if not item or (prefix is not None and not item.startswith(prefix)):
            break
        if item in out:
            return []
        out.append(item)
    return out


def visible_gpus(mask: str | None, count: int) -> list[str]:
    """What each CUDA index 0..count-1 of this process is, as a mask entry for a child process: the i-th
    entry of this process's mask (CUDA numbers the visible GPUs in mask order), or i itself without one.
    `count` is torch.cuda.device_count(): entries past it (a GPU that is not there) are not visible."""
    entries = visible_devices(mask)
    return [str(i) for i in range(count)] if entries is None else entries[:count]


def parse_gpus(text: str, available: int, mask: str | None = None) -> list[str]:
    """'0,1,3' -> ['0', '1', '3']: CUDA indices as this process numbers them (the GPUs `mask`, this process's
    CUDA_VISIBLE_DEVICES, leaves visible), each checked against the `available` GPUs torch sees."""
    ids = [g.strip() for g in text.split(",") if g.strip()]
    if not ids or not all(g.isdigit() for g in ids):
        raise UserError(f"--gpus takes GPU indices like 0,1,2,3, got {text!r}")
    ids = [str(int(g)) for g in ids]
    if len(set(ids)) != len(ids):
        raise UserError(f"--gpus names a GPU twice: {text!r}")
    visible = visible_gpus(mask, available)
    missing = [g for g in ids if int(g) >= len(visible)]
    if missing:
        raise UserError(f"--gpus {text}: GPU {', '.join(missing)} does not exist ({_seen(visible, mask)}); "
                        + ("use --workers-per-node N for CPU workers" if not visible else
                           f"--gpus takes indices 0-{len(visible) - 1}"))
    return ids


def _seen(visible: list[str], mask: str | None) -> str:
    """'torch sees GPUs 0-1 (CUDA_VISIBLE_DEVICES=4,5)': what the indices mean, for an error message."""
    if not visible:
        where = "no CUDA GPU"
    else:
        where = f"GPU{'s' if len(visible) > 1 else ''} 0" + (f"-{len(visible) - 1}" if len(visible) > 1 else "")
    return f"torch sees {where}" + (f" ({MASK}={mask})" if mask is not None else "")


def worker_envs(gpus: list[str], mask: str | None) -> list[dict[str, str]]:
    """Each GPU worker's CUDA_VISIBLE_DEVICES: its GPU as this process's mask names it (a physical ordinal,
    a GPU- or MIG- UUID), never the bare index, which would be another GPU (maybe someone else's) whenever
    this process is masked, e.g. inside a SLURM allocation."""
    visible = visible_gpus(mask, max(int(g) for g in gpus) + 1)
    missing = [g for g in gpus if int(g) >= len(visible)]
    if missing:
        raise UserError(f"--gpus: GPU {', '.join(missing)} is not in {MASK}={mask!r}; name one it has")
    return [{MASK: visible[int(g)]} for g in gpus]


def cpu_worker_env(workers: int, environ=os.environ) -> dict[str, str]:
    """A CPU worker's share of this machine's cores as torch's thread count (OMP_NUM_THREADS), unless the caller
    set one. Without it each of N workers runs as many threads as there are cores: on a machine of 2 cores, two
    workers of a small model then wait on each other's threads and an epoch takes 5 to 20 times as long, at
    random, which is what their rows' times would say."""
    if workers <= 1 or "OMP_NUM_THREADS" in environ:
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"OMP_NUM_THREADS": str(max(1, cores // workers))}


def on_cuda(device: str) -> bool:
    """Whether a sweep's runs train on CUDA: `cuda`, `cuda:N`, or `auto` where CUDA is usable."""
    import torch
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def launch_local(spec, gpus: str | None, workers: int, say) -> bool:
    """`--launcher local`: the workers, then a line on where to look; False if a worker failed."""
    import torch
    if not gpus and workers > 1 and on_cuda(spec.device):  # every worker would take the same GPU
        raise UserError(f"--workers-per-node {workers} on device {spec.device} would put every worker on the "
                        "same GPU; pass --gpus 0,1,... (one worker per GPU) or --device cpu")
    ids = parse_gpus(gpus, torch.cuda.device_count(), os.environ.get(MASK)) if gpus else None
    codes = run_local(spec, ids, workers)
    say(f"{len(codes)} workers finished; `bench reproduce --status --results-dir {spec.results_dir}` shows the "
        "tables")
    return not any(codes)


def run_local(spec, gpus: list[str] | None, workers: int) -> list[int]:
    """One worker process per GPU (its CUDA_VISIBLE_DEVICES naming that GPU through this process's mask) or
    `workers` CPU workers; each sweeps the whole plan. Returns the workers' exit codes."""
    labels = [f"gpu {g}" for g in gpus] if gpus else [f"worker {i}" for i in range(workers)]
    envs = worker_envs(gpus, os.environ.get(MASK)) if gpus else [cpu_worker_env(workers) for _ in labels]
    ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA state inherited
    procs = []
    for label, env in zip(labels, envs):
        procs.append(ctx.Process(target=_local_worker, args=(spec, label, env), name=label))
        procs[-1].start()
    for p in procs:
        p.join()
    return [p.exitcode for p in procs]


def _local_worker(spec, label: str, env: dict[str, str]) -> None:
    os.environ.update(env)  # inherited by every run's process
    sweeper = spec.sweeper(label)
    counts = sweeper.run()
    sweeper.say("done: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


# ---- SLURM through submitit --------------------------------------------------------------------------

def slurm_parameters(*, partition: str | None, time_min: int, gpus_per_run: int, nodes_per_run: int,
                     max_parallel: int, cpus_per_gpu: int, options: dict[str, str],
                     name: str = "sambench") -> dict[str, Any]:
    """submitit's AutoExecutor parameters for one array task = one run on nodes x gpus GPUs, one task
    (process) per GPU as torchrun would start them."""
    params: dict[str, Any] = {"name": name, "timeout_min": time_min, "nodes": nodes_per_run,
                              "tasks_per_node": max(gpus_per_run, 1), "gpus_per_node": gpus_per_run,
                              "cpus_per_task": cpus_per_gpu, "slurm_array_parallelism": max_parallel,
                              "slurm_signal_delay_s": 120}
    if partition:
        params["slurm_partition"] = partition
    if options:
        params["slurm_additional_parameters"] = dict(options)
    return params


def parse_slurm_options(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--slurm-option takes KEY=VALUE (e.g. account=myproj), got {item!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


# What submitit's TorchDistributedEnvironment.export sets (submitit 1.5, helpers.py), and refuses to set
# (RuntimeError "... is already set") when any of them is already in the environment.
TORCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def export_torch_env(submitit) -> None:
    """In a SLURM task: the torch.distributed variables of *this* job. SLURM copies the submitting shell's
    environment into the job, so a shell that ran torchrun before (or a .bashrc setting MASTER_PORT) hands
    every task stale values: submitit's export would refuse them, and kept they would point the group at
    another host or port (or, in a one-task job, make a single process wait for peers that never come).
    So they are dropped first, before submitit reads MASTER_PORT, and the job's own are exported."""
    for key in TORCH_ENV:  # only these: anything else of the user's environment stays
        os.environ.pop(key, None)
    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


class SlurmRun:
    """One array task: one run, in every task (process) of the allocation; several tasks form the
    torch.distributed group exactly as torchrun would (submitit's TorchDistributedEnvironment exports
    MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK). Pickled by submitit, so it holds plain values."""

    def __init__(self, cfg: dict[str, Any], force: bool):
        self.cfg, self.force = cfg, force

    def __call__(self) -> int:
        import submitit

        from bench.sweep.child import run_one
        export_torch_env(submitit)
        return run_one(RunConfig.of(**self.cfg), force=self.force)

    def checkpoint(self, *args, **kwargs):
        """Preempted or out of time: requeue; the run resumes from its last epoch checkpoint and its claim
        (same SLURM job) is taken back."""
        import submitit
        return submitit.helpers.DelayedSubmission(SlurmRun(self.cfg, self.force))


def slurm_executor(folder: str | Path, params: dict[str, Any], cluster: str = "slurm"):
    """submitit's executor for these parameters; `cluster` 'local' or 'debug' runs the same code path
    without SLURM (tests). One line when submitit or SLURM is missing."""
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher slurm needs submitit: pip install 'sambench[cluster]' (or pip install "
                        "submitit)") from None
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    except RuntimeError as e:  # submitit's "Could not detect srun"
        raise UserError(f"cannot submit to SLURM here ({' '.join(str(e).split())}); run this on a cluster "
                        "login node, or use --launcher local") from None
    executor.update_parameters(**params)
    return executor


def submit_slurm(executor, runs: list[RunConfig], force: bool) -> list:
    """Submit one job array, one task per run; returns the submitit jobs."""
    jobs = []
    with executor.batch():  # one job array; each task's callable keeps its own `checkpoint` (requeue)
        for cfg in runs:
            jobs.append(executor.submit(SlurmRun(asdict(cfg), force)))
    return jobs


def sbatch_text(params: dict[str, Any], folder: str | Path) -> str:
    """The sbatch script submitit writes for these parameters (shown by --print-sbatch, tested)."""
    from submitit.slurm.slurm import _make_sbatch_string  # the function submitit itself uses
    conv = {"name": "job_name", "timeout_min": "time", "tasks_per_node": "ntasks_per_node"}
    kw = {conv.get(k, k.removeprefix("slurm_")): v for k, v in params.items()}
    kw["additional_parameters"] = kw.pop("additional_parameters", None)
    return _make_sbatch_string(command="<python -u -m submitit.core._submit FOLDER>", folder=str(folder), **kw)


def launch_slurm(spec, plans: list[TablePlan], params: dict[str, Any], dry_run: bool, cluster: str, say) -> None:
    """`--launcher slurm`: submit the runs still to do as one job array (or, dry, show its sbatch script);
    say the job ids and how to follow them. Returns at once (except on the test clusters)."""
    from bench.sweep.sweeper import Sweeper, ensure_fake_data

    folder = Path(spec.results_dir) / "slurm"
    look = Sweeper(plans, spec.results_dir, force=spec.force)
    runs = [c for tp in plans for c in tp.runs if look.state(c) == "todo"]
    if dry_run:
        say(f"would submit {len(runs)} array tasks with this sbatch script:")
        return say(sbatch_text({**params, "map_count": len(runs)}, folder))
    executor = slurm_executor(folder, params, cluster)
    for tp in plans:  # a smoke table's synthetic data: written once here, read by every array task
        if tp.synthetic and tp.runs:
            ensure_fake_data(tp.runs[0], tp.synthetic)
    jobs = submit_slurm(executor, runs, spec.force) if runs else []
    ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
    say(f"submitted {len(jobs)} runs as job array {', '.join(ids) or '(none: nothing to do)'}; logs in {folder}")
    args = " ".join([*spec.tables, f"--preset {spec.preset}", f"--results-dir {spec.results_dir}"])
    say(f"follow them with: bench reproduce {args} --status")
    if cluster in ("local", "debug"):  # tests: wait for the jobs the way a cluster would run them
        for job in jobs:
            job.result()
