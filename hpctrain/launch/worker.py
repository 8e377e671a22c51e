"""What one job array element runs: one grid point, on every task of the element.

Signals. Slurm sends the preemption signal (submitit's USR2 ``signal_delay_s`` before the
time limit, or USR1 from ``scancel --signal=USR1``) to every task of the element. Each
task only sets its stop flag; the trainer combines the flags across ranks at the next step
boundary, so all ranks stop at the same step, rank 0 saves ``last.pt`` and every rank
returns ``preempted``. Then rank 0 alone requeues the element (one requeue, however many
tasks got the signal), at most ``slurm.max_requeues`` times. SIGTERM (``scancel``,
``scontrol requeue``, preemption by Slurm) also saves the checkpoint but requeues nothing:
Slurm either requeues the job itself or the user cancelled it.

The Worker replaces submitit's own signal handlers while it runs: those checkpoint from
inside the handler and exit rank 0 at once, which would leave the other ranks waiting in
a collective. ``checkpoint()`` is still there for submitit, for a signal that arrives
before the run installs its flag.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Optional

REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")
EXIT_PREEMPTED = 75


def slurm_job_id(environ=os.environ) -> Optional[str]:
    """The id that names this element to scontrol (an array element has its own job id)."""
    return environ.get("SLURM_JOB_ID")


def display_id(environ=os.environ) -> str:
    """``ARRAY_TASK`` as squeue shows an array element, else the job id."""
    array, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else environ.get("SLURM_JOB_ID", "")


def restart_count(environ=os.environ) -> int:
    """How many times Slurm requeued this element (by us, scontrol requeue or preemption)."""
    try:
        return int(environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def is_rank_zero() -> bool:
    from ..dist import discover

    return discover().rank == 0


@dataclass
class Worker:
    """Picklable callable of one sweep: ``Worker(sweep_dir, max_requeues)(index)``."""
    sweep_dir: str
    max_requeues: int = 3

    def __call__(self, index: int) -> dict:
        from ..runner import run_point
        from ..train.signals import StopFlag

        flag = StopFlag().install()
        try:
            state = run_point(self.sweep_dir, index, stop_flag=flag, log=_log)
        finally:
            flag.uninstall()
        if state.status == "preempted" and flag.signal_name in REQUEUE_SIGNALS and is_rank_zero():
            self._requeue_or_explain(index)
        return {"index": index, "run_id": state.run_id, "status": state.status, "message": state.message}

    def checkpoint(self, index: int) -> Any:
        """submitit's hook: resubmit the same call; the run resumes from its own last.pt."""
        import submitit

        if restart_count() >= self.max_requeues:
            return None  # submitit then records the element as not requeued
        return submitit.helpers.DelayedSubmission(Worker(self.sweep_dir, self.max_requeues), index)

    def _requeue_or_explain(self, index: int) -> None:
        job = slurm_job_id()
        if job is None:
            return  # a local process: nothing to requeue; `hpctrain submit` again resumes it
        done = restart_count()
        if done >= self.max_requeues:
            _note(self.sweep_dir, index, f"preempted; not requeued: slurm.max_requeues ({self.max_requeues}) "
                                          "reached; submit the sweep again to resume")
            return
        # The note goes first: the requeue ends this job (SIGTERM) within moments.
        _note(self.sweep_dir, index, f"preempted; requeued job {display_id()} ({done + 1} of {self.max_requeues})")
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            _note(self.sweep_dir, index, f"preempted; scontrol requeue {job} failed: {result.stderr.strip()}")

def _note(sweep_dir: str, index: int, message: str) -> None:
    """Record why a preempted run waits (state.json message), keeping its status."""
    from ..runner import load_prepared_sweep, pick
    from ..sweep import read_state, write_state

    sweep, specs = load_prepared_sweep(sweep_dir)
    run_dir = sweep.run_dir(pick(specs, index).run_id)
    state = read_state(run_dir)
    if state is not None and state.status == "preempted":
        state.message = message
        write_state(run_dir, state)
    _log(message)


def _log(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------- local processes


def exit_code(status: str) -> int:
    return {"done": 0, "diverged": 0, "preempted": EXIT_PREEMPTED}.get(status, 1)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m hpctrain.launch.worker SWEEP_DIR INDEX``: one element as a local process."""
    from ..errors import HpctrainError

    p = argparse.ArgumentParser(prog="python -m hpctrain.launch.worker")
    p.add_argument("sweep_dir")
    p.add_argument("index", type=int)
    p.add_argument("--max-requeues", type=int, default=0)
    args = p.parse_args(argv)
    try:
        result = Worker(args.sweep_dir, args.max_requeues)(args.index)
    except HpctrainError as e:
        print(f"hpctrain worker: error: {e}", file=sys.stderr)
        return 2
    except Exception:  # recorded as failed in state.json by the runner, with its traceback logged
        return 1
    if not is_rank_zero():
        return 0  # rank 0 records the outcome; other ranks may read state.json before it does
    return exit_code(result["status"])


if __name__ == "__main__":
    sys.exit(main())
