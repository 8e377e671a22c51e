"""One optimizer step, shared by the Trainer and the LR range test.

A step zeroes the gradients, runs forward under autocast, adds the L1/L2 penalties to the
loss, runs backward (scaled by the GradScaler for fp16 on CUDA) once per micro-batch of
``dist.backward_passes_per_step`` inside the backend's accumulation context, then unscales,
clips, steps the optimizer (through the scaler when there is one) and applies the
max-norm constraint. The learning rate is the caller's to set: the trainer follows its
schedule, the range test its exponential ramp.

The gradient is that of the global batch's mean loss, whichever ranks hold its rows: each
backward pass weighs its (weighted) mean loss by its share of the global denominator, and
the backend averages over ranks. Without sample weights that denominator is the row
count, and the loaders give every rank batches of equal size, so it is known without
communication; with weights, one small allreduce of the weight sum per step finds it.

The optimizer may be a Horovod ``DistributedOptimizer``, the ``mpi`` backend's
``GradientAveragingOptimizer`` or a plain torch optimizer under DDP, so only the calls
all of them accept are made: ``zero_grad()`` without arguments (Horovod's takes none) and,
before clipping, ``synchronize()`` with ``skip_synchronize()`` where the optimizer
averages the gradients itself.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple, Optional, Union

import torch

from ..config import Config
from .optim import apply_max_norm, weight_penalty, weight_tensors


class StepResult(NamedTuple):
    out: torch.Tensor                   # outputs of the whole batch (detached when accumulated)
    loss: torch.Tensor                  # the data loss, without penalties: the batch's (weighted) mean
    den: Union[int, torch.Tensor]       # its denominator: the rows, or the sum of the sample weights


def precision(name: str, device: torch.device) -> tuple[Callable[[], Any], torch.amp.GradScaler]:
    """(autocast context factory, GradScaler) for ``train.precision``.

    Only fp16 on CUDA needs loss scaling; bf16 has fp32's exponent range, and the CPU's
    fp16 autocast has no scaler to go with it. Elsewhere the scaler is disabled: its calls
    then pass the loss and the optimizer step through unchanged.
    """
    scaler = torch.amp.GradScaler("cuda", enabled=name == "fp16" and device.type == "cuda")
    if name == "fp32":
        return contextlib.nullcontext, scaler
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def to_device(batch, device: torch.device) -> tuple:
    """(x, y, w) of a batch on ``device``; a loader that already delivers there costs nothing."""
    x, y, w = batch.x, batch.y, batch.w
    if x.device != device:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        w = None if w is None else w.to(device, non_blocking=True)
    return x, y, w


class TrainStep:
    """``step(x, y, w) -> StepResult``: one optimizer step on a batch already on the device.

    ``model`` is what the backend's ``wrap`` returned (it runs forward and backward);
    ``raw_model`` the plain module whose weights the penalties, clipping and max-norm see.
    """

    def __init__(self, cfg: Config, model: torch.nn.Module, raw_model: torch.nn.Module, optimizer,
                 loss_fn: Callable, backend, device: torch.device):
        self.model, self.raw_model, self.optimizer = model, raw_model, optimizer
        self.loss_fn, self.backend = loss_fn, backend
        self.optim_cfg = cfg.optim
        self.autocast, self.scaler = precision(cfg.train.precision, device)
        self.micro_steps = max(1, int(getattr(backend, "backward_passes_per_step", 1) or 1))
        self.weights = weight_tensors(raw_model)
        self.weighted = bool(getattr(loss_fn, "weighted", False))

    def __call__(self, x: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor]) -> StepResult:
        self.optimizer.zero_grad()  # set_to_none by default; Horovod's optimizer takes no arguments
        rank_den = self._rank_denominator(x, w)
        if self.micro_steps == 1:
            out, loss, den = self._forward_backward(x, y, w, rank_den, True, 1.0)
        else:
            out, loss, den = self._accumulate(x, y, w, rank_den)
        self._clip_and_step()
        if self.optim_cfg.max_norm:
            apply_max_norm(self.weights, self.optim_cfg.max_norm)
        return StepResult(out, loss, den)

    def _rank_denominator(self, x: torch.Tensor, w: Optional[torch.Tensor]):
        """The global batch's loss denominator divided by the world size: what one rank's
        backward passes are weighed against, so that the average over ranks is the global mean."""
        if not self.weighted or w is None:
            return len(x)  # every rank's batch has the same number of rows
        den = w.float().sum()  # as the loss sums it, so that one process weighs by exactly 1
        size = getattr(self.backend, "size", 1)
        if size > 1:
            den = (self.backend.allreduce_sum(den.double().reshape(1)).reshape(()) / size).float()
        return den

    def _forward_backward(self, x, y, w, rank_den, last: bool, part: float):
        """Forward and backward of one (micro-)batch, its loss weighed by its share of ``rank_den``;
        ``part`` is its fraction of the step's rows."""
        with self._backend_context(last):
            with self.autocast():
                out = self.model(x)
            loss, den = self.loss_fn(out.float(), y, w)
            data_loss = loss
            if not (isinstance(den, int) and den == rank_den):
                data_loss = loss * (den / rank_den)
            total = data_loss
            if self.optim_cfg.l1 or self.optim_cfg.l2:
                penalty = weight_penalty(self.weights, self.optim_cfg.l1, self.optim_cfg.l2)
                # once per step, however many micro-batches share it
                total = data_loss + (penalty if part == 1.0 else penalty * part)
            self.scaler.scale(total).backward()
        return out, loss, den

    def _accumulate(self, x, y, w, rank_den):
        """dist.backward_passes_per_step > 1: the batch in micro-batches, one backward pass
        each, gradients summed to the whole batch's; the step count per epoch does not change."""
        k = min(self.micro_steps, len(x))
        chunks = list(zip(x.chunk(k), y.chunk(k), w.chunk(k) if w is not None else [None] * k))
        outs, nums, dens = [], [], []
        for i, (xc, yc, wc) in enumerate(chunks):
            out, loss, den = self._forward_backward(xc, yc, wc, rank_den, i == len(chunks) - 1, len(xc) / len(x))
            outs.append(out.detach())
            nums.append(loss.detach() * den)
            dens.append(den)
        den = sum(dens)
        return torch.cat(outs), torch.stack(nums).sum() / den, den

    def _backend_context(self, last: bool):
        ctx = getattr(self.backend, "accumulation_context", None)
        if ctx is None or self.micro_steps == 1:
            return contextlib.nullcontext()
        return ctx(self.model, is_last_micro_step=last)

    def _clip_and_step(self) -> None:
        opt, clip = self.optimizer, self.optim_cfg.grad_clip
        if clip is None and not self.scaler.is_enabled():
            opt.step()  # Horovod and the mpi backend average the gradients inside
            return
        averages = hasattr(opt, "skip_synchronize")
        if averages:
            # The clip and the scaler's inf check must see the averaged gradients (the same on
            # every rank, so that all ranks skip an overflowing step together); the step
            # then must not average them a second time.
            opt.synchronize()
        self.scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
        with opt.skip_synchronize() if averages else contextlib.nullcontext():
            self._step_optimizer()

    def _step_optimizer(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
