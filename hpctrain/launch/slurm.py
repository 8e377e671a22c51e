"""Slurm through submitit: the job arrays of a submission, the collector job, queue queries.

One array element per grid point to (re)run; each element is ``nodes x tasks_per_node``
tasks under ``srun --mpi=pmix`` and runs :class:`hpctrain.launch.worker.Worker`. A sweep
larger than the cluster's MaxArraySize becomes several arrays (launch/limits.py), with one
collector job after all of them.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from ..config import Config
from ..errors import HpctrainError
from ..fsutil import atomic_write_text
from ..runstate import RunRecorder
from ..sweep import RunSpec, SweepDir
from . import limits
from .sbatch import render_collector_script
from .spec import check_path, sbatch_options, setup_lines, srun_args, submitit_parameters

Log = Callable[[str], None]


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


def check_array_limit(elements: int, grid_size: int) -> limits.Limits:
    """The cluster's limits, read once; refuses (before anything is written) what no split of
    the sweep into several arrays makes acceptable."""
    found = limits.cluster_limits()
    limits.check_limits(elements, grid_size, found)
    return found


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


def slurm_states(job_ids: Iterable[str]) -> dict[str, str]:
    """Slurm's state of each job id (one squeue, then one sacct where accounting is on)."""
    from .queue import query

    return {jid: job.state for jid, job in query(job_ids).jobs.items()}


# --------------------------------------------------------------------------- what to submit


# --------------------------------------------------------------------------- submitit


def check_submission(cfg: Config, sweep: SweepDir, elements: int, grid_size: int) -> limits.Limits:
    """What a submission would find too late: every value that reaches the array's script or
    the collector's (the launch spec, the sweep folder's path), and the cluster's limits."""
    sbatch_options(cfg.slurm, cfg.name)
    srun_args(cfg.slurm)
    check_path(sweep.root.absolute(), "the sweep folder")
    return check_array_limit(elements, grid_size)


def executor_for(cfg: Config, sweep: SweepDir, hold: bool = False):
    """A submitit SlurmExecutor whose script carries the launch spec's sbatch options (and
    ``--hold`` when asked)."""
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
                               additional_parameters=submitit_parameters(sbatch_options(s, cfg.name)
                                                                         + ([("hold", None)] if hold else [])))
    return executor


def array_script(cfg: Config, sweep: SweepDir, count: int) -> str:
    """The sbatch script submitit writes for the first array of ``count`` elements (for --dry-run)."""
    executor = executor_for(cfg, sweep)
    first = limits.split(range(count), limits.cluster_limits().max_array_size)[0]
    executor.parameters["map_count"] = len(first.tasks)
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


@dataclass
class Submission:
    array_ids: list[str]  # one per chunk of the sweep (one unless it passes MaxArraySize)
    element_ids: dict[int, str]  # grid index -> Slurm id of its element (ARRAY_k)
    collector_id: Optional[str] = None

    @property
    def array_id(self) -> str:
        return self.array_ids[0]


def submit_array(cfg: Config, sweep: SweepDir, specs: list[RunSpec], indices: list[int]) -> Submission:
    """One job array per chunk of ``indices`` (task ids below the cluster's MaxArraySize, as
    ``check_submission`` read it); pending states record each element's id."""
    max_array_size = limits.cluster_limits().max_array_size
    # Each array is submitted held and released once every element's pending state names its
    # job: no element can start (and write its own state) before that one write per run.
    executor = executor_for(cfg, sweep, hold=True)
    on_disk = sweep.run_ids_on_disk()
    submission = Submission([], {})
    for chunk in limits.split(indices, max_array_size):
        array_id, element_ids = _submit_chunk(executor, sweep, cfg.slurm.max_requeues, chunk.indices)
        submission.array_ids.append(array_id)
        submission.element_ids.update(element_ids)
        try:
            for index, job_id in element_ids.items():
                spec = specs[index]
                train = _train(cfg, spec)
                RunRecorder(sweep.run_dir(spec.run_id), index=spec.index, run_id=spec.run_id, params=spec.params,
                            durable=False).queued(job_id, total_epochs=train.epochs, monitor=train.monitor,
                                                  exists=spec.run_id in on_disk)
        finally:
            _release(array_id)
    return submission


def _train(cfg: Config, spec: RunSpec):
    """The point's train section; the base config's unless the grid sweeps train keys (building
    each point's config would cost more than the rest of the submission)."""
    return spec.config.train if any(k.startswith("train") for k in spec.params) else cfg.train


def _release(job_id: str) -> None:
    result = run_cmd(["scontrol", "release", job_id], 60)
    if result.returncode != 0:
        raise HpctrainError(f"scontrol release {job_id}: {result.stderr.strip()}; the array waits held until "
                            f"you run `scontrol release {job_id}` (or `scancel {job_id}`)")


def _submit_chunk(executor, sweep: SweepDir, max_requeues: int, indices: list[int]) -> tuple[str, dict[int, str]]:
    """One array; its pickled calls carry the grid index, so element k runs indices[k]."""
    from .worker import Worker

    worker = Worker(str(sweep.root.absolute()), max_requeues)
    with executor.batch():
        jobs = [executor.submit(worker, index) for index in indices]
    if len(jobs) == 1:  # submitit submits a lone job as a plain job, not an array
        return jobs[0].job_id, {indices[0]: jobs[0].job_id}
    return jobs[0].job_id.split("_")[0], {index: job.job_id for index, job in zip(indices, jobs)}


def describe_arrays(submission: Submission, parallelism: int) -> str:
    """What was submitted, in the words the user reads after ``hpctrain submit``."""
    count = len(submission.element_ids)
    arrays = submission.array_ids
    if len(arrays) == 1:
        return f"submitted job array {arrays[0]} ({count} element(s), at most {min(parallelism, count)} at once)"
    return (f"submitted job arrays {', '.join(arrays)} ({count} element(s) in {len(arrays)} arrays: more than "
            f"this cluster's MaxArraySize of {limits.cluster_limits().max_array_size} each; "
            f"at most {parallelism} at once per array)")


def submit_collector(cfg: Config, sweep: SweepDir, after: str | list[str]) -> str:
    """``hpctrain collect`` once every array has ended, whatever the elements' outcome."""
    arrays = [after] if isinstance(after, str) else list(after)
    script = sweep.root / "slurm" / "collect.sbatch"
    atomic_write_text(script, render_collector_script(cfg, sweep_dir=sweep.root))
    (sweep.root / "logs").mkdir(parents=True, exist_ok=True)  # Slurm does not create --output folders
    result = run_cmd(["sbatch", "--parsable", f"--dependency=afterany:{':'.join(arrays)}", str(script)], 60)
    if result.returncode != 0:
        raise HpctrainError(f"sbatch {script}: the collector job was not submitted: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def record_submission(sweep: SweepDir, executor: str, specs: list[RunSpec], indices: list[int],
                      submission: Optional[Submission]) -> None:
    """Append one line per submission to sweep/submissions.jsonl (history across resumes)."""
    entry = {"time": time.time(), "executor": executor, "indices": indices,
             "run_ids": [specs[i].run_id for i in indices]}
    if submission is not None:
        entry.update(array_id=submission.array_id, array_ids=submission.array_ids,
                     collector_id=submission.collector_id,
                     element_ids={str(k): v for k, v in submission.element_ids.items()})
    path = sweep.root / "submissions.jsonl"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    atomic_write_text(path, old + json.dumps(entry, sort_keys=True) + "\n")


def watch_hint(sweep: SweepDir, submission: Submission) -> str:
    root = sweep.root
    hint = (f"watch it: hpctrain status {root}   (squeue -j {','.join(submission.array_ids)}; "
            f"logs in {root / 'slurm'})")
    if limits.accounting_on() is False:
        hint += ("\naccounting is off on this cluster (no sacct): status shows Slurm's state while a job is "
                 "queued or recently ended, then the runs' own state")
    return hint
