"""After the ranks are gone: record a run that its own processes could not record.

When one rank dies (``kill -9``, the OOM killer, a lost node), the launcher ends the rest at
once: Slurm's PMIx plugin kills the whole job step, ``mpirun`` kills the other ranks. The
survivors may never reach their own error handling, and state.json would say ``running``
forever beside Slurm's FAILED. So whoever started the ranks looks once they have ended:
the element's script after ``srun`` (``python -m hpctrain.launch.step_end``, submitit's
teardown line included) and the local executor after ``mpirun``. A run still ``running``
then is recorded ``failed``, naming the rank the launcher saw die first.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

from .. import exitcodes
from ..runstate import RunRecorder, read_state
from ..sweep import SweepDir
from .element import element_id

# srun: "srun: error: node1: task 1: Killed" / "... task 0: Exited with exit code 3";
# mpirun: "mpirun noticed that process rank 1 with PID 123 on node n1 exited on signal 9 (Killed)."
_SRUN_TASK = re.compile(r"srun: error: (\S+): tasks? ([\d,-]+): (.+)$")
_MPIRUN_RANK = re.compile(r"process rank (\d+) with PID \d+ on node (\S+) exited on (signal \d+(?: \([^)]*\))?)")


def first_dead_rank(launcher_output: str) -> Optional[str]:
    """'rank 1 (task 1 on node1: Killed)' for the first rank the launcher reported lost."""
    for line in launcher_output.splitlines():
        srun = _SRUN_TASK.search(line)
        if srun:
            node, tasks, what = srun.groups()
            first = re.split(r"[,-]", tasks)[0]
            return f"rank {first} ({what.strip()} on {node})"
        mpirun = _MPIRUN_RANK.search(line)
        if mpirun:
            rank, node, what = mpirun.groups()
            return f"rank {rank} ({what} on {node})"
    return None


def record_lost_run(recorder: RunRecorder, launcher: str, status: int, launcher_output: str) -> bool:
    """Mark the run failed when its ranks ended without recording an outcome; True when it was."""
    state = recorder.read()
    if state is None or state.status != "running":
        return False
    dead = first_dead_rank(launcher_output)
    who = f"{dead} died" if dead else "a rank died or was killed"
    recorder.failed(f"{launcher} ended with exit status {status} while the run was running: {who} "
                    "(killed, out of memory or its node lost) and the others were stopped with it; "
                    "not requeued. `hpctrain submit --rerun failed` resumes it from its last checkpoint",
                    state.wall_time_s)
    return True


# --------------------------------------------------------------------------- in a Slurm job


def _job_stderr(job: str) -> str:
    """The tail of this job's stderr file, where srun reports its tasks' ends."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    match = re.search(r"\bStdErr=(\S+)", shown.stdout)
    if not match:
        return ""
    try:
        return Path(match.group(1)).read_text(encoding="utf-8", errors="replace")[-20000:]
    except OSError:
        return ""


def runs_of_this_element(sweep: SweepDir) -> list[RunRecorder]:
    """Recorders of the runs stamped with this array element's id (normally one)."""
    job = element_id()
    found = []
    for rec in sweep.records():
        run_dir = sweep.run_dir(rec["run_id"])
        state = read_state(run_dir)
        if state is not None and job is not None and state.slurm_job_id == job:
            found.append(RunRecorder(run_dir))
    return found


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m hpctrain.launch.step_end STATUS CONFIG [KEY=VALUE ...] [--sweep-dir DIR] ...``

    Run after ``srun`` with srun's exit status and the arguments ``hpctrain run`` was given;
    exits with the element's status.
    """
    from ..commands import run as run_command
    from ..runner import prepare_sweep

    p = argparse.ArgumentParser(prog="python -m hpctrain.launch.step_end")
    p.add_argument("status", type=int, help="srun's exit status")
    run_command.configure(p)
    args = p.parse_args(argv)
    if args.status == 0:
        return 0
    job = element_id()
    sweep, _raw, _specs = prepare_sweep(args.config, list(args.overrides), args.sweep_dir, write=False)
    output = _job_stderr(job) if job else ""
    lost = [r for r in runs_of_this_element(sweep) if record_lost_run(r, "srun", args.status, output)]
    for recorder in lost:
        print(f"hpctrain: {recorder.read().message}", file=sys.stderr, flush=True)
    return exitcodes.RANK_LOST if lost else args.status


if __name__ == "__main__":
    sys.exit(main())
