"""Slurm through submitit: one job array per submission, the collector job, queue queries.

One array element per grid point to (re)run; each element is ``nodes x tasks_per_node``
tasks under ``srun --mpi=pmix`` and runs :class:`hpctrain.launch.worker.Worker`.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..config import Config
from ..errors import HpctrainError
from ..fsutil import atomic_write_text
from ..runstate import FINAL_STATUSES, read_state
from ..sweep import RunSpec, SweepDir
from .sbatch import render_collector_script
from .spec import check_path, sbatch_options, setup_lines, srun_args, submitit_parameters

Log = Callable[[str], None]
RERUN_CHOICES = ("none", "failed", "diverged", "all")


# --------------------------------------------------------------------------- the cluster


def run_cmd(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return subprocess.CompletedProcess(args, 127, "", f"{args[0]}: not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, 124, "", f"{args[0]}: no answer within {timeout:g}s")


def slurm_available(timeout: float = 10) -> bool:
    """sbatch on PATH and a controller that answers."""
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        return False
    return run_cmd(["squeue", "-h", "-o", "%i", "-u", "nobody"], timeout).returncode == 0


def resolve_executor(name: str) -> str:
    if name == "auto":
        return "slurm" if slurm_available() else "local"
    if name == "slurm" and not slurm_available():
        raise HpctrainError("--executor slurm: no Slurm cluster answers (sbatch/squeue missing or "
                            "`squeue` failed); is SLURM_CONF set? For a local test cluster run "
                            "scripts/local-slurm.sh start")
    return name


def max_array_size(timeout: float = 30) -> Optional[int]:
    """The cluster's MaxArraySize (array indices must stay below it); None when none answers."""
    result = run_cmd(["scontrol", "show", "config"], timeout)
    if result.returncode != 0:
        return None
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)\s*$", result.stdout, re.MULTILINE)
    return int(match.group(1)) if match else None


def check_array_limit(elements: int, grid_size: int) -> None:
    """Refuse an array with indices 0..elements-1 that the cluster would reject (``Invalid job
    array specification``), before anything is written. Splitting the grid is the user's call."""
    limit = max_array_size()
    if limit is None or elements <= limit:
        return
    raise HpctrainError(
        f"the sweep has {grid_size} grid point(s); a job array of {elements} element(s) (indices 0..{elements - 1}) "
        f"is more than this cluster takes: its MaxArraySize is {limit} (indices must stay below it; "
        "`scontrol show config`). Expected at most that many points: sweep fewer values, or fix a swept key "
        "with KEY=VALUE and submit the rest as another sweep")


_RANGE = re.compile(r"^(\d+)_\[([^\]]+)\]$")


def queued_job_ids(timeout: float = 30) -> Optional[set[str]]:
    """Ids of queued and running jobs, array elements expanded (``12_3``); None when squeue fails."""
    result = run_cmd(["squeue", "-h", "-r", "-o", "%i"], timeout)
    if result.returncode != 0:
        return None
    ids: set[str] = set()
    for line in result.stdout.split():
        match = _RANGE.fullmatch(line)
        if not match:
            ids.add(line.strip())
            continue
        base, spec = match.groups()
        for part in spec.split("%")[0].split(","):
            lo, _, hi = part.partition("-")
            for k in range(int(lo), int(hi or lo) + 1):
                ids.add(f"{base}_{k}")
    return ids


def slurm_states(job_ids: Iterable[str], timeout: float = 30) -> dict[str, str]:
    """Slurm's state of each job id (``squeue``, then ``sacct`` for ended jobs); missing when unknown."""
    wanted = {j for j in job_ids if j}
    if not wanted or shutil.which("squeue") is None:
        return {}
    states: dict[str, str] = {}
    result = run_cmd(["squeue", "-h", "-r", "-o", "%i|%T"], timeout)
    if result.returncode == 0:
        for line in result.stdout.splitlines():
            jid, _, state = line.partition("|")
            if jid in wanted:
                states[jid] = state
    missing = wanted - set(states)
    if missing and shutil.which("sacct"):
        arrays = sorted({j.split("_")[0] for j in missing})
        result = run_cmd(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(arrays)], timeout)
        if result.returncode == 0:
            for line in result.stdout.splitlines():
                jid, _, state = line.partition("|")
                if jid in missing:
                    states[jid] = state.split()[0] if state else state
    return states


# --------------------------------------------------------------------------- what to submit


@dataclass
class Selection:
    """The grid points one submission runs, and why the others are skipped."""
    indices: list[int] = field(default_factory=list)
    skipped: dict[str, list[int]] = field(default_factory=dict)  # reason -> indices
    fresh: list[int] = field(default_factory=list)  # re-run from scratch (old folder kept aside)


def select_runs(sweep: SweepDir, specs: list[RunSpec], rerun: str = "none",
                queued: Optional[set[str]] = None) -> Selection:
    """Grid points not ``done`` (nor failed/diverged unless ``rerun``), not queued already.

    ``rerun failed`` resumes failed runs from their checkpoints (a node or a job died);
    ``rerun diverged`` and ``rerun all`` start those runs again from scratch.
    """
    if rerun not in RERUN_CHOICES:
        raise HpctrainError(f"--rerun {rerun!r}: expected one of {', '.join(RERUN_CHOICES)}")
    sel = Selection()
    on_disk = sweep.run_ids_on_disk()  # a run without a folder is pending: no file to look for
    for spec in specs:
        state = read_state(sweep.run_dir(spec.run_id)) if spec.run_id in on_disk else None
        status = state.status if state else "pending"
        job = state.slurm_job_id if state else None
        if queued is not None and job and job in queued and status in ("pending", "running", "preempted"):
            sel.skipped.setdefault(f"queued or running as job {job}", []).append(spec.index)
            continue
        if status in FINAL_STATUSES:
            wanted = rerun == "all" or rerun == status
            if not wanted:
                sel.skipped.setdefault(status, []).append(spec.index)
                continue
            if status != "failed":
                sel.fresh.append(spec.index)
        sel.indices.append(spec.index)
    return sel


def set_aside(sweep: SweepDir, spec: RunSpec) -> Path:
    """Move a run's folder to ``replaced/`` so its re-run starts from scratch; nothing is deleted."""
    src = sweep.run_dir(spec.run_id)
    dest = sweep.root / "replaced" / f"{spec.run_id}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.exists():
        src.rename(dest)
    sweep.prepare_run(spec)
    return dest


# --------------------------------------------------------------------------- submitit


def check_submission(cfg: Config, sweep: SweepDir, elements: int, grid_size: int) -> None:
    """What a submission would find too late: every value that reaches the array's script or
    the collector's (the launch spec, the sweep folder's path), and the cluster's array limit."""
    sbatch_options(cfg.slurm, cfg.name)
    srun_args(cfg.slurm)
    check_path(sweep.root.absolute(), "the sweep folder")
    check_array_limit(elements, grid_size)


def executor_for(cfg: Config, sweep: SweepDir):
    """A submitit SlurmExecutor whose script carries the launch spec's sbatch options."""
    import submitit

    s = cfg.slurm
    executor = submitit.SlurmExecutor(folder=sweep.root / "slurm", max_num_timeout=s.max_requeues)
    # nodes and ntasks_per_node also tell submitit how many tasks to expect; every option in
    # the script comes from sbatch_options (its additional_parameters win over submitit's own).
    config = shlex.quote(str(sweep.config_path.absolute()))
    folder = shlex.quote(str(sweep.root.absolute()))
    executor.update_parameters(nodes=s.nodes, ntasks_per_node=s.tasks_per_node,
                               array_parallelism=s.array_parallelism, setup=setup_lines(s),
                               srun_args=srun_args(s),
                               teardown=[f"{shlex.quote(sys.executable)} -m hpctrain.launch.step_end $? "
                                         f"{config} --sweep-dir {folder}"],
                               additional_parameters=submitit_parameters(sbatch_options(s, cfg.name)))
    return executor


def array_script(cfg: Config, sweep: SweepDir, count: int) -> str:
    """The sbatch script submitit writes for an array of ``count`` elements (for --dry-run)."""
    executor = executor_for(cfg, sweep)
    executor.parameters["map_count"] = count
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


@dataclass
class Submission:
    array_id: str
    element_ids: dict[int, str]  # grid index -> Slurm id of its element (ARRAY_k)
    collector_id: Optional[str] = None


def submit_array(cfg: Config, sweep: SweepDir, specs: list[RunSpec], indices: list[int]) -> Submission:
    """One job array, element k running grid point indices[k]; pending states record its id."""
    from .worker import Worker

    for index in indices:
        # Made before the job exists, so that a pending state can never replace the state of
        # an element that already started.
        sweep.prepare_run(specs[index])
    executor = executor_for(cfg, sweep)
    worker = Worker(str(sweep.root.absolute()), cfg.slurm.max_requeues)
    with executor.batch():
        jobs = [executor.submit(worker, index) for index in indices]
    if len(jobs) == 1:  # submitit submits a lone job as a plain job, not an array
        element_ids = {indices[0]: jobs[0].job_id}
        array_id = jobs[0].job_id
    else:
        element_ids = {index: job.job_id for index, job in zip(indices, jobs)}
        array_id = jobs[0].job_id.split("_")[0]
    for index, job_id in element_ids.items():
        _record_job(sweep, specs[index], job_id)
    return Submission(array_id, element_ids)


def _record_job(sweep: SweepDir, spec: RunSpec, job_id: str) -> None:
    sweep.recorder(spec).stamp_job(job_id)


def submit_collector(cfg: Config, sweep: SweepDir, after: str) -> str:
    """``hpctrain collect`` once the array has ended, whatever the elements' outcome."""
    script = sweep.root / "slurm" / "collect.sbatch"
    atomic_write_text(script, render_collector_script(cfg, sweep_dir=sweep.root))
    (sweep.root / "logs").mkdir(parents=True, exist_ok=True)  # Slurm does not create --output folders
    result = run_cmd(["sbatch", "--parsable", f"--dependency=afterany:{after}", str(script)], 60)
    if result.returncode != 0:
        raise HpctrainError(f"sbatch {script}: the collector job was not submitted: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def record_submission(sweep: SweepDir, executor: str, specs: list[RunSpec], indices: list[int],
                      submission: Optional[Submission]) -> None:
    """Append one line per submission to sweep/submissions.jsonl (history across resumes)."""
    entry = {"time": time.time(), "executor": executor, "indices": indices,
             "run_ids": [specs[i].run_id for i in indices]}
    if submission is not None:
        entry.update(array_id=submission.array_id, collector_id=submission.collector_id,
                     element_ids={str(k): v for k, v in submission.element_ids.items()})
    path = sweep.root / "submissions.jsonl"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    atomic_write_text(path, old + json.dumps(entry, sort_keys=True) + "\n")


def watch_hint(sweep: SweepDir, submission: Submission) -> str:
    root = sweep.root
    return (f"watch it: hpctrain status {root}   (squeue -j {submission.array_id}; "
            f"logs in {root / 'slurm'})")
