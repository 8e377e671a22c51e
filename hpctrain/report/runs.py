"""Read a sweep folder into memory: every run's state and per-epoch metrics.

Each file is read once, so the reports describe one snapshot even while runs keep
writing. A missing file is normal (a run that has not started yet); a file that
cannot be parsed is recorded as one problem line naming it, and skipped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import HpctrainError
from ..sweep import RunState, SweepDir

UNKNOWN = "unknown"  # the status of a run whose state.json cannot be read


@dataclass
class Curves:
    """The rows of one metrics.csv: ``values[i, j]`` is column ``columns[j]`` at ``epochs[i]``."""
    columns: list[str]
    epochs: np.ndarray  # int64 [n]
    values: np.ndarray  # float64 [n, len(columns)]

    def get(self, name: str) -> Optional[np.ndarray]:
        try:
            return self.values[:, self.columns.index(name)]
        except ValueError:
            return None

    def last(self, name: str) -> Optional[float]:
        column = self.get(name)
        return float(column[-1]) if column is not None and len(column) else None


@dataclass
class RunRecord:
    """One grid point as collected: grid record, state (if readable) and curves (if any)."""
    index: int
    run_id: str
    params: dict[str, Any]
    run_dir: Path
    status: str
    state: Optional[RunState] = None
    curves: Optional[Curves] = None
    best_value: Optional[float] = None  # filled in by ranking.score_runs
    best_epoch: Optional[int] = None

    @property
    def epochs_run(self) -> int:
        if self.curves is not None:
            return len(self.curves.epochs)
        return int(self.state.epoch) if self.state is not None and isinstance(self.state.epoch, int) else 0


@dataclass
class SweepData:
    root: Path
    param_keys: list[str]
    runs: list[RunRecord]
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.root.resolve().name


# --------------------------------------------------------------------------- files


def _read_bytes(path: Path) -> Optional[bytes]:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_grid(sweep: SweepDir, problems: list[str]) -> list[dict]:
    """grid.jsonl records in index order; a bad line is reported and skipped."""
    data = _read_bytes(sweep.grid_path)
    if data is None:
        raise HpctrainError(f"{sweep.grid_path}: not found; is {sweep.root} a sweep folder "
                            "(made by hpctrain submit, sbatch or run)?")
    records = []
    for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rec = {"index": int(rec["index"]), "run_id": str(rec["run_id"]), "params": dict(rec.get("params") or {})}
        except (ValueError, KeyError, TypeError):
            problems.append(f"{sweep.grid_path}:{lineno}: not a grid record "
                            "(expected JSON with index, run_id, params); skipped")
            continue
        records.append(rec)
    return sorted(records, key=lambda r: r["index"])


def parse_state(data: bytes, path: Path, problems: list[str]) -> Optional[RunState]:
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        return RunState(**{k: v for k, v in raw.items() if k in RunState.__dataclass_fields__})
    except (ValueError, TypeError) as e:
        problems.append(f"{path}: unreadable run state ({_short(e)}); skipped")
        return None


def parse_metrics(text: str, path: Path, problems: list[str]) -> Optional[Curves]:
    """metrics.csv -> Curves. A half-written last line (no newline yet) is dropped; a file
    whose header or any other row is malformed is reported and skipped whole."""
    if not text:
        return None  # the trainer writes an empty file before its first epoch ends
    lines = text.split("\n")
    if lines[-1] != "":
        problems.append(f"{path}: last line is incomplete (file being written or truncated); dropped it")
    body = [line for line in lines[1:-1] if line]
    header = lines[0].strip().split(",")
    if header[0] != "epoch" or len(set(header)) != len(header) or not all(header):
        problems.append(f"{path}: header {lines[0][:80]!r} is not 'epoch,step,lr,...'; skipped")
        return None
    if not body:
        return Curves(header[1:], np.zeros(0, np.int64), np.zeros((0, len(header) - 1)))
    try:
        table = np.loadtxt(body, delimiter=",", dtype=np.float64, ndmin=2, comments=None)
        if table.shape[1] != len(header):
            raise ValueError("column count")
    except ValueError:
        table = _parse_rows_slowly(body, len(header), path, problems)
        if table is None:
            return None
    epochs = table[:, 0]
    if not np.all(np.isfinite(epochs)) or np.any(epochs != np.round(epochs)):
        problems.append(f"{path}: epoch column holds non-integer values; skipped")
        return None
    return Curves(header[1:], epochs.astype(np.int64), np.ascontiguousarray(table[:, 1:]))


def _parse_rows_slowly(body: list[str], width: int, path: Path, problems: list[str]) -> Optional[np.ndarray]:
    """Row by row: empty fields are NaN (a metric not computed that epoch); anything else
    that is not a number, or a row of the wrong width, makes the file corrupt."""
    table = np.empty((len(body), width))
    for i, line in enumerate(body):
        fields = line.split(",")
        try:
            if len(fields) != width:
                raise ValueError(f"{len(fields)} fields, expected {width}")
            table[i] = [float(f) if f.strip() else np.nan for f in fields]
        except ValueError as e:
            problems.append(f"{path}:{i + 2}: malformed row ({_short(e)}); skipped the file")
            return None
    return table


def _short(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:120]


# --------------------------------------------------------------------------- sweep


def read_run(sweep: SweepDir, rec: dict, problems: list[str]) -> RunRecord:
    run_dir = sweep.run_dir(rec["run_id"])
    run = RunRecord(rec["index"], rec["run_id"], rec["params"], run_dir, status="pending")
    state_bytes = _read_bytes(run_dir / "state.json")
    if state_bytes is not None:
        run.state = parse_state(state_bytes, run_dir / "state.json", problems)
        run.status = run.state.status if run.state is not None else UNKNOWN
    metrics_bytes = _read_bytes(run_dir / "metrics.csv")
    if metrics_bytes is not None:
        run.curves = parse_metrics(metrics_bytes.decode("utf-8", errors="replace"),
                                   run_dir / "metrics.csv", problems)
    return run


def grid_keys(sweep: SweepDir) -> list[str]:
    """The swept keys in the order the config's grid lists them (grid.jsonl sorts them)."""
    from ..config import ConfigError, read_raw
    from ..search import keys as search_keys

    try:
        raw = read_raw(sweep.config_path)
    except ConfigError:
        return []
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        return []
    keys: list[str] = []
    for key, value in grid.items():
        if key != "zip":
            keys.append(key)
            continue
        for group in value if isinstance(value, list) else [value]:
            if isinstance(group, dict):
                keys.extend(group)
    return [k for k in keys if isinstance(k, str)] + search_keys(raw.get("search"))


def read_sweep(root: str | Path) -> SweepData:
    """Every run of the sweep folder ``root``, in grid order, with the problems met."""
    sweep = SweepDir(root)
    problems: list[str] = []
    records = read_grid(sweep, problems)
    keys = grid_keys(sweep)
    for rec in records:
        keys.extend(k for k in rec["params"] if k not in keys)
    runs = [read_run(sweep, rec, problems) for rec in records]
    return SweepData(Path(root), keys, runs, problems)


def read_timing(run_dir: Path) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(epoch, elapsed_s) of timing.csv, or None; used only for TensorBoard wall times."""
    data = _read_bytes(run_dir / "timing.csv")
    if data is None:
        return None
    curves = parse_metrics(data.decode("utf-8", errors="replace"), run_dir / "timing.csv", [])
    if curves is None or curves.get("elapsed_s") is None:
        return None
    return curves.epochs, curves.get("elapsed_s")
