"""Metrics a run asks for beyond its task's own (``train.metrics``).

    train:
      metrics: [f1_macro, confusion, "mypackage.metrics:balanced_accuracy"]

- ``f1_macro`` (binary, multiclass): the unweighted mean over classes of 2TP / (2TP + FP + FN),
  from the epoch's confusion matrix summed over every rank (a class never predicted nor
  present counts 0, as scikit-learn's zero_division=0);
- ``confusion`` (binary, multiclass): the confusion matrix (rows: true class, columns:
  predicted) of the validation split at the best epoch, written to confusion.json;
- ``"module:function"``: ``function(y_true, y_pred)`` on numpy arrays of the whole split (every
  rank's rows, gathered), returning a float. ``y_pred`` holds the predicted classes
  (multiclass), the logits (binary) or the predictions (regression). Its column is
  ``<split>_<function>``; monitor it with train.monitor / train.mode.

The confusion matrix is the one reduction that makes f1 exact across ranks: counts add up.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

from ..errors import ConfigError

BUILT_IN = {"f1_macro": ("binary", "multiclass"), "confusion": ("binary", "multiclass")}


def check_metrics(names: list[str], task: str) -> None:
    for name in names:
        if ":" in name:
            _target(name)
            continue
        tasks = BUILT_IN.get(name)
        if tasks is None:
            raise ConfigError(f"train.metrics: {name!r} is not a metric; expected one of "
                              f"{', '.join(BUILT_IN)} or \"package.module:function\"")
        if task not in tasks:
            raise ConfigError(f"train.metrics: {name!r} needs class labels; it does not apply to task {task!r}")


def _target(name: str) -> Callable:
    from ..user_model import load_target

    try:
        return load_target(name)
    except ConfigError as e:
        raise ConfigError(str(e).replace("model.target", "train.metrics", 1)) from None


def metric_keys(names: list[str]) -> tuple[str, ...]:
    """The metrics.csv names (without split prefix) the extra metrics add; confusion adds none,
    it is a file."""
    return tuple(n.partition(":")[2] or n for n in names if n != "confusion")


class ExtraMetrics:
    """Computes the extra metrics of one split's epoch from what MetricSums holds."""

    def __init__(self, names: list[str], task: str, n_classes: int):
        self.names, self.task = list(names), task
        self.n_classes = 2 if task == "binary" else n_classes
        self.targets = {n: _target(n) for n in names if ":" in n}
        self.confusion: Optional[np.ndarray] = None  # of the last compute

    @property
    def wants_confusion(self) -> bool:
        return "f1_macro" in self.names or "confusion" in self.names

    def compute(self, backend, outs: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict[str, float]:
        """A collective: every rank calls it with its own rows."""
        out: dict[str, float] = {}
        if self.wants_confusion:
            self.confusion = self._confusion(backend, outs, labels)
            if "f1_macro" in self.names:
                out[f"{prefix}_f1_macro"] = f1_macro(self.confusion)
        if self.targets:
            from .losses import gather_vector

            y_pred = gather_vector(backend, outs.double().reshape(-1)).numpy()
            y_true = gather_vector(backend, labels.double().reshape(-1)).numpy()
            if self.task == "multiclass":
                y_pred, y_true = y_pred.astype(np.int64), y_true.astype(np.int64)
            for name, fn in self.targets.items():
                out[f"{prefix}_{name.partition(':')[2]}"] = float(fn(y_true, y_pred))
        return out

    def _confusion(self, backend, outs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        c = self.n_classes
        pred = (outs > 0).long() if self.task == "binary" else outs.long()
        index = labels.long().reshape(-1).cpu() * c + pred.reshape(-1).cpu()
        counts = torch.bincount(index, minlength=c * c).to(torch.float64)
        if backend.size > 1:
            counts = backend.allreduce_sum(counts)
        return counts.reshape(c, c).round().to(torch.int64).numpy()


def f1_macro(confusion: np.ndarray) -> float:
    tp = np.diag(confusion).astype(np.float64)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    denominator = 2 * tp + fp + fn
    per_class = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return float(per_class.mean())


def describe_confusion(confusion: np.ndarray, class_names: Any = None) -> dict:
    names = list(class_names or []) or [str(i) for i in range(len(confusion))]
    return {"classes": names, "rows_are": "true class", "columns_are": "predicted class",
            "matrix": confusion.tolist()}
