"""A run's state.json and the one recorder that writes it.

Transitions::

    pending ──> running ──> done | diverged | failed | preempted | pruned
                   ▲                                     │
                   └──────────── (resumed) ──────────────┘

Every write of state.json goes through :class:`RunRecorder`: the sweep folder creates
pending states, the launch layer stamps Slurm ids, the runner marks a run running or
failed, and the trainer's progress reports arrive through :meth:`RunRecorder.report`.
Writes are atomic (temp file + rename), so readers (``status``, ``collect``, a resubmit)
never see half a file.
"""
from __future__ import annotations

import dataclasses
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .fsutil import atomic_write_text, read_json

STATUSES = ("pending", "running", "done", "failed", "diverged", "preempted", "pruned")
FINAL_STATUSES = ("done", "failed", "diverged", "pruned")
STATE_FILE = "state.json"


@dataclass
class RunState:
    status: str = "pending"
    epoch: int = 0
    total_epochs: int = 0
    step: int = 0
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    monitor: str = "val_loss"
    message: str = ""
    index: Optional[int] = None
    run_id: str = ""
    params: dict = field(default_factory=dict)
    slurm_job_id: Optional[str] = None
    host: str = ""
    started_at: Optional[float] = None
    updated_at: Optional[float] = None
    wall_time_s: float = 0.0
    samples_per_s: Optional[float] = None
    requeues: int = 0
    world_size: int = 1
    global_batch: Optional[int] = None  # rows per optimizer step over every rank
    backend: str = "none"
    test: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {', '.join(STATUSES)}")


def read_state(run_dir: str | Path) -> Optional[RunState]:
    """The run's state, or None when state.json is missing or unreadable."""
    try:
        data = read_json(Path(run_dir) / STATE_FILE)
    except (FileNotFoundError, ValueError, OSError):
        return None
    known = {k: v for k, v in data.items() if k in RunState.__dataclass_fields__}
    try:
        return RunState(**known)
    except (TypeError, ValueError):
        return None


# Fields of the trainer's progress report that go into state.json as they are.
_PROGRESS_FIELDS = ("epoch", "total_epochs", "step", "best_metric", "best_epoch", "monitor",
                    "world_size", "backend", "wall_time_s", "samples_per_s")


class RunRecorder:
    """The only writer of one run's state.json."""

    def __init__(self, run_dir: str | Path, *, index: Optional[int] = None, run_id: str = "",
                 params: Optional[dict] = None, durable: bool = True):
        """``durable=False`` writes without fsync: a submission writes thousands of pending
        states (minutes on a shared file system), and one lost in a crash only means that
        grid point is submitted again."""
        self.run_dir = Path(run_dir)
        self._identity = {"index": index, "run_id": run_id, "params": dict(params or {})}
        self.durable = durable

    @property
    def path(self) -> Path:
        return self.run_dir / STATE_FILE

    def read(self) -> Optional[RunState]:
        return read_state(self.run_dir)

    def _current(self) -> RunState:
        return self.read() or RunState(**self._identity)

    def _write(self, state: RunState) -> RunState:
        state.updated_at = time.time()
        state.host = state.host or socket.gethostname()
        # A flat dict and no indent: json's C encoder, ten times the pure-Python one of indent=2.
        text = json.dumps(dataclasses.asdict(state), sort_keys=True, allow_nan=True) + "\n"
        atomic_write_text(self.path, text, durable=self.durable)
        return state

    # -- transitions

    def pending(self, total_epochs: int, monitor: str = "val_loss") -> Optional[RunState]:
        """A new run's first state; an existing state.json is left as it is."""
        if self.path.exists():
            return None
        return self._write(RunState(status="pending", total_epochs=total_epochs, monitor=monitor,
                                    **self._identity))

    def adopt(self, total_epochs: int) -> None:
        """An existing run becomes this grid point (its sweep's train.epochs changed): its
        state keeps its results and takes the point's id, index, params and length."""
        state = self.read()
        if state is not None:
            state.run_id, state.index, state.params = (self._identity["run_id"], self._identity["index"],
                                                       self._identity["params"])
            state.total_epochs = total_epochs
            self._write(state)

    def queued(self, job_id: str, *, total_epochs: int, monitor: str, exists: bool) -> None:
        """A submitted run: a new run's pending state naming its job, or the job stamped into an
        unfinished one (``exists``: the run has a folder; finished runs keep their state)."""
        state = self.read() if exists else None
        if state is None:
            state = RunState(status="pending", total_epochs=total_epochs, monitor=monitor, **self._identity)
        elif state.status not in ("pending", "preempted", "failed"):
            return
        state.slurm_job_id = job_id
        self._write(state)

    def running(self, *, total_epochs: int, world_size: int, backend: str,
                job_id: Optional[str] = None, global_batch: Optional[int] = None) -> RunState:
        """The run starts (or resumes) on this job; a start after ``preempted`` counts a requeue."""
        state = self._current()
        if state.status == "preempted":
            state.requeues += 1
        state.status, state.message = "running", ""
        state.total_epochs, state.world_size, state.backend = total_epochs, world_size, backend
        state.global_batch = global_batch
        state.started_at = state.started_at or time.time()
        state.slurm_job_id = job_id  # None outside Slurm: the run is not any job's now
        return self._write(state)

    def report(self, progress: Any) -> RunState:
        """A progress report of the trainer (``train.loop.Progress``): running, or how it ended."""
        state = self._current()
        state.status = progress.status
        if progress.message or progress.status != "running":
            state.message = progress.message  # an epoch's report keeps "resumed from ..."
        for name in _PROGRESS_FIELDS:
            value = getattr(progress, name)
            if name != "samples_per_s" or value is not None:
                setattr(state, name, value)
        if progress.test:
            state.test = dict(progress.test)
        state.started_at = state.started_at or time.time()
        return self._write(state)

    def failed(self, message: str, wall_time_s: float) -> RunState:
        state = self._current()
        state.status = "failed"
        state.message = message[:2000]
        state.wall_time_s = state.wall_time_s or wall_time_s
        return self._write(state)

    def note(self, message: str) -> Optional[RunState]:
        """Say why a preempted run waits (requeued, or not), keeping its status."""
        state = self.read()
        if state is None or state.status != "preempted":
            return None
        state.message = message
        return self._write(state)
