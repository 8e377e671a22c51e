"""Run array elements as local processes (no Slurm), or in this very process (debug).

An element of several tasks runs under ``mpirun -np R``, the same MPI world that
``srun --mpi=pmix`` gives on a cluster. At most ``array_parallelism`` elements run at once.
Ctrl-C sends SIGTERM to every element: each saves its checkpoint and ends ``preempted``,
and the next ``hpctrain submit`` resumes it.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from .. import exitcodes
from ..errors import HpctrainError
from ..sweep import SweepDir
from .spec import ROOT_MPI_ENV

Log = Callable[[str], None]


def element_command(sweep_dir: Path, index: int, tasks: int) -> list[str]:
    worker = [sys.executable, "-m", "hpctrain.launch.worker", str(sweep_dir), str(index)]
    if tasks <= 1:
        return worker
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise HpctrainError(f"slurm.nodes x slurm.tasks_per_node = {tasks} tasks need mpirun on PATH "
                            "for --executor local (install Open MPI), or set slurm.tasks_per_node=1")
    return [mpirun, "-np", str(tasks), "--oversubscribe", *worker]


def element_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if os.geteuid() == 0:
        env.update(ROOT_MPI_ENV)
    # A local element is not a Slurm job even when this shell runs inside one.
    for key in [k for k in env if k.startswith("SLURM_")]:
        env.pop(key)
    return env


def run_local(sweep: SweepDir, indices: list[int], *, tasks: int, parallelism: int, log: Log = print) -> dict[int, int]:
    """Run the elements as subprocesses; return {index: exit status}."""
    logs = sweep.root / "logs" / "local"
    logs.mkdir(parents=True, exist_ok=True)
    pending = list(indices)
    running: dict[int, tuple[subprocess.Popen, object]] = {}
    results: dict[int, int] = {}
    try:
        while pending or running:
            while pending and len(running) < max(1, parallelism):
                index = pending.pop(0)
                out = open(logs / f"{index}.log", "ab")
                proc = subprocess.Popen(element_command(sweep.root, index, tasks), stdout=out,
                                        stderr=subprocess.STDOUT, env=element_env(), start_new_session=True)
                running[index] = (proc, out)
                log(f"element {index}: started (pid {proc.pid}, log {logs / f'{index}.log'})")
            for index, (proc, out) in list(running.items()):
                if proc.poll() is not None:
                    out.close()
                    results[index] = _ended(sweep, index, proc.returncode, logs / f"{index}.log")
                    del running[index]
                    log(f"element {index}: exit status {results[index]} ({exitcodes.describe(results[index])})")
            time.sleep(0.2)
    except KeyboardInterrupt:
        for proc, _ in running.values():
            _signal_group(proc, signal.SIGTERM)
        for index, (proc, out) in running.items():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            out.close()
            results[index] = proc.returncode
        raise
    return results


def _ended(sweep: SweepDir, index: int, status: int, log_path: Path) -> int:
    """The element's exit status, after recording a run whose ranks mpirun killed."""
    if status == 0:
        return 0
    from ..runner import load_prepared_sweep, pick
    from .step_end import record_lost_run

    _, specs = load_prepared_sweep(sweep.root)
    output = log_path.read_text(encoding="utf-8", errors="replace")[-20000:]
    lost = record_lost_run(sweep.recorder(pick(specs, index)), "mpirun", status, output)
    return exitcodes.RANK_LOST if lost else status


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def run_debug(sweep: SweepDir, indices: list[int], *, log: Log = print) -> dict[int, str]:
    """Run the elements one after the other in this process (one rank each)."""
    from .worker import Worker

    outcome = {}
    for index in indices:
        log(f"element {index}: running in this process")
        try:
            outcome[index] = Worker(str(sweep.root), 0)(index)["status"]
        except HpctrainError:
            raise  # a config or data error: every element would fail the same way
        except Exception as e:  # recorded as failed in state.json by the runner
            log(f"element {index}: failed: {type(e).__name__}: {e}")
            outcome[index] = "failed"
    return outcome
