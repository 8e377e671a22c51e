"""Exit statuses of every hpctrain process, each with one meaning.

Every launcher (the submitit worker, ``hpctrain run`` under srun or mpirun, the local
executor, the rendered and shipped sbatch scripts) takes its codes from here. Only
``PREEMPTED`` means "the checkpoint is saved, run me again"; a dead or hung rank is
``RANK_LOST`` and is never requeued.
"""
from __future__ import annotations

OK = 0            # the run ended done, diverged or pruned (results, not errors)
FAILED = 1        # the run failed: an exception while building or training; state.json says why
USAGE = 2         # bad config, command line or data found before training; nothing was run
RANK_LOST = 69    # EX_UNAVAILABLE: a collective failed because another rank died or hung
PREEMPTED = 75    # EX_TEMPFAIL: stopped on a signal after saving last.pt; resuming continues it

MEANINGS = {
    OK: "done, diverged or pruned",
    FAILED: "failed",
    USAGE: "bad config or usage",
    RANK_LOST: "a rank died or hung (collective failure)",
    PREEMPTED: "preempted, checkpoint saved",
}


def for_status(status: str) -> int:
    """The exit status of a process whose run ended with ``status``."""
    if status in ("done", "diverged", "pruned"):
        return OK
    if status == "preempted":
        return PREEMPTED
    return FAILED


def describe(code: int) -> str:
    """Words for an exit status, as the local executor and status print it."""
    if code < 0:
        return f"killed by signal {-code}"
    return MEANINGS.get(code, f"exit status {code}")
