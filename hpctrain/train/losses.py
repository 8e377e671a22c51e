"""Losses (by task, optionally weighted per sample) and epoch metrics summed across ranks.

Every loss is computed per sample first, then reduced to a mean: the plain mean, or with
sample weights w the weighted mean sum(w * l) / sum(w). The epoch loss reported in
metrics.csv is the same reduction over the whole epoch (and every rank), not an average of
batch means, so it does not depend on how rows are split into batches or ranks.

Metrics are unweighted:
  binary      accuracy (logit > 0), auc (exact ROC AUC, ties counted half)
  multiclass  accuracy (argmax)
  regression  rmse, mae (over every target element)

ROC AUC is exact: each rank's scores and labels are gathered to every rank through
``allreduce_sum`` (each rank writes its rows into its own slice of a zero vector), then
ranked once. That costs one float64 vector of the split's size, which is cheap next to
the data itself; an approximate histogram would make the metric depend on its bins.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..config import LossConfig
from ..errors import ConfigError, DataError

METRICS = {"binary": ("accuracy", "auc"), "multiclass": ("accuracy",), "regression": ("rmse", "mae")}
AUTO_LOSS = {"binary": "bce", "multiclass": "ce", "regression": "mse"}


def metric_names(task: str) -> tuple[str, ...]:
    return METRICS[task]


def check_monitor(monitor: str, task: str, has_val: bool, extra: tuple[str, ...] = ()) -> None:
    """``extra``: the names train.metrics adds (extra_metrics.metric_keys)."""
    split, _, name = monitor.partition("_")
    allowed = ("loss",) + METRICS[task] + tuple(extra)
    if name not in allowed:
        raise ConfigError(f"train.monitor: {monitor!r} is not a metric of task {task!r}; expected "
                          f"one of: {', '.join(f'{s}_{m}' for s in ('val', 'train') for m in allowed)}")
    if split == "val" and not has_val:
        raise ConfigError(f"train.monitor: {monitor!r} needs a validation split, and there is none; "
                          f"use train_{name} or add a val split")


# --------------------------------------------------------------------------- losses


class Loss:
    """A task loss: ``per_sample(out, y)`` and the batch reduction ``(mean, weight_sum)``."""

    def __init__(self, name: str, task: str, huber_delta: float = 1.0, weighted: bool = False):
        self.name, self.task = name, task
        self.huber_delta = huber_delta
        self.weighted = weighted

    def per_sample(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.name == "bce":
            return F.binary_cross_entropy_with_logits(out, y.to(out.dtype), reduction="none")
        if self.name == "ce":
            return F.cross_entropy(out, y, reduction="none")
        y = y.to(out.dtype).reshape(out.shape)
        if self.name == "mse":
            err = F.mse_loss(out, y, reduction="none")
        elif self.name == "mae":
            err = F.l1_loss(out, y, reduction="none")
        else:
            err = F.huber_loss(out, y, reduction="none", delta=self.huber_delta)
        return err.reshape(len(err), -1).mean(dim=1)

    def mean(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The unweighted mean of ``per_sample``, in torch's fused reduction: one op forward and
        one backward where the per-sample losses and their mean take two of each."""
        if self.name == "bce":
            return F.binary_cross_entropy_with_logits(out, y.to(out.dtype))
        if self.name == "ce":
            return F.cross_entropy(out, y)
        y = y.to(out.dtype).reshape(out.shape)
        if self.name == "mse":
            return F.mse_loss(out, y)
        if self.name == "mae":
            return F.l1_loss(out, y)
        return F.huber_loss(out, y, delta=self.huber_delta)

    def __call__(self, out: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, torch.Tensor | int]:
        """(mean loss of the batch, its denominator: row count or sum of weights)."""
        if not self.weighted:
            return self.mean(out, y), len(out)
        losses = self.per_sample(out, y)
        if w is None:
            raise DataError("loss.weighted is true but the data has no sample weights w; "
                            "convert the dataset with a weight column or set loss.weighted: false")
        w = w.to(losses.dtype)
        den = w.sum()
        return (losses * w).sum() / den, den


def build_loss(cfg: LossConfig, task: str) -> Loss:
    name = AUTO_LOSS[task] if cfg.name == "auto" else cfg.name
    return Loss(name, task, cfg.huber_delta, cfg.weighted)


# --------------------------------------------------------------------------- metrics


def gather_vector(backend, vec: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D float64 vector of every rank, in rank order, on every rank."""
    if backend.size == 1:
        return vec
    sizes = torch.zeros(backend.size, dtype=torch.float64)
    sizes[backend.rank] = len(vec)
    sizes = backend.allreduce_sum(sizes).to(torch.int64).tolist()
    offset = sum(sizes[:backend.rank])
    full = torch.zeros(sum(sizes), dtype=torch.float64)
    full[offset:offset + len(vec)] = vec.to(torch.float64).cpu()
    return backend.allreduce_sum(full)


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC (Mann-Whitney U with average ranks for ties); NaN with one class only."""
    labels = labels.to(torch.bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _positive_rank_sum_host if scores.device.type == "cpu" else _positive_rank_sum
    return (ranks(scores, labels) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _positive_rank_sum(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """The positives' 1-based ranks among the scores summed, ties at their average rank; torch
    ops on the scores' device."""
    _, inverse, counts = torch.unique(scores.to(torch.float64), return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    avg_rank = ends - (counts.to(torch.float64) - 1) / 2
    return avg_rank[inverse][positive].sum().item()


def _positive_rank_sum_host(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """The same sum for scores on the CPU, with numpy: for a small epoch each torch op costs
    more in dispatch than numpy's whole sort. A positive's average rank is the number of
    scores below it plus half of those equal to it plus one half, so the sum is
    (sum of #below + sum of #at-or-below + #positives) / 2: integers, exact. Searching the
    positives in sorted order lets numpy resume each search where the last one ended."""
    s = scores.detach().to(torch.float64).numpy()
    ordered, pos = np.sort(s), np.sort(s[positive.numpy()])
    below = int(np.searchsorted(ordered, pos, "left").sum())
    at_or_below = int(np.searchsorted(ordered, pos, "right").sum())
    return (below + at_or_below + len(pos)) / 2


class MetricSums:
    """What one rank saw in one epoch, kept so that a step costs no arithmetic and no sync.

    A step appends references: the batch's mean loss and its denominator, and the outputs
    (binary: logits, multiclass: predicted classes, regression: predictions) with their
    labels. Everything is reduced once, at the end of the epoch, over the concatenated
    tensors: the result depends only on the values, not on how the epoch was cut by
    checkpoints, which is what exact resume needs.
    """

    def __init__(self, task: str, device: torch.device | str = "cpu", extra: Any = None):
        self.task = task
        self.device = torch.device(device)
        self.extra = extra  # extra_metrics.ExtraMetrics of train.metrics, or None
        self.losses: list[torch.Tensor] = []
        self.dens: list = []
        self.outs: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, out: torch.Tensor, y: torch.Tensor, loss: torch.Tensor, den) -> None:
        self.losses.append(loss.detach())
        self.dens.append(den.detach() if isinstance(den, torch.Tensor) else den)
        out = out.detach()
        self.outs.append(out.argmax(dim=1) if self.task == "multiclass" else out)
        self.labels.append(y)

    # -- resume ------------------------------------------------------------------

    def _cat(self, device: torch.device | str = "cpu") -> dict:
        """The epoch so far as four tensors on ``device`` (float64 loss parts)."""
        if not self.losses:
            return {"losses": torch.zeros(0, dtype=torch.float64, device=device),
                    "dens": torch.zeros(0, dtype=torch.float64, device=device),
                    "outs": torch.zeros(0, device=device), "labels": torch.zeros(0, dtype=torch.int64, device=device)}
        losses = torch.stack(self.losses)  # batch means; a restored epoch's were unbound into them
        if all(not isinstance(d, torch.Tensor) for d in self.dens):  # row counts: one tensor, one copy
            dens = torch.tensor([float(d) for d in self.dens], dtype=torch.float64, device=device)
        else:
            dens = torch.cat([torch.as_tensor(d, dtype=torch.float64, device=device).reshape(-1) for d in self.dens])
        return {"losses": losses.to(device, torch.float64), "dens": dens,
                "outs": torch.cat(self.outs).to(device), "labels": torch.cat(self.labels).to(device)}

    def state_dict(self) -> dict:
        return self._cat()

    def load_state_dict(self, state: dict) -> None:
        """Start from a saved partial epoch: its batch losses are entries again, its other
        tensors one entry each."""
        self.losses = list(state["losses"].to(self.device).unbind())
        self.dens = [state["dens"]] if len(state["dens"]) else []
        self.outs = [state["outs"].to(self.device)] if len(state["outs"]) else []
        self.labels = [state["labels"].to(self.device)] if len(state["labels"]) else []

    # -- results -----------------------------------------------------------------

    def compute(self, backend, prefix: str) -> dict[str, float]:
        """Metrics of the epoch over every rank (a collective: every rank must call it)."""
        # Reduced where the outputs are: on a GPU, sorting an epoch's scores for the AUC takes
        # well under a millisecond, on the CPU tens of milliseconds an epoch. Only the sums
        # (and, across ranks, the scores) come back to the CPU.
        c = self._cat(self.outs[0].device if self.outs else "cpu")
        outs, labels = c["outs"], c["labels"]
        reduced = [torch.dot(c["losses"], c["dens"]), c["dens"].sum()]
        elems = 0
        if self.task == "binary":
            reduced.append((outs > 0).eq(labels).sum())
        elif self.task == "multiclass":
            reduced.append(outs.eq(labels).sum())
        elif len(outs):
            err = outs.double() - labels.double().reshape(outs.shape)
            reduced += [err.square().sum(), err.abs().sum()]
            elems = err.numel()
        else:
            reduced += [c["dens"].new_zeros(()), c["dens"].new_zeros(())]
        # one copy back, in the order loss_num, loss_den, [correct | sq, ab], rows, elems
        sums = torch.stack(reduced).to(torch.float64).tolist() + [float(len(labels)), float(elems)]
        if backend.size > 1:
            sums = backend.allreduce_sum(torch.tensor(sums, dtype=torch.float64)).tolist()
        loss_num, loss_den, rows, elems = sums[0], sums[1], sums[-2], sums[-1]
        correct = sums[2] if self.task != "regression" else 0.0
        sq, ab = (sums[2], sums[3]) if self.task == "regression" else (0.0, 0.0)
        out = {f"{prefix}_loss": loss_num / loss_den if loss_den else float("nan")}
        if self.task in ("binary", "multiclass"):
            out[f"{prefix}_accuracy"] = correct / rows if rows else float("nan")
        if self.task == "binary":
            out[f"{prefix}_auc"] = roc_auc(gather_vector(backend, outs.double()),
                                           gather_vector(backend, labels.double()))
        if self.task == "regression":
            out[f"{prefix}_rmse"] = math.sqrt(sq / elems) if elems else float("nan")
            out[f"{prefix}_mae"] = ab / elems if elems else float("nan")
        if self.extra is not None:
            out.update(self.extra.compute(backend, outs.cpu(), labels.cpu(), prefix))
        return out
