"""Optimizers, weight penalties, the max-norm constraint and learning-rate schedules.

Schedules are plain functions of the global step (and the epoch, for the piecewise
``step`` schedule), times a factor that the plateau rule lowers. The only state a
schedule carries is that plateau rule, so resuming needs nothing else to reproduce the
same learning rate at every step.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn

from ..config import OptimConfig, ScheduleConfig
from ..errors import ConfigError


# --------------------------------------------------------------------------- optimizers


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer of ``optim.name`` with ``optim.lr`` (the runner has already applied
    ``optim.lr_scaling`` to it)."""
    lr = cfg.lr
    params = list(params)
    wd = cfg.weight_decay
    if cfg.name == "sgd":
        if cfg.nesterov and cfg.momentum == 0:
            raise ConfigError("optim.nesterov: Nesterov momentum needs optim.momentum > 0, got 0")
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=wd)
    betas = tuple(cfg.betas)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=cfg.eps, weight_decay=wd)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=cfg.eps, weight_decay=wd)
    if cfg.name == "nadam":
        return torch.optim.NAdam(params, lr=lr, betas=betas, eps=cfg.eps, weight_decay=wd)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, eps=cfg.eps, weight_decay=wd)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=cfg.eps, weight_decay=wd)
    raise ConfigError(f"optim.name: {cfg.name!r} is not a known optimizer")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------- regularisation


def weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Weight matrices only: penalties and max-norm leave biases and norm parameters alone."""
    return [p for p in model.parameters() if p.dim() >= 2]


def weight_penalty(weights: list[torch.Tensor], l1: float, l2: float) -> Optional[torch.Tensor]:
    """l1 * sum|w| + l2 * sum w^2 over the weight matrices, or None when both are zero."""
    total = None
    for w in weights:
        term = 0.0
        if l1:
            term = term + l1 * w.abs().sum()
        if l2:
            term = term + l2 * w.square().sum()
        if l1 or l2:
            total = term if total is None else total + term
    return total


@torch.no_grad()
def apply_max_norm(weights: list[torch.Tensor], max_norm: float) -> None:
    """Rescale each unit's incoming weight vector (a row) whose L2 norm exceeds max_norm."""
    for w in weights:
        norms = w.norm(dim=1, keepdim=True)
        w.mul_(torch.clamp(max_norm / (norms + 1e-12), max=1.0))


# --------------------------------------------------------------------------- schedules


class Schedule:
    """Learning rate of each step: ``lr_at(step, epoch)``; ``epoch_end(value)`` feeds the plateau rule.

    ``total_steps`` (for cosine and one-cycle) is the planned number of optimizer steps.
    """

    def __init__(self, cfg: ScheduleConfig, lr: float, total_steps: int, mode: str = "min"):
        self.cfg = cfg
        self.base = lr
        self.total_steps = max(1, int(total_steps))
        self.mode = mode
        # plateau state
        self.scale = 1.0
        self.best: Optional[float] = None
        self.bad_epochs = 0

    def lr_at(self, step: int, epoch: int) -> float:
        c = self.cfg
        if c.name == "onecycle":
            return self._onecycle(step)
        if c.name == "cosine":
            return self._cosine(step)
        lr = self.base
        if c.name == "step":
            lr *= c.gamma ** sum(1 for m in c.milestones if m <= epoch)
        elif c.name == "power":
            lr /= (1.0 + step / c.decay_steps) ** c.power
        elif c.name == "exponential":
            lr *= c.decay_rate ** (step / c.decay_steps)
        elif c.name == "plateau":
            lr *= self.scale
        if c.name in ("power", "exponential", "plateau"):
            lr = max(lr, c.min_lr)
        if c.warmup_steps and step < c.warmup_steps:
            lr *= (step + 1) / c.warmup_steps
        return lr

    def _cosine(self, step: int) -> float:
        c = self.cfg
        if c.warmup_steps and step < c.warmup_steps:
            return self.base * (step + 1) / c.warmup_steps
        span = max(1, self.total_steps - c.warmup_steps)
        t = min(1.0, (step - c.warmup_steps) / span)
        return c.min_lr + (self.base - c.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def _onecycle(self, step: int) -> float:
        """Up from max/25 to max over the first 30% of the steps, then down to max/1e4 (cosine)."""
        c = self.cfg
        peak = c.max_lr if c.max_lr is not None else 10.0 * self.base
        start, final = peak / 25.0, max(c.min_lr, peak / 1e4)
        rise = max(1, round(0.3 * self.total_steps))
        if step < rise:
            t, lo, hi = step / rise, start, peak
        else:
            t, lo, hi = min(1.0, (step - rise) / max(1, self.total_steps - rise)), peak, final
        return hi + (lo - hi) * 0.5 * (1.0 + math.cos(math.pi * t))

    def epoch_end(self, value: Optional[float]) -> None:
        """Plateau rule: after ``patience`` epochs without relative improvement > threshold, lr *= factor."""
        if self.cfg.name != "plateau" or value is None or math.isnan(value):
            return
        if self.best is None or self._improved(value):
            self.best, self.bad_epochs = value, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.cfg.patience:
            self.scale *= self.cfg.factor
            self.bad_epochs = 0

    def _improved(self, value: float) -> bool:
        t = self.cfg.threshold
        if self.mode == "min":
            return value < self.best - abs(self.best) * t
        return value > self.best + abs(self.best) * t

    def state_dict(self) -> dict:
        return {"name": self.cfg.name, "scale": self.scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.best = None if state["best"] is None else float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])


def build_schedule(cfg: ScheduleConfig, lr: float, total_steps: int, mode: str = "min") -> Schedule:
    return Schedule(cfg, lr, total_steps, mode)
