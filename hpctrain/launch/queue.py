"""Slurm's view of a sweep's jobs: one batched query, cached, whatever the cluster offers.

One ``squeue`` call for every job of the sweep (live jobs, and ended ones the controller
still holds for MinJobAge), then one ``sacct`` call for the rest, only where accounting is
on. Never a call per run: on a busy cluster hundreds of small queries (a poll per job)
are what makes the user RPC limit bite. The answer is kept in ``SWEEP/slurm/view.json`` for
a few seconds, so several ``hpctrain status`` (or ``--watch``) share one query.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from .. import exitcodes
from ..fsutil import atomic_write_text
from .limits import accounting_on

CACHE_S = 5.0
# States after which the job will not run again by itself.
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED")
WORDS = {"OUT_OF_MEMORY": "out of memory", "NODE_FAIL": "node failure", "TIMEOUT": "time limit reached",
         "CANCELLED": "cancelled", "BOOT_FAIL": "node boot failure", "DEADLINE": "deadline passed",
         "PREEMPTED": "preempted, not requeued"}


@dataclass
class Job:
    state: str
    reason: str = ""
    exit_code: Optional[int] = None

    def why(self) -> str:
        """'FAILED (rank lost)', 'OUT_OF_MEMORY (out of memory)': Slurm's state in words."""
        if self.exit_code not in (None, 0):
            words = "rank lost" if self.exit_code == exitcodes.RANK_LOST else exitcodes.describe(self.exit_code)
        else:
            words = WORDS.get(self.state) or (self.reason if self.reason not in ("", "None") else "")
        return f"{self.state} ({words})" if words else self.state


@dataclass
class View:
    jobs: dict[str, Job] = field(default_factory=dict)
    unseen: list[str] = field(default_factory=list)  # what could not be asked, and why
    taken_at: float = 0.0


def _clients():
    from .slurm import run_cmd  # one way to call a Slurm client, with its timeout
    return run_cmd


def _bases(job_ids: Iterable[str]) -> list[str]:
    return sorted({j.split("_")[0] for j in job_ids})


def ask_squeue(wanted: set[str], view: View) -> None:
    result = _clients()(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%r", "-j", ",".join(_bases(wanted))])
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return  # none of them is known to the controller any more
        view.unseen.append(f"squeue failed: {result.stderr.strip()[:200]}")
        return
    for line in result.stdout.splitlines():
        jid, _, rest = line.partition("|")
        state, _, reason = rest.partition("|")
        if jid in wanted:
            view.jobs[jid] = Job(state.split()[0] if state else "?", reason)


def ask_sacct(wanted: set[str], view: View) -> None:
    result = _clients()(["sacct", "-n", "-X", "-P", "-o", "JobID,State,ExitCode", "-j", ",".join(_bases(wanted))])
    if result.returncode != 0:
        view.unseen.append(f"sacct failed ({result.stderr.strip()[:200]}): Slurm's state of jobs that left "
                           "the queue is unknown; their on-disk state is shown")
        return
    for line in result.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[0] in wanted:
            code = re.match(r"(\d+)", parts[2])
            view.jobs[parts[0]] = Job(parts[1].split()[0] if parts[1] else "?", "",
                                      int(code.group(1)) if code else None)


def query(job_ids: Iterable[str]) -> View:
    """Slurm's state of each job id (``ARRAY_TASK`` or a plain id): squeue, then sacct for the rest."""
    wanted = {j for j in job_ids if j}
    view = View(taken_at=time.time())
    if not wanted:
        return view
    ask_squeue(wanted, view)
    if accounting_on() is False:
        view.unseen.append("accounting is off (AccountingStorageType=accounting_storage/none): no sacct, so "
                           "jobs that left the queue (after MinJobAge) have no Slurm state and no exit code; "
                           "their on-disk state is shown")
        return view
    # An ended job squeue still shows has no exit code there; sacct has it where it answers.
    rest = {j for j in wanted if j not in view.jobs or view.jobs[j].state in ENDED}
    if rest:
        ask_sacct(rest, view)
    return view


def cached_query(folder: Path, job_ids: Iterable[str], max_age: float = CACHE_S) -> View:
    """``query``, answered from ``folder/view.json`` when it is younger than ``max_age`` and
    asked about the same jobs."""
    wanted = sorted({j for j in job_ids if j})
    path = folder / "view.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data["ids"] == wanted and time.time() - data["taken_at"] < max_age:
            return View({k: Job(**v) for k, v in data["jobs"].items()}, data["unseen"], data["taken_at"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    view = query(wanted)
    try:
        atomic_write_text(path, json.dumps({"ids": wanted, "taken_at": view.taken_at, "unseen": view.unseen,
                                            "jobs": {k: asdict(v) for k, v in view.jobs.items()}}), durable=False)
    except OSError:
        pass  # a sweep folder this user cannot write: no cache, same answer
    return view
