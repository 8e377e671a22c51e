"""What one array element runs, whoever launched it, and the one requeue decision.

Every entry point that trains a grid point on a cluster or locally — the submitit worker,
``hpctrain run`` under ``srun``/``mpirun`` (rendered scripts and ``jobs/*.sbatch``), the
local executor — goes through :func:`run_element`:

1. install the stop flag: SIGUSR1, SIGUSR2 and SIGTERM only set it; the trainer combines
   it across ranks at the next step boundary, rank 0 saves ``last.pt`` and every rank
   returns ``preempted``;
2. train the grid point, with the Slurm element id stamped into its state;
3. after a preemption *signal* (USR1/USR2: time limit near, or ``scancel --signal``), rank
   0 alone requeues its own array element (``ARRAY_TASK``, never the whole array), at most
   ``slurm.max_requeues`` times. SIGTERM checkpoints too but requeues nothing: Slurm
   requeues a job it preempts itself, and a cancelled job should stay cancelled; the state
   says so, and a later ``hpctrain submit`` resumes it.

Nothing here looks at exit statuses: a dead or hung rank fails the run and is never requeued.
"""
from __future__ import annotations

import os
import subprocess
from typing import Callable, Mapping, Optional

from ..runstate import RunRecorder, RunState
from ..sweep import RunSpec, SweepDir

Log = Callable[[str], None]
REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")


def element_id(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """``ARRAY_TASK`` as squeue shows an array element, the job id of a plain job, None outside Slurm."""
    array, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return environ.get("SLURM_JOB_ID") or None


def restart_count(environ: Mapping[str, str] = os.environ) -> int:
    """How many times Slurm requeued this element (by us, ``scontrol requeue`` or preemption)."""
    try:
        return int(environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def may_requeue(max_requeues: int, environ: Mapping[str, str] = os.environ) -> bool:
    return element_id(environ) is not None and restart_count(environ) < max_requeues


def run_element(sweep: SweepDir, spec: RunSpec, *, max_requeues: int, log: Log = print,
                overfit_batches: Optional[int] = None) -> RunState:
    """Train ``spec`` on this rank; requeue the element after a preemption signal (rank 0)."""
    from ..dist import discover
    from ..runner import run_spec
    from ..train.signals import StopFlag

    flag = StopFlag().install()
    try:
        state = run_spec(sweep, spec, stop_flag=flag, log=log, overfit_batches=overfit_batches,
                         job_id=element_id())
    finally:
        flag.uninstall()
    if state.status != "preempted" or discover().rank != 0:
        return state
    if flag.signal_name in REQUEUE_SIGNALS:
        requeue(sweep.recorder(spec), max_requeues, log)
    elif flag.signal_name == "SIGTERM":
        _note(sweep.recorder(spec), TERM_NOTE, log)
    return state


# Where Slurm preempts with PreemptMode=CANCEL, or --requeue is refused, SIGTERM is all the
# element gets: nobody requeues it, so the state has to say who resumes it.
TERM_NOTE = ("preempted by SIGTERM (Slurm preemption, scancel or the time limit); checkpoint saved. "
             "Slurm requeues it where it preempts with PreemptMode=REQUEUE; otherwise the next "
             "`hpctrain submit` resumes it")


def requeue(recorder: RunRecorder, max_requeues: int, log: Log = print,
            environ: Mapping[str, str] = os.environ) -> bool:
    """Requeue this array element so that it resumes from its checkpoint; say why in its state."""
    job = element_id(environ)
    if job is None:
        return False  # a local process: `hpctrain submit` again resumes it
    done = restart_count(environ)
    if done >= max_requeues:
        _note(recorder, f"preempted; not requeued: slurm.max_requeues ({max_requeues}) reached; "
                        "submit the sweep again to resume", log)
        return False
    # The note goes first: the requeue ends this job (SIGTERM) within moments.
    _note(recorder, f"preempted; requeued job {job} ({done + 1} of {max_requeues})", log)
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        _note(recorder, f"preempted; scontrol requeue {job} failed: {result.stderr.strip()}", log)
        return False
    return True


def _note(recorder: RunRecorder, message: str, log: Log) -> None:
    recorder.note(message)
    log(message)
