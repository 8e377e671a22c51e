"""TensorBoard events of one run, written while it trains: ``<run_dir>/tb/``.

``LiveTensorBoard`` is a progress listener: the runner calls it on rank 0 with each of the
trainer's progress reports, after the run's recorder. It reads the rows the trainer has
appended to metrics.csv since its last call (only those bytes), writes them as scalars at
step = epoch, and flushes, so ``tensorboard --logdir sweeps/<name>/runs`` shows every run
epoch by epoch. The first time it writes, it also writes the run's
HParams (grid values, monitored metric); when the run ends it records the session's end
and closes. The trainer knows nothing of it.

A process that resumes a run starts the folder afresh from the whole metrics.csv (which
the checkpoint restored), so epochs redone after a restart never appear twice. Writing
events must never fail a run: without the tensorboard package, or on any error, it logs
one line and stays silent for the rest of the run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

TB_FOLDER = "tb"
EVENT_GLOB = "events.out.tfevents.*"


class LiveTensorBoard:
    def __init__(self, run_dir: str | Path, log: Callable[[str], None] = print):
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / TB_FOLDER
        self.log = log
        self.last_epoch: Optional[int] = None  # the last epoch written by this process
        self._writer = None
        self._off = False
        self._header, self._read_to = b"", 0  # metrics.csv's header, and how far it has been read

    def __call__(self, progress) -> None:
        """Take one progress report (``train.loop.Progress``)."""
        if self._off:
            return
        try:
            self._write_new_rows(progress.monitor)
            if progress.status != "running":
                self.close(progress.status)
        except ImportError:
            self._give_up("no TensorBoard events: the tensorboard package is not installed (pip install tensorboard)")
        except Exception as exc:  # a report must never stop training
            self._give_up(f"no more TensorBoard events for this run: {type(exc).__name__}: {exc}")

    def close(self, status: Optional[str] = None) -> None:
        """Record the session's end (for a final ``status``) and close the files; safe to
        call more than once and whatever happened before."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            from .tensorboard import session_end_summary, session_status

            code = session_status(status) if status else None
            if code is not None:
                writer.file_writer.add_summary(session_end_summary(code, time.time()), self.last_epoch or 0)
            writer.close()
        except Exception as exc:  # a report must never fail a run
            self._give_up(f"closing the TensorBoard events failed: {type(exc).__name__}: {exc}")

    def _give_up(self, message: str) -> None:
        self._off = True
        self.log(f"{self.folder}: {message}")
        self.close()

    def _write_new_rows(self, monitor: str) -> None:
        curves = self._read_metrics()
        if curves is None:
            return
        new = [i for i, e in enumerate(curves.epochs.tolist()) if self.last_epoch is None or e > self.last_epoch]
        if not new:
            return
        writer = self._writer or self._open(int(curves.epochs[new[0]]), monitor)
        from .tensorboard import scalars_summary

        now = time.time()
        columns = [c for c in curves.columns if c != "step"]
        for i in new:
            epoch = int(curves.epochs[i])
            summary = scalars_summary((c, float(curves.values[i, curves.columns.index(c)])) for c in columns)
            if summary.value:
                writer.file_writer.add_summary(summary, epoch, now)
            self.last_epoch = epoch
        writer.flush()

    def _read_metrics(self):
        """The rows of metrics.csv added since the last call (the file only grows while this
        process trains; it is read whole again if it ever shrinks)."""
        from .runs import parse_metrics

        path = self.run_dir / "metrics.csv"
        try:
            with open(path, "rb") as f:
                if f.seek(0, 2) < self._read_to:
                    self._header, self._read_to = b"", 0
                f.seek(self._read_to)
                chunk = f.read()
        except FileNotFoundError:
            return None
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a row still being written waits for the next call
        self._read_to += len(complete)
        if not self._header:
            self._header, _, complete = complete.partition(b"\n")
            self._header += b"\n"
        if not complete:
            return None
        problems: list[str] = []
        curves = parse_metrics((self._header + complete).decode("utf-8"), path, problems)
        if problems:
            raise ValueError(problems[0])
        return curves

    def _open(self, first_epoch: int, monitor: str):
        """A new event file; earlier processes' files go, since this one rewrites every row."""
        from torch.utils.tensorboard import SummaryWriter

        from .tensorboard import experiment_summary, session_start_summary

        params = self._grid_params()
        for stale in self.folder.glob(EVENT_GLOB):
            stale.unlink()
        # purge_step: a TensorBoard still holding the old files drops their steps from here on
        writer = SummaryWriter(str(self.folder), purge_step=first_epoch)
        writer.file_writer.add_summary(experiment_summary(params, [monitor]), 0)
        writer.file_writer.add_summary(session_start_summary(params, time.time()), 0)
        self._writer = writer
        return writer

    def _grid_params(self) -> dict[str, Any]:
        """The run's grid values, from the state.json its recorder wrote when it started."""
        from ..runstate import read_state

        state = read_state(self.run_dir)
        return dict(state.params or {}) if state is not None else {}
