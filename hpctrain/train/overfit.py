"""The overfit check (``hpctrain run --overfit-batches N``): can this model and training loop fit
a handful of fixed batches? A run that cannot has a bug (labels, loss, learning rate or model
size) that a whole sweep would only hide.

The check trains on the first N batches of the train split's first epoch, the same N
batches every epoch and as its validation split, with ``val_loss`` monitored, no early
stopping and no test split, until it reaches its target or ``train.epochs`` run out. The
target: validation accuracy >= 0.99 for classification; for regression a validation loss
below 1% of the loss before training. The Trainer knows nothing of it: the check hands it
the batches and a config, ends the run through ``on_epoch_end`` when the target is
reached, and judges the finished run from its metric rows.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional

from ..config import Config
from .loop import EndRun, FitResult

ACCURACY_TARGET = 0.99
REGRESSION_LOSS_FRACTION = 0.01


class FixedBatches:
    """The same few batches every epoch, with the loader protocol the Trainer uses."""

    def __init__(self, batches: list, meta: Optional[dict] = None):
        self.batches, self.meta = batches, meta
        self.epoch, self.batches_done = 0, 0
        self._resume_at = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_done = epoch, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        start, self._resume_at = self._resume_at, 0
        for i in range(start, len(self.batches)):
            self.batches_done = i + 1
            yield self.batches[i]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self._resume_at = self.batches_done


def first_batches(loader: Any, n: int) -> FixedBatches:
    """The first ``n`` batches of ``loader``'s epoch 0, kept."""
    loader.set_epoch(0)
    batches = []
    it = iter(loader)
    try:
        for batch in it:
            batches.append(batch)
            if len(batches) == n:
                break
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # a prefetching loader stops its reader thread
    return FixedBatches(batches, getattr(loader, "meta", None))


class OverfitCheck:
    """One overfit check of ``n_batches`` batches for a run of task ``task`` on ``world_size``
    ranks: each rank keeps its part of the same global batches."""

    def __init__(self, n_batches: int, task: str, world_size: int = 1):
        if n_batches < 1:
            raise ValueError(f"--overfit-batches: {n_batches}; expected at least 1 batch")
        self.n_batches, self.task, self.world_size = n_batches, task, world_size
        self.start_loss = float("inf")
        self.train: Optional[FixedBatches] = None
        self.val: Optional[FixedBatches] = None

    def setup(self, cfg: Config, train_loader: Any) -> tuple[Config, FixedBatches, FixedBatches]:
        """(config, train batches, val batches) to hand the Trainer instead of the run's own."""
        checked = copy.deepcopy(cfg)
        checked.train.monitor, checked.train.mode = "val_loss", "auto"
        checked.train.early_stopping.patience = None
        checked.train.evaluate_test = False
        self.train = first_batches(train_loader, self.n_batches)
        self.val = FixedBatches(self.train.batches)
        return checked, self.train, self.val

    def start(self, evaluate: Callable[[Any, str], dict]) -> None:
        """Record the loss before training (``evaluate`` is the Trainer's; a collective)."""
        self.start_loss = evaluate(self.val, "val")["val_loss"]

    def reached(self, metrics: dict) -> bool:
        if self.task == "regression":
            return metrics["val_loss"] <= REGRESSION_LOSS_FRACTION * self.start_loss
        return metrics["val_accuracy"] >= ACCURACY_TARGET

    def on_epoch_end(self, epoch: int, metrics: dict) -> Optional[EndRun]:
        """The Trainer's hook: end the run, done, with the verdict once the target is reached."""
        return EndRun("done", self._message(True, metrics, epoch)) if self.reached(metrics) else None

    def judge(self, result: FitResult, rows: list) -> FitResult:
        """``result`` with the check's verdict (``overfit_passed`` and the message), from the
        last epoch's metrics (the same rows on every rank)."""
        if result.status != "done":
            return result
        last = rows[-1] if rows else {}
        result.overfit_passed = bool(last) and self.reached(last)
        result.message = self._message(result.overfit_passed, last, result.epoch)
        return result

    def _message(self, passed: bool, last: dict, epochs: int) -> str:
        rows = sum(len(b.x) for b in self.train.batches) * self.world_size  # every rank's part is as long
        what = (f"loss {last.get('val_loss', float('nan')):.4g} (from {self.start_loss:.4g})"
                + (f", accuracy {last['val_accuracy']:.3f}" if "val_accuracy" in last else ""))
        head = f"overfit check on {self.n_batches} fixed batches ({rows} rows) after {epochs} epochs: {what}"
        if passed:
            return f"{head}: passed, the model and training loop can fit the data"
        target = ("loss below 1% of its start" if self.task == "regression"
                  else f"accuracy >= {ACCURACY_TARGET}")
        return (f"{head}: FAILED to reach {target}; check labels, the loss, the learning rate "
                f"and the model size, or train more epochs")
