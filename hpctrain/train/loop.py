"""Trainer: the training loop every rank runs.

Read top to bottom: ``fit`` resumes (or seeds), then runs epochs; an epoch is a loop of
``_train_step`` followed by ``_step_boundary`` (stop flag, divergence, step/time
checkpoints, max_steps, agreed across ranks), and ends in ``_end_epoch`` (metrics,
validation, schedule, best/early stopping, metrics.csv, checkpoints, one log line).
Its parts live beside it: ``checkpoint.CheckpointManager`` (when a checkpoint is due,
saving, loading, RNG states), ``run_log`` (metrics.csv and timing.csv rows, the log line,
the progress bar), ``step.TrainStep`` (one optimizer step). The trainer owns the state a
checkpoint holds (``_payload`` and ``_restore``).

Exact resume: a checkpoint holds everything a step depends on (weights, optimizer,
schedule, early stopping, the loader position, every rank's RNG states and its partial
epoch sums) and the metrics rows so far, so a run stopped at any step boundary and
resumed writes the same metrics.csv and ends with the same weights as one that never
stopped (bit for bit on CPU with the same world size and thread count). On another world
size that keeps the loader's global order (see hpctrain/data/loader.py) it continues with
the same global batches, equal up to floating-point summation order.

Speed: a step reads nothing back from the device except, on CPU, one finiteness check of
the loss; a step's metric inputs are kept as references and reduced once per epoch.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch

from ..config import Config, base_dict
from ..errors import DataError
from ..fsutil import atomic_write_text
from ..monitor import better_mode
from .checkpoint import CheckpointManager, gather_objects, restore_rng, rng_state, seed_all
from .extra_metrics import ExtraMetrics, check_metrics, describe_confusion, metric_keys
from .losses import MetricSums, build_loss, check_monitor, metric_names
from .optim import build_optimizer, build_schedule, set_lr
from .run_log import MetricRows, ProgressBar, RunLog, epoch_line, parse_metrics_csv, timing_line
from .step import TrainStep, to_device

# Steps between divergence checks: on CPU a check is a cheap read; on a GPU it would
# stall the stream, so it happens every few dozen steps (and before any checkpoint).
CHECK_EVERY = {"cpu": 1}
CHECK_EVERY_DEVICE = 50


class Event(Enum):
    """What ends an epoch early, decided the same way on every rank at a step boundary."""
    STOP = "stop"              # a stop request (signal): save last.pt and end preempted
    DIVERGED = "diverged"      # a non-finite loss: end without a checkpoint
    MAX_STEPS = "max_steps"    # train.max_steps reached: end the epoch as usual, then the run


class EndRun(NamedTuple):
    """``on_epoch_end``'s answer that ends the run after the epoch just ended."""
    status: str   # "pruned" (successive halving, prune.py) or "done" (a target reached, overfit.py)
    message: str


@dataclass
class FitResult:
    status: str                       # done | diverged | preempted | pruned
    epoch: int                        # epochs completed
    step: int                         # optimizer steps taken
    best_metric: Optional[float]
    best_epoch: Optional[int]
    message: str = ""
    test_metrics: dict = field(default_factory=dict)
    samples_per_s: Optional[float] = None
    wall_time_s: float = 0.0
    resumed_from: Optional[str] = None  # checkpoint file name the run resumed from
    overfit_passed: Optional[bool] = None  # the overfit check's verdict (overfit.py), None otherwise


@dataclass
class Progress:
    """What the trainer reports after each transition and epoch (rank 0 only).

    The trainer knows nothing of state files: whoever owns the run's state (the runner's
    recorder) receives these through ``on_progress``.
    """
    status: str                       # running | done | diverged | preempted | pruned
    message: str
    epoch: int
    total_epochs: int
    step: int
    best_metric: Optional[float]
    best_epoch: Optional[int]
    monitor: str
    world_size: int
    backend: str
    wall_time_s: float
    samples_per_s: Optional[float] = None
    test: dict = field(default_factory=dict)


class EarlyStopping:
    """Stop after ``patience`` epochs without an improvement larger than ``min_delta``."""

    def __init__(self, patience: Optional[int], min_delta: float, mode: str):
        self.patience, self.min_delta, self.mode = patience, min_delta, mode
        self.best: Optional[float] = None
        self.wait = 0
        self.stopped = False

    def update(self, value: float) -> bool:
        """Record an epoch's value; True when training should stop."""
        if self.patience is None or math.isnan(value):
            return False
        better = (self.best is None or
                  (value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta))
        if better:
            self.best, self.wait = value, 0
        else:
            self.wait += 1
            self.stopped = self.wait >= self.patience
        return self.stopped

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait, "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait, self.stopped = state["best"], int(state["wait"]), bool(state["stopped"])


class Trainer:
    def __init__(self, cfg: Config, model: torch.nn.Module, train_loader, val_loader, backend,
                 run_dir: str | Path | None = None, test_loader=None, stop_flag=None,
                 log: Callable[[str], None] = print, model_meta: Optional[dict] = None,
                 on_progress: Optional[Callable[[Progress], None]] = None,
                 on_epoch_end: Optional[Callable[[int, dict], Optional[EndRun]]] = None):
        """``on_progress`` (rank 0) receives the reports; ``on_epoch_end(epoch, metrics)`` (rank 0)
        may end the run after an epoch by returning an EndRun: the run ends with its status
        (``pruned`` by successive halving's rung decision, prune.py; ``done`` by the overfit
        check's target, overfit.py), with its checkpoints saved."""
        self.cfg, self.backend, self.log = cfg, backend, log
        self.on_progress = on_progress
        self.on_epoch_end = on_epoch_end
        self.task = cfg.data.task
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.stop_flag = stop_flag
        self.model_meta = dict(model_meta or {})
        # Parts of every checkpoint that never change during a run: made once, not per save.
        self._fixed_payload = {"config": base_dict(cfg), "model_meta": _plain(self.model_meta)}
        self.device = torch.device(backend.device)
        self.raw_model = model.to(self.device)
        # optim.lr_scaling is applied by the runner (the cfg it hands over has the scaled lr).
        optimizer = build_optimizer(cfg.optim, self.raw_model.parameters())
        self.model, self.optimizer = backend.wrap(self.raw_model, optimizer)
        self.loss_fn = build_loss(cfg.loss, self.task)
        check_metrics(cfg.train.metrics, self.task)
        self.extra = (ExtraMetrics(cfg.train.metrics, self.task, int(self.model_meta.get("n_classes") or 2))
                      if cfg.train.metrics else None)
        self.metric_keys = metric_names(self.task) + metric_keys(cfg.train.metrics)

        if len(train_loader) == 0:
            raise DataError(f"the train split gives rank {backend.rank} no batches; use fewer ranks, a "
                            f"smaller data.batch_size or more rows")
        self.train_loader, self.val_loader, self.test_loader = train_loader, val_loader, test_loader

        tc = cfg.train
        self.monitor = tc.monitor
        check_monitor(self.monitor, self.task, has_val=val_loader is not None, extra=metric_keys(tc.metrics))
        self.mode = better_mode(self.monitor, tc.mode)
        self.early = EarlyStopping(tc.early_stopping.patience, tc.early_stopping.min_delta, self.mode)
        planned = tc.epochs * len(train_loader)
        self.schedule = build_schedule(cfg.schedule, cfg.optim.lr,
                                       min(planned, tc.max_steps or planned), self.mode)
        self.check_every = CHECK_EVERY.get(self.device.type, CHECK_EVERY_DEVICE)
        self.step_fn = TrainStep(cfg, self.model, self.raw_model, self.optimizer, self.loss_fn, backend, self.device)
        self.autocast, self.scaler = self.step_fn.autocast, self.step_fn.scaler  # evaluation and checkpoints use them

        # Position and history; all of it goes into a checkpoint.
        self.epoch = 0            # epochs completed
        self.step = 0             # optimizer steps taken
        self.batch_in_epoch = 0   # steps taken in the current, unfinished epoch
        self.best_metric: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.rows = MetricRows()
        self.elapsed_before = 0.0  # wall time of earlier attempts of this run
        self.train_sums = MetricSums(self.task, self.device, self.extra)
        self._best_state: Optional[dict] = None
        self._pending_losses: list[torch.Tensor] = []
        self._lr: Optional[float] = None
        self._samples = 0
        self._train_time = 0.0
        self.checkpoints = CheckpointManager(self.run_dir, backend, tc, log)
        self.progress_bar = ProgressBar(backend.is_root and sys.stderr.isatty())
        self.run_log = RunLog(self.run_dir if backend.is_root else None)

    # ------------------------------------------------------------------ fit

    def fit(self) -> FitResult:
        t0 = time.monotonic()
        self._t0 = t0
        resumed = self._resume_or_seed()
        self.run_log.restart(self.rows.text(), self.epoch)  # drops rows of epochs after the checkpoint
        try:
            return self._fit(resumed, t0)
        finally:
            self.run_log.close()
            self._wait_quietly()

    def _fit(self, resumed: Optional[str], t0: float) -> FitResult:
        self.backend.broadcast_state(self.model, self.optimizer)
        self._report("running", f"resumed from {resumed}" if resumed else "")
        outcome, message = self._run_epochs()
        self.checkpoints.wait()  # the run's end is reported with its checkpoints and rows on disk
        self.run_log.sync()
        result = FitResult(outcome, self.epoch, self.step, self.best_metric, self.best_epoch, message,
                           resumed_from=resumed)
        if outcome == "done" and self.test_loader is not None and self.cfg.train.evaluate_test:
            result.test_metrics = self._evaluate_best_on_test()
        result.wall_time_s = time.monotonic() - t0
        result.samples_per_s = self._samples * self.backend.size / self._train_time if self._train_time else None
        self._report(outcome, result.message, result)
        return result

    def _run_epochs(self) -> tuple[str, str]:
        tc = self.cfg.train
        if self.early.stopped:
            return "done", f"early stopping had already stopped the run at epoch {self.epoch}"
        if self.rows:  # resumed: a decision taken at the checkpoint's epoch stands (prune.py)
            verdict = self._verdict(self.rows[-1])
            if verdict:
                return verdict.status, verdict.message
        while self.epoch < tc.epochs and not self._max_steps_reached():
            event, detail = self._train_epoch()
            if event is Event.DIVERGED:
                return "diverged", detail
            if event is Event.STOP:
                self._save(last=True)
                where = f"epoch {self.epoch + 1}, step {self.step}"
                return "preempted", f"stopped by {detail} at {where}; saved last.pt"
            diverged, stop_early, verdict = self._end_epoch()
            if diverged:
                return "diverged", diverged
            if verdict:
                return verdict.status, verdict.message
            if stop_early:
                return "done", (f"early stopping at epoch {self.epoch}: {self.monitor} did not improve for "
                                f"{self.early.patience} epochs (best {self.best_metric:.6g} at epoch {self.best_epoch})")
        if self._max_steps_reached():
            return "done", f"reached train.max_steps={tc.max_steps} at epoch {self.epoch}"
        return "done", f"finished {self.epoch} epochs"

    def _wait_quietly(self) -> None:
        """Let checkpoint writes finish and their thread end; when fit ends by an error, that
        error must not be masked by one of a write."""
        try:
            self.checkpoints.close()
        except Exception as e:  # noqa: BLE001  already reported, or masked by the error in flight
            self.log(f"warning: writing a checkpoint failed: {e}")

    def _max_steps_reached(self) -> bool:
        return self.cfg.train.max_steps is not None and self.step >= self.cfg.train.max_steps

    # ------------------------------------------------------------------ one epoch

    def _train_epoch(self) -> tuple[Optional[Event], str]:
        """Steps until the loader is exhausted or an event: (None or the event, detail)."""
        loader = self.train_loader
        if self.batch_in_epoch == 0:
            loader.set_epoch(self.epoch)
            self.train_sums = MetricSums(self.task, self.device, self.extra)
        self.model.train()
        n_batches = len(loader)
        t_start = time.monotonic()
        samples = 0
        event, detail = None, ""
        batches = iter(loader)
        try:
            for batch in batches:
                samples += self._train_step(batch)
                self.step += 1
                self.batch_in_epoch += 1
                if self.progress_bar.enabled:
                    self.progress_bar.show(self.epoch + 1, self.batch_in_epoch, n_batches, self._last_loss)
                event, detail = self._step_boundary()
                if event:
                    break
        finally:
            _close(batches)  # a prefetching loader stops its reader thread
        elapsed = time.monotonic() - t_start
        self._samples += samples
        self._train_time += elapsed
        self._epoch_train_time = elapsed
        self._epoch_samples = samples
        self.progress_bar.clear()
        if event in (None, Event.MAX_STEPS):
            bad = self._divergence()         # the steps since the last check
            if self._agree(False, bad, False)[1]:
                return Event.DIVERGED, bad or f"loss is not finite on another rank in epoch {self.epoch + 1}"
            return None, ""
        return event, detail

    def _train_step(self, batch) -> int:
        x, y, w = to_device(batch, self.device)
        lr = self.schedule.lr_at(self.step, self.epoch)
        if lr != self._lr:
            set_lr(self.optimizer, lr)
            self._lr = lr
        out, loss, den = self.step_fn(x, y, w)
        self.train_sums.add(out, y, loss, den)
        self._pending_losses.append(loss.detach())
        return len(x)

    def _step_boundary(self) -> tuple[Optional[Event], str]:
        """Decide, the same way on every rank, whether to stop, checkpoint or go on."""
        if self.backend.size > 1 and not self._sync_step():
            return None, ""
        bad = self._divergence() if len(self._pending_losses) >= self.check_every else None
        stop = bool(self.stop_flag is not None and self.stop_flag.requested)
        due = self.checkpoints.due_at_step(self.step)
        stop, diverged, due = self._agree(stop, bad, due)
        if diverged:
            return Event.DIVERGED, bad or f"loss is not finite on another rank at epoch {self.epoch + 1}, step {self.step}"
        if stop:
            return Event.STOP, getattr(self.stop_flag, "signal_name", None) or "a stop request"
        if due and self.batch_in_epoch < len(self.train_loader):
            self._save(last=True)
        if self._max_steps_reached():
            return Event.MAX_STEPS, ""
        return None, ""

    def _sync_step(self) -> bool:
        """Steps at which ranks agree on their flags: an allreduce each step would cost as much
        as the gradient exchange. Every rank computes the same answer from the step count."""
        every = self.cfg.train.checkpoint_every_steps
        return (self.step % self.cfg.dist.sync_every_steps == 0
                or self.batch_in_epoch >= len(self.train_loader)
                or (every is not None and self.step % every == 0)
                or self._max_steps_reached())

    def _divergence(self) -> Optional[str]:
        """A message naming the first non-finite loss since the last check, else None."""
        if not self._pending_losses:
            return None
        losses = self._pending_losses
        self._pending_losses = []
        if len(losses) == 1:
            value = losses[0].item()
            if math.isfinite(value):
                return None
            index = 0
        else:
            stacked = torch.stack(losses)
            finite = torch.isfinite(stacked)
            if bool(finite.all()):
                return None
            index = int((~finite).nonzero()[0])
            value = stacked[index].item()
        step = self.step - len(losses) + index + 1
        batch = self.batch_in_epoch - len(losses) + index + 1
        return (f"loss became {value} at epoch {self.epoch + 1}, step {step} (batch {batch} of the epoch): "
                f"training diverged; try a lower optim.lr, optim.grad_clip or a warmup")

    def _agree(self, stop: bool, bad: Optional[str], due: bool) -> tuple[bool, bool, bool]:
        """(stop, diverged, checkpoint due), each true on every rank when true on any."""
        return self.backend.any_rank(stop, bad is not None, due)

    # ------------------------------------------------------------------ end of epoch

    def _end_epoch(self) -> tuple[Optional[str], bool, Optional[EndRun]]:
        """Metrics, schedule, best and early stopping, files; (diverged message, stop early,
        on_epoch_end's answer)."""
        metrics = self.train_sums.compute(self.backend, "train")
        if self.val_loader is not None:
            metrics.update(self.evaluate(self.val_loader, "val"))
        self.epoch += 1
        self.batch_in_epoch = 0
        for key in ("train_loss", "val_loss"):
            if key in metrics and not math.isfinite(metrics[key]):
                return (f"{key} is {metrics[key]} at epoch {self.epoch}, step {self.step}: training diverged; "
                        f"try a lower optim.lr or optim.grad_clip"), False, None
        value = metrics[self.monitor]
        self.schedule.epoch_end(value)
        improved = self._is_better(value)
        if improved:
            self.best_metric, self.best_epoch = value, self.epoch
            self._best_state = {k: v.detach().clone() for k, v in self.raw_model.state_dict().items()}
        stop_early = self.early.update(value)
        row = {"epoch": self.epoch, "step": self.step, "lr": self._lr if self._lr is not None else 0.0}
        row.update(_ordered(metrics, self.metric_keys, has_val=self.val_loader is not None))
        row_text = self.rows.append(row)
        # Decided before the checkpoint, so a run restarted from it finds the decision recorded.
        verdict = self._verdict(metrics)
        if improved and self.extra is not None and "confusion" in self.cfg.train.metrics:
            self._write_confusion()
        final = self.epoch >= self.cfg.train.epochs or stop_early or self._max_steps_reached() or verdict is not None
        elapsed = self.elapsed_before + time.monotonic() - self._t0
        self.run_log.append(row_text, timing_line(self.epoch, self._epoch_train_time, self._epoch_speed(), elapsed))
        self.checkpoints.save_epoch_end(self._payload, self.epoch, final, improved)
        self._log_epoch(metrics)
        self._report("running")
        return None, stop_early, verdict

    def _verdict(self, metrics: dict) -> Optional[EndRun]:
        """on_epoch_end's answer for the epoch just ended, rank 0's on every rank."""
        if self.on_epoch_end is None:
            return None
        answer = self.on_epoch_end(self.epoch, metrics) if self.backend.is_root else None
        return self.backend.broadcast_object(answer) if self.backend.size > 1 else answer

    def _write_confusion(self) -> None:
        """confusion.json: the validation confusion matrix of the best epoch (train.metrics: confusion)."""
        if not self.backend.is_root or self.run_dir is None or self.extra.confusion is None:
            return
        record = {"epoch": self.epoch, "split": "val" if self.val_loader is not None else "train",
                  **describe_confusion(self.extra.confusion, self.model_meta.get("class_names"))}
        atomic_write_text(self.run_dir / "confusion.json", json.dumps(record, indent=1) + "\n", durable=False)

    def _is_better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best_metric is None:
            return True
        return value < self.best_metric if self.mode == "min" else value > self.best_metric

    @torch.no_grad()
    def evaluate(self, loader, prefix: str) -> dict[str, float]:
        """Loss and metrics of a split over every rank, in eval mode (no dropout, running BN stats)."""
        was_training = self.model.training
        self.model.eval()
        sums = MetricSums(self.task, self.device, self.extra)
        loader.set_epoch(0)
        batches = iter(loader)
        try:
            for batch in batches:
                x, y, w = batch.x.to(self.device), batch.y.to(self.device), batch.w
                w = None if w is None else w.to(self.device)
                with self.autocast():
                    out = self.model(x)
                loss, den = self.loss_fn(out.float(), y, w)
                sums.add(out.float(), y, loss, den)
        finally:
            _close(batches)
        self.model.train(was_training)
        return sums.compute(self.backend, prefix)

    # ------------------------------------------------------------------ checkpoints and resume

    def _payload(self) -> dict:
        """The checkpoint of this moment. A collective: every rank calls it (per-rank parts are gathered)."""
        mid_epoch = self.batch_in_epoch > 0
        per_rank = {"rng": rng_state(), "train_sums": self.train_sums.state_dict() if mid_epoch else None}
        gathered = gather_objects(self.backend, per_rank)
        payload = {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "early_stopping": self.early.state_dict(),
            "epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch, "lr": self._lr,
            "loader": self.train_loader.state_dict(),
            "rng": [g["rng"] for g in gathered],
            "train_sums": [g["train_sums"] for g in gathered] if mid_epoch else None,
            # As metrics.csv's text: one string, where a list of dicts costs a Python call per
            # value to digest and to pickle.
            "metrics": self.rows.text(),
            "best": {"metric": self.best_metric, "epoch": self.best_epoch, "monitor": self.monitor},
            "world_size": self.backend.size,
            "elapsed_s": self.elapsed_before + time.monotonic() - self._t0,
            **self._fixed_payload,
        }
        if self.scaler.is_enabled():  # a disabled scaler has no state
            payload["scaler"] = self.scaler.state_dict()
        return payload

    def _save(self, last: bool = False, best: bool = False) -> None:
        self.checkpoints.save(self._payload, last=last, best=best)

    def _resume_or_seed(self) -> Optional[str]:
        """Load the newest good checkpoint of run_dir (rank 0 reads, every rank receives it),
        or seed the RNGs for a fresh run. Returns the checkpoint's file name or None."""
        name, payload = self.checkpoints.resume()
        if payload is None:
            seed_all(self.cfg.seed + 1000 * (self.backend.rank + 1))
            return None
        self._restore(payload)
        self.log(f"resumed from {name}: epoch {self.epoch}, step {self.step}"
                 + (f" (batch {self.batch_in_epoch} of epoch {self.epoch + 1})" if self.batch_in_epoch else ""))
        return name

    def _restore(self, p: dict) -> None:
        self.raw_model.load_state_dict(p["model"])
        self.optimizer.load_state_dict(p["optimizer"])
        self.schedule.load_state_dict(p["scheduler"])
        self.early.load_state_dict(p["early_stopping"])
        if self.scaler.is_enabled() and "scaler" in p:
            self.scaler.load_state_dict(p["scaler"])
        self.epoch, self.step, self.batch_in_epoch = int(p["epoch"]), int(p["step"]), int(p["batch_in_epoch"])
        self.best_metric, self.best_epoch = p["best"]["metric"], p["best"]["epoch"]
        self._lr = p.get("lr")   # the optimizer's param groups hold it too (loaded above)
        rows = p["metrics"]
        self.rows = MetricRows(parse_metrics_csv(rows) if isinstance(rows, str) else rows)  # older checkpoints: a list
        self.elapsed_before = float(p.get("elapsed_s", 0.0))
        same_world = int(p["world_size"]) == self.backend.size
        if not same_world:
            self.log(f"the checkpoint was written by {p['world_size']} ranks, this run has {self.backend.size}: "
                     f"under the same global batch the epoch's order continues where it stopped, and the "
                     f"results match an uninterrupted run up to floating-point summation order")
        restore_rng(p["rng"], self.backend.rank, self.cfg.seed, self.step)
        self.train_sums = MetricSums(self.task, self.device, self.extra)
        if self.batch_in_epoch:
            self.train_loader.load_state_dict(p["loader"])
            self._restore_train_sums(p["train_sums"], same_world)

    def _restore_train_sums(self, parts: list, same_world: bool) -> None:
        """The partial epoch's sums: each rank its own, or, on another world size, all of them
        on rank 0 (epoch metrics are sums over every rank, so where they sit does not matter)."""
        rank = self.backend.rank
        if same_world:
            self.train_sums.load_state_dict(parts[rank])
        elif rank == 0:
            self.train_sums.load_state_dict(_merge_sums(parts))

    # ------------------------------------------------------------------ files and state

    def _epoch_speed(self) -> float:
        t = self._epoch_train_time
        return self._epoch_samples * self.backend.size / t if t else 0.0

    def _report(self, status: str, message: str = "", result: Optional[FitResult] = None) -> None:
        if self.on_progress is None or not self.backend.is_root:
            return
        self.on_progress(Progress(
            status=status, message=message, epoch=self.epoch, total_epochs=self.cfg.train.epochs,
            step=self.step, best_metric=self.best_metric, best_epoch=self.best_epoch, monitor=self.monitor,
            world_size=self.backend.size, backend=self.backend.name,
            wall_time_s=self.elapsed_before + time.monotonic() - self._t0,
            samples_per_s=self._samples * self.backend.size / self._train_time if self._train_time else None,
            test=dict(result.test_metrics) if result is not None else {}))

    def _log_epoch(self, metrics: dict) -> None:
        if not self.backend.is_root:
            return
        split = "val" if self.val_loader is not None else "train"
        elapsed = self.elapsed_before + time.monotonic() - self._t0
        self.log(epoch_line(self.epoch, self.cfg.train.epochs, metrics, self.metric_keys, split, self._lr,
                            self._epoch_speed(), elapsed))

    def _last_loss(self) -> float:
        return self._pending_losses[-1].item() if self._pending_losses else float("nan")

    # ------------------------------------------------------------------ test split

    def _evaluate_best_on_test(self) -> dict[str, float]:
        state = self._best_state
        if state is None and self.best_epoch is not None:
            state = self.checkpoints.best_weights()
        if state is not None:
            self.raw_model.load_state_dict(state)
        else:
            self.log("warning: no best checkpoint; the test split is evaluated with the final weights")
        metrics = self.evaluate(self.test_loader, "test")
        if self.backend.is_root:
            self.log("test  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics


# ---------------------------------------------------------------------- helpers


def _ordered(metrics: dict, keys: tuple[str, ...], has_val: bool) -> dict:
    out = {"train_loss": metrics["train_loss"], **{f"train_{k}": metrics[f"train_{k}"] for k in keys}}
    if has_val:
        out["val_loss"] = metrics["val_loss"]
        out.update({f"val_{k}": metrics[f"val_{k}"] for k in keys})
    return out


def _close(iterator) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def _merge_sums(parts: list[dict]) -> dict:
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _plain(obj: Any) -> Any:
    """Model meta as plain types (numpy arrays and scalars become lists and floats)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
