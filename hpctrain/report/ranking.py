"""Each run's best value of the chosen metric, and the runs ordered by it."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..errors import ConfigError
from .runs import RunRecord, SweepData

def _test_value(run: RunRecord, metric: str) -> Optional[float]:
    test = run.state.test if run.state is not None and isinstance(run.state.test, dict) else {}
    value = test.get(metric, test.get(metric[len("test_"):]))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def best_of_run(run: RunRecord, metric: str, mode: str) -> tuple[Optional[float], Optional[int]]:
    """(best finite value, its epoch) of one run, or (None, None) when it has none yet.

    Per-epoch columns come from metrics.csv; ``test_*`` metrics from state.json (measured
    once on the best checkpoint, so their epoch is the run's best epoch)."""
    if metric.startswith("test_"):
        value = _test_value(run, metric)
        if value is None or not math.isfinite(value):
            return None, None
        epoch = run.state.best_epoch if isinstance(run.state.best_epoch, int) else None
        return value, epoch
    column = run.curves.get(metric) if run.curves is not None else None
    if column is None:
        return _from_state(run, metric)
    finite = np.isfinite(column)
    if not finite.any():
        return None, None
    masked = np.where(finite, column, np.inf if mode == "min" else -np.inf)
    i = int(np.argmin(masked) if mode == "min" else np.argmax(masked))  # first best epoch wins ties
    return float(column[i]), int(run.curves.epochs[i])


def _from_state(run: RunRecord, metric: str) -> tuple[Optional[float], Optional[int]]:
    """When metrics.csv is missing or unreadable, state.json still holds the monitored best."""
    s = run.state
    if s is None or s.monitor != metric or not isinstance(s.best_metric, (int, float)):
        return None, None
    value = float(s.best_metric)
    if not math.isfinite(value):
        return None, None
    return value, s.best_epoch if isinstance(s.best_epoch, int) else None


def known_metrics(data: SweepData) -> list[str]:
    """Every metric name some run has: metrics.csv columns and state.json test results."""
    names: list[str] = []
    for run in data.runs:
        if run.curves is not None:
            names.extend(c for c in run.curves.columns if c not in names and c not in ("step",))
        if run.state is not None:
            if run.state.monitor and run.state.best_metric is not None and run.state.monitor not in names:
                names.append(run.state.monitor)
            if isinstance(run.state.test, dict):
                for k in run.state.test:
                    name = k if k.startswith("test_") else f"test_{k}"
                    if name not in names:
                        names.append(name)
    return names


def score_runs(data: SweepData, metric: str, mode: str) -> list[RunRecord]:
    """Fill in every run's best value and epoch; return the ranked runs (best first).

    Runs without a finite value (pending, failed early, corrupt) are not ranked. Ties go to
    the lower grid index so the order is the same on every collect."""
    known = known_metrics(data)
    if known and metric not in known:
        raise ConfigError(f"--metric {metric}: no run of {data.root} records it; "
                          f"known metrics: {', '.join(sorted(known))}")
    for run in data.runs:
        run.best_value, run.best_epoch = best_of_run(run, metric, mode)
    ranked = [r for r in data.runs if r.best_value is not None]
    sign = 1.0 if mode == "min" else -1.0
    return sorted(ranked, key=lambda r: (sign * r.best_value, r.index))
