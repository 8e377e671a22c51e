"""Asynchronous successive halving (ASHA, Li et al. 2018) across a sweep's elements.

``prune: {kind: asha, min_epochs: r, reduction: eta, max_epochs: R}``. Rungs are at epochs
r, r*eta, r*eta^2, ... below R (R: prune.max_epochs, at most train.epochs). When a run
ends a rung epoch, rank 0 records its metric (prune.metric, default train.monitor) and
decides once. The run goes on when no run recorded at that rung is better than the
(1 - 1/eta) quantile of the values recorded there before it. This is the stopping rule of
asynchronous successive halving as Ray Tune's ASHA scheduler applies it: the first arrivals
go on, later ones need to be in the top 1/eta so far. Otherwise the run ends ``pruned``
(exit 0, its checkpoints kept).

Coordination goes through the shared filesystem only. Each record is its own file,
``SWEEP/rungs/<epoch>/<run_id>.json``, written atomically with its decision, so writers
never contend and no lock or database is needed (SQLite on NFS gives "database is
locked"). A requeued, resumed or resubmitted run that reaches a rung it has a record for
takes the recorded decision again: its outcome does not depend on when it was restarted.

Why not Optuna's pruner over its JournalFileBackend: the journal is one file that every
process appends to under a lock (lock files on NFS, or a lock-free open on NFS v4+), and a
pruner decision there needs a study and a trial id per element, created before training.
The rule itself is a few lines; the sweep's own run ids and folders already are the trial
store.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .config import Config
from .fsutil import atomic_write_json, read_json
from .monitor import better_mode

RUNGS_DIR = "rungs"


def rung_epochs(min_epochs: int, reduction: int, max_epochs: int) -> list[int]:
    """r, r*eta, r*eta^2, ... below ``max_epochs`` (a run that reaches it is done anyway)."""
    rungs, epoch = [], min_epochs
    while epoch < max_epochs:
        rungs.append(epoch)
        epoch *= reduction
    return rungs


@dataclass(frozen=True)
class Decision:
    epoch: int
    value: float
    go_on: bool
    cutoff: Optional[float]
    before: int  # records at this rung before this one

    def message(self, metric: str) -> str:
        if self.go_on:
            return f"rung epoch {self.epoch}: {metric} {self.value:.6g} goes on"
        return (f"pruned at rung epoch {self.epoch}: {metric} {self.value:.6g} is not in the top 1/eta of "
                f"{self.before} run(s) recorded there (cutoff {self.cutoff:.6g})")


class RungBook:
    """One run's view of the sweep's rung records."""

    def __init__(self, sweep_root: str | Path, run_id: str, cfg: Config):
        p = cfg.prune
        self.root = Path(sweep_root) / RUNGS_DIR
        self.run_id = run_id
        self.metric = p.metric or cfg.train.monitor
        self.mode = better_mode(self.metric, p.mode if p.metric else cfg.train.mode)
        self.eta = p.reduction
        last = min(p.max_epochs or cfg.train.epochs, cfg.train.epochs)
        self.rungs = set(rung_epochs(p.min_epochs, p.reduction, last))

    def at_epoch_end(self, epoch: int, metrics: dict) -> Optional[Decision]:
        """The decision at a rung epoch (recorded, or the one recorded before); None elsewhere."""
        if epoch not in self.rungs:
            return None
        folder = self.root / str(epoch)
        own = folder / f"{self.run_id}.json"
        if own.exists():
            r = read_json(own)
            return Decision(epoch, r["value"], r["go_on"], r["cutoff"], r["before"])
        value = float(metrics.get(self.metric, math.nan))
        others = self._recorded(folder)
        cutoff = self._cutoff(others)
        go_on = cutoff is None or (math.isfinite(value) and self._at_least(value, cutoff))
        decision = Decision(epoch, value, go_on, cutoff, len(others))
        atomic_write_json(own, {"run_id": self.run_id, "epoch": epoch, "metric": self.metric, "value": value,
                                "go_on": go_on, "cutoff": cutoff, "before": len(others)})
        return decision

    def _recorded(self, folder: Path) -> list[float]:
        values = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                value = float(read_json(path)["value"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a record being replaced: its writer decides without it
            if math.isfinite(value):
                values.append(value)
        return values

    def _cutoff(self, values: list[float]) -> Optional[float]:
        if not values:
            return None
        quantile = (1 - 1 / self.eta) * 100 if self.mode == "max" else 100 / self.eta
        return float(np.percentile(values, quantile))

    def _at_least(self, value: float, cutoff: float) -> bool:
        return value >= cutoff if self.mode == "max" else value <= cutoff


def promote(sweep_root: str | Path, run_id: str) -> int:
    """Turn the run's recorded "pruned" decisions into "go on" (``submit --rerun pruned``): it
    resumes from its checkpoint past the rung that stopped it; later rungs judge it as any run.
    Returns the number of records changed."""
    changed = 0
    for path in sorted((Path(sweep_root) / RUNGS_DIR).glob(f"*/{run_id}.json")):
        record = read_json(path)
        if not record.get("go_on"):
            record.update(go_on=True, promoted=True)
            atomic_write_json(path, record)
            changed += 1
    return changed
