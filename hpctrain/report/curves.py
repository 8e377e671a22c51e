"""curves.h5: every run's per-epoch curves in one HDF5 file, aligned by epoch.

Layout (N runs in grid order, E epochs from the lowest to the highest epoch any run reached)::

    /            attrs: format, sweep, metric, mode, columns (JSON), param_keys (JSON)
    /epoch       int64 [E]           the epoch of each column of the curves
    /index       int64 [N]           grid index of each row
    /run_id      str   [N]
    /state       str   [N]           pending | running | done | failed | diverged | preempted | unknown
    /epochs_run  int64 [N]
    /best_value  float64 [N]         best value of the chosen metric (NaN: none yet)
    /best_epoch  int64 [N]           (-1: none yet)
    /curves/<column>  float64 [N, E] train_loss, val_loss, lr, step, ...; NaN where a run has no row
    /params/<key>     [N]            one grid hyperparameter per dataset, attr ``key``: numbers as
                                     float64/int64, anything else as text (lists as JSON)

The file is built in memory and written atomically; HDF5 object times are off, so an
unchanged sweep gives a byte-identical file.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from ..fsutil import atomic_write_bytes
from .runs import SweepData

FORMAT = 1


def all_columns(data: SweepData) -> list[str]:
    names: list[str] = []
    for run in data.runs:
        if run.curves is not None:
            names.extend(c for c in run.curves.columns if c not in names)
    return names


def aligned_curves(data: SweepData) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(epoch axis [E], {column: [N, E] NaN-padded}) over every run."""
    with_rows = [r.curves for r in data.runs if r.curves is not None and len(r.curves.epochs)]
    if not with_rows:
        return np.zeros(0, np.int64), {c: np.zeros((len(data.runs), 0)) for c in all_columns(data)}
    first = min(int(c.epochs.min()) for c in with_rows)
    last = max(int(c.epochs.max()) for c in with_rows)
    epoch_axis = np.arange(first, last + 1, dtype=np.int64)
    columns = all_columns(data)
    out = {c: np.full((len(data.runs), len(epoch_axis)), np.nan) for c in columns}
    for row, run in enumerate(data.runs):
        curves = run.curves
        if curves is None or not len(curves.epochs):
            continue
        at = curves.epochs - first  # a repeated epoch (resumed run) keeps its last row
        for j, name in enumerate(curves.columns):
            out[name][row, at] = curves.values[:, j]
    return epoch_axis, out


def _param_array(values: list) -> np.ndarray:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present) and len(present) == len(values):
        return np.array(values, dtype=bool)
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present) \
            and len(present) == len(values):
        return np.array(values, dtype=np.int64)
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    text = ["" if v is None else v if isinstance(v, str) else json.dumps(v, sort_keys=True) for v in values]
    return np.array(text, dtype=object)


def curves_h5_bytes(data: SweepData, metric: str, mode: str) -> bytes:
    import h5py

    strings = h5py.string_dtype("utf-8")
    epoch_axis, columns = aligned_curves(data)
    runs = data.runs
    buf = io.BytesIO()
    with h5py.File(buf, "w", track_order=False) as f:
        f.attrs.update({"format": FORMAT, "sweep": data.name, "metric": metric, "mode": mode,
                        "columns": json.dumps(list(columns)), "param_keys": json.dumps(data.param_keys)})
        f.create_dataset("epoch", data=epoch_axis)
        f.create_dataset("index", data=np.array([r.index for r in runs], dtype=np.int64))
        f.create_dataset("run_id", data=np.array([r.run_id for r in runs], dtype=object), dtype=strings)
        f.create_dataset("state", data=np.array([r.status for r in runs], dtype=object), dtype=strings)
        f.create_dataset("epochs_run", data=np.array([r.epochs_run for r in runs], dtype=np.int64))
        f.create_dataset("best_value", data=np.array(
            [np.nan if r.best_value is None else r.best_value for r in runs], dtype=np.float64))
        f.create_dataset("best_epoch", data=np.array(
            [-1 if r.best_epoch is None else r.best_epoch for r in runs], dtype=np.int64))
        group = f.create_group("curves")
        for name, table in columns.items():
            group.create_dataset(name, data=table)
        params = f.create_group("params")
        for key in data.param_keys:
            arr = _param_array([r.params.get(key) for r in runs])
            ds = params.create_dataset(key, data=arr, dtype=strings if arr.dtype == object else arr.dtype)
            ds.attrs["key"] = key
    return buf.getvalue()


def write_curves_h5(path: str | Path, data: SweepData, metric: str, mode: str) -> None:
    atomic_write_bytes(path, curves_h5_bytes(data, metric, mode))
