"""Learning-rate range test (Smith 2015; the "LR finder" of fastai).

Train a copy of the model for a short run while the learning rate grows exponentially
from ``start_lr`` to ``end_lr``; record the loss of every step and an exponentially
smoothed (bias-corrected) version of it; stop when the smoothed loss exceeds
``blowup`` x its minimum, or is not finite. Two learning rates are suggested:

- steepest descent: the LR where the smoothed loss falls fastest against log LR, before
  its minimum. Each step there still buys the most progress, and it does not depend on
  how sharply the loss rises past the minimum, so it suits Adam-like optimizers, whose
  loss stays flat a long way before it blows up.
- a tenth of divergence: a tenth of the LR where the loss blew up (or, when it never did,
  a tenth of the LR of the lowest smoothed loss), the classic rule for SGD.

Each step is the trainer's own (``train.step.TrainStep``): gradient clipping, L1/L2
penalties, max-norm, precision and gradient accumulation act here as they will in the
run, so the LR found is the one that run can take. Fed through ``BatchShares``, R ranks
with batch B see exactly the rows one process sees with batch R*B, and the test's result
does not depend on the world size.
"""
from __future__ import annotations

import copy
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import Config
from .losses import build_loss
from .optim import build_optimizer, set_lr
from .step import StepResult, TrainStep, to_device


@dataclass
class LRFindResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    blowup_lr: Optional[float] = None     # LR of the step that ended the test, None if it never blew up
    min_loss_lr: Optional[float] = None   # LR of the lowest smoothed loss
    steepest_lr: Optional[float] = None   # LR of the steepest descent of the smoothed loss
    tenth_lr: Optional[float] = None      # a tenth of blowup_lr (or of min_loss_lr)

    @property
    def suggestion(self) -> Optional[float]:
        """The tenth-of-divergence suggestion, the single figure earlier versions gave."""
        return self.tenth_lr

    def table(self, rows: int = 20) -> str:
        """Every k-th step as a text table (the last step always included)."""
        n = len(self.lrs)
        if not n:
            return "no steps were taken"
        stride = max(1, math.ceil(n / rows))
        picks = sorted(set(range(0, n, stride)) | {n - 1})
        lines = [f"{'step':>5}  {'lr':>10}  {'loss':>10}  {'smoothed':>10}"]
        for i in picks:
            lines.append(f"{i:>5}  {self.lrs[i]:>10.3e}  {self.losses[i]:>10.4g}  {self.smoothed[i]:>10.4g}")
        return "\n".join(lines)

    def summary(self) -> str:
        if self.tenth_lr is None:
            return "no suggestion: the test took too few steps"
        steep = (f"suggested learning rate (steepest descent): {self.steepest_lr:.3g} "
                 f"(the smoothed loss falls fastest there; the first choice, above all for Adam-like optimizers)"
                 if self.steepest_lr is not None
                 else "suggested learning rate (steepest descent): none (the smoothed loss never fell)")
        basis = (f"a tenth of {self.blowup_lr:.3g}, where the loss blew up" if self.blowup_lr is not None
                 else f"a tenth of {self.min_loss_lr:.3g}, the LR of the lowest loss (the loss never blew up; "
                      f"try a larger --end-lr)")
        tenth = (f"suggested learning rate (tenth of divergence): {self.tenth_lr:.3g} "
                 f"({basis}; the classic rule for SGD)")
        return f"{steep}\n{tenth}"

    def to_dict(self) -> dict:
        return {"steepest_lr": self.steepest_lr, "tenth_lr": self.tenth_lr, "blowup_lr": self.blowup_lr,
                "min_loss_lr": self.min_loss_lr, "steps": len(self.lrs)}

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def write_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["step", "lr", "loss", "smoothed"])
            for i, row in enumerate(zip(self.lrs, self.losses, self.smoothed)):
                w.writerow([i, *(repr(float(v)) for v in row)])

    def plot(self, path: str | Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        try:
            ax.plot(self.lrs, self.losses, color="0.75", lw=1, label="loss")
            ax.plot(self.lrs, self.smoothed, color="C0", lw=2, label="smoothed loss")
            marks = ((self.steepest_lr, "C1", "--", "steepest descent"),
                     (self.tenth_lr, "C2", "--", "tenth of divergence"),
                     (self.blowup_lr, "C3", ":", "blow-up"))
            for lr, colour, style, name in marks:
                if lr is not None:
                    ax.axvline(lr, color=colour, ls=style, gid=name, label=f"{name} {lr:.2g}")
            finite = [v for v in self.smoothed if math.isfinite(v)]
            if finite:
                ax.set_ylim(min(finite) - 0.05 * abs(min(finite)), min(max(finite), 4.5 * min(finite) + 1e-12))
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel("training loss")
            ax.set_title("learning-rate range test")
            ax.legend(loc="best", fontsize=8)
            fig.tight_layout()
            fig.savefig(path)
        finally:
            plt.close(fig)


def steepest_descent_lr(lrs: list[float], smoothed: list[float]) -> Optional[float]:
    """The LR where the smoothed loss falls fastest against log LR, looking only up to its
    minimum (past it the loss rises, and the blow-up step can be steep in either sign).
    None when fewer than 3 finite points precede the minimum or the loss never falls."""
    x, y = np.log(np.asarray(lrs, dtype=float)), np.asarray(smoothed, dtype=float)
    finite = np.isfinite(y)
    if finite.sum() < 3:
        return None
    x, y = x[finite], y[finite]
    end = int(np.argmin(y)) + 1
    if end < 3:
        return None
    slope = np.gradient(y[:end], x[:end])
    i = int(np.argmin(slope))
    return float(np.exp(x[i])) if slope[i] < 0 else None


def tenth_of_divergence_lr(blowup_lr: Optional[float], min_loss_lr: Optional[float]) -> Optional[float]:
    """A tenth of the LR where the loss blew up, or of the lowest loss's LR when it never did."""
    base = blowup_lr if blowup_lr is not None else min_loss_lr
    return None if base is None else base / 10


class BatchShares:
    """Rank ``rank``'s share of every batch of ``loader``, a single-process loader whose batch
    is the global batch (R x B): rows [rank*B, (rank+1)*B) of each.

    The ranks' shares of a batch make up exactly the batch one process with R x B reads, in
    the same order, whatever R. Every rank reads the whole batch, R times the rows it
    uses; for a test of a hundred steps that costs little. An epoch's short last batch is
    skipped: it cannot be shared equally.
    """

    def __init__(self, loader, rank: int, size: int):
        if loader.batch_size % size:
            raise ValueError(f"batch size {loader.batch_size} is not a multiple of the world size {size}")
        self.loader, self.rank, self.size = loader, rank, size
        self.share = loader.batch_size // size

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        lo, hi = self.rank * self.share, (self.rank + 1) * self.share
        it = iter(self.loader)
        try:
            for batch in it:
                if len(batch.x) == self.loader.batch_size:
                    yield type(batch)(*(None if t is None else t[lo:hi] for t in batch))
        finally:
            _close(it)


def _batches(loader):
    """Batches of the loader, epoch after epoch, for as long as they are wanted."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        empty = True
        it = iter(loader)
        try:
            for batch in it:
                empty = False
                yield batch
        finally:
            _close(it)
        if empty:
            raise ValueError("the loader yields no batches")
        epoch += 1


def lr_range_test(cfg: Config, model: torch.nn.Module, loader, backend, *, start_lr: float = 1e-7,
                  end_lr: float = 10.0, steps: int = 100, smoothing: float = 0.9,
                  blowup: float = 4.0) -> LRFindResult:
    """Run the range test on a copy of ``model`` (the model itself is not changed).

    ``cfg`` is the grid point's config: its optimizer, loss, ``optim`` regularisation,
    ``train.precision`` and (through ``backend``) ``dist.backward_passes_per_step`` apply.
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"expected 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}")
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    device = torch.device(backend.device)
    trial = copy.deepcopy(model).to(device)
    optim_cfg = copy.deepcopy(cfg.optim)
    optim_cfg.lr = start_lr
    net, optimizer = backend.wrap(trial, build_optimizer(optim_cfg, trial.parameters()))
    backend.broadcast_state(net, optimizer)
    step = TrainStep(cfg, net, trial, optimizer, build_loss(cfg.loss, cfg.data.task), backend, device)
    net.train()
    result = LRFindResult()
    avg, best = 0.0, math.inf
    ratio = end_lr / start_lr
    batches = _batches(loader)
    try:
        for i in range(steps):
            lr = start_lr * ratio ** (i / (steps - 1))
            set_lr(optimizer, lr)
            value = _global_loss(step(*to_device(next(batches), device)), backend)
            avg = smoothing * avg + (1 - smoothing) * value
            smooth = avg / (1 - smoothing ** (i + 1))
            result.lrs.append(lr)
            result.losses.append(value)
            result.smoothed.append(smooth)
            if not math.isfinite(smooth) or (i > 0 and smooth > blowup * best):
                result.blowup_lr = lr
                break
            if smooth < best:
                best, result.min_loss_lr = smooth, lr
    finally:
        batches.close()
    result.tenth_lr = tenth_of_divergence_lr(result.blowup_lr, result.min_loss_lr)
    # The blow-up step is left out: its loss says the LR is too high, not how fast it falls.
    kept = len(result.lrs) - (result.blowup_lr is not None)
    result.steepest_lr = steepest_descent_lr(result.lrs[:kept], result.smoothed[:kept])
    return result


def _global_loss(out: StepResult, backend) -> float:
    """The step's loss over every rank's rows: sum(loss x den) / sum(den), the figure one
    process with the whole global batch reports. Every rank gets the same value, so all
    take the same decision to stop."""
    loss, den = float(out.loss.detach()), float(out.den)
    pair = torch.tensor([loss * den, den], dtype=torch.float64)
    if backend.size > 1:
        pair = backend.allreduce_sum(pair)
    return float(pair[0] / pair[1])


def _close(iterator) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()   # a prefetching loader stops its reader thread
