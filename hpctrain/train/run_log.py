"""The run's records on rank 0: metrics.csv, timing.csv, the epoch log line, the progress bar.

Records are appended, one line per epoch, and flushed (other processes, such as the live
TensorBoard listener or ``hpctrain status``, read them while the run trains), but not
fsynced: every checkpoint carries the metrics rows it covers, and ``restart`` rewrites both
files from the checkpoint when a run starts or resumes, so rows a crash lost are written
again and rows written after the checkpoint (by a process that died before the next one)
are dropped. That is what makes a resumed run's metrics.csv byte for byte the one an
uninterrupted run writes. ``sync`` makes the files durable once, when the run ends.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from ..fsutil import atomic_write_text

TIMING_COLUMNS = ("epoch", "epoch_time_s", "samples_per_s", "elapsed_s")
METRICS, TIMING = "metrics.csv", "timing.csv"
PROGRESS_EVERY_S = 0.25


def metrics_csv(rows: list[dict]) -> str:
    """metrics.csv text: exact float reprs, so equal numbers always give equal bytes."""
    return MetricRows(rows).text()


def parse_metrics_csv(text: str) -> list[dict]:
    """The rows of ``metrics_csv`` text, with the same types: ``metrics_csv`` of them gives the
    same text back (a float's repr reads back as the same float)."""
    lines = text.splitlines()
    if not lines:
        return []
    columns = lines[0].split(",")
    return [dict(zip(columns, map(_parse_cell, line.split(",")))) for line in lines[1:]]


def _parse_cell(cell: str) -> Any:
    if cell == "":
        return None
    if cell.lstrip("-").isdigit():
        return int(cell)
    try:
        return float(cell)
    except ValueError:
        return cell


def _line(columns: list[str], row: dict) -> str:
    return ",".join(_cell(row.get(c)) for c in columns) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


class MetricRows:
    """The metrics rows of a run with their metrics.csv lines, kept as they are added (a
    checkpoint stores the text each epoch; rebuilding it would cost a line per row)."""

    def __init__(self, rows: Optional[list[dict]] = None):
        self.rows: list[dict] = []
        self.lines: list[str] = []
        self.columns: list[str] = []  # the first row's, for every row (as metrics.csv has one header)
        for row in rows or []:
            self.append(row)

    def append(self, row: dict) -> str:
        """Add a row; returns the text it adds to metrics.csv (with the header for the first)."""
        first = not self.rows
        if first:
            self.columns = list(row)
            self.lines.append(_line(self.columns, dict(zip(row, row))))
        self.lines.append(_line(self.columns, row))
        self.rows.append(row)
        return "".join(self.lines[-2:]) if first else self.lines[-1]

    def text(self) -> str:
        return "".join(self.lines)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def timing_line(epoch: int, epoch_time_s: float, samples_per_s: float, elapsed_s: float) -> str:
    return f"{epoch},{epoch_time_s:.4f},{samples_per_s:.1f},{elapsed_s:.3f}\n"


class RunLog:
    """metrics.csv and timing.csv of one run folder (a no-op without a folder)."""

    def __init__(self, run_dir: Optional[Path]):
        self.run_dir = run_dir
        self._started = False
        self._metrics: Optional[TextIO] = None
        self._timing: Optional[TextIO] = None

    def restart(self, metrics_text: str, epoch: int) -> None:
        """Both files as of a checkpoint at ``epoch`` with ``metrics_text`` (durably, once per process)."""
        if self.run_dir is None:
            return
        self.close()
        metrics, timing = self.run_dir / METRICS, self.run_dir / TIMING
        kept = [ln + "\n" for ln in _read_lines(timing)[1:] if ln and int(ln.split(",")[0]) <= epoch]
        _replace(metrics, metrics_text)
        _replace(timing, _timing_header() + "".join(kept) if kept else "")
        self._started = True

    def append(self, metrics_text: str, timing: str) -> None:
        """One epoch: its metrics.csv text (``MetricRows.append``) and its timing line, flushed."""
        if not self._started:
            return
        if self._metrics is None:  # opened at the first row: a run has no empty metrics.csv for readers
            self._metrics = open(self.run_dir / METRICS, "a", encoding="utf-8")
            self._timing = open(self.run_dir / TIMING, "a", encoding="utf-8")
        self._metrics.write(metrics_text)
        self._metrics.flush()
        if self._timing.tell() == 0:
            self._timing.write(_timing_header())
        self._timing.write(timing)
        self._timing.flush()

    def sync(self) -> None:
        """Make every appended line durable (once, at the end of the run)."""
        for f in (self._metrics, self._timing):
            if f is not None:
                os.fsync(f.fileno())

    def close(self) -> None:
        for f in (self._metrics, self._timing):
            if f is not None:
                f.close()
        self._metrics = self._timing = None


def _timing_header() -> str:
    return ",".join(TIMING_COLUMNS) + "\n"


def _replace(path: Path, text: str) -> None:
    """``text`` as the file's content; an empty text removes the file (a fresh run has none)."""
    if text:
        atomic_write_text(path, text)
    else:
        path.unlink(missing_ok=True)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []


def epoch_line(epoch: int, epochs: int, metrics: dict, keys: tuple[str, ...], split: str,
               lr: Optional[float], samples_per_s: float, elapsed_s: float) -> str:
    """The one log line of an epoch."""
    parts = [f"epoch {epoch}/{epochs}", f"train_loss {metrics['train_loss']:.4f}"]
    if "val_loss" in metrics:
        parts.append(f"val_loss {metrics['val_loss']:.4f}")
    parts += [f"{split}_{m} {metrics[f'{split}_{m}']:.4f}" for m in keys]
    parts += [f"lr {lr or 0.0:.3g}", f"{samples_per_s:,.0f} samples/s", f"{elapsed_s:.1f}s"]
    return "  ".join(parts)


class ProgressBar:
    """The in-epoch bar on a terminal's stderr, redrawn at most every PROGRESS_EVERY_S."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._at = 0.0

    def show(self, epoch: int, done: int, total: int, loss: Callable[[], float]) -> None:
        now = time.monotonic()
        if now - self._at < PROGRESS_EVERY_S and done < total:
            return
        self._at = now
        filled = int(30 * done / max(1, total))
        bar = "#" * filled + "." * (30 - filled)
        sys.stderr.write(f"\r  epoch {epoch} [{bar}] {done}/{total} loss {loss():.4f}")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")


class Throttled:
    """A progress listener that passes transitions at once and epoch reports at most every
    ``every_s`` seconds: a state file rewritten (and fsynced) each epoch would cost more
    than a small model's epoch. A report with a message, or of any status but ``running``,
    always passes, so every transition and the final state are recorded; so does the first
    epoch report after one, so that a reader sees a started run make progress at once."""

    def __init__(self, listener: Callable[[Any], Any], every_s: float, clock: Callable[[], float] = time.monotonic):
        self.listener, self.every_s, self.clock = listener, every_s, clock
        self._last = 0.0
        self._status: Optional[str] = None
        self._epoch_passed = False  # an epoch report passed since the last transition

    def __call__(self, progress: Any) -> None:
        now = self.clock()
        transition = progress.status != self._status or bool(progress.message)
        if not transition and self._epoch_passed and now - self._last < self.every_s:
            return
        self._epoch_passed = not transition
        self._status, self._last = progress.status, now
        self.listener(progress)
