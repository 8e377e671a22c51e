"""TensorLoader: the loader protocol of docs/ARCHITECTURE.md over in-memory tensors.

Used by tests, benchmarks and the sanity tools. It follows the same partition rules as
the HDF5 ShardLoader, so the trainer cannot tell them apart:

- train split: every rank gets the same number of rows per epoch; the epoch's order is a
  permutation that depends on (seed, epoch) only; ``remainder="drop"`` drops the last
  ``n % world_size`` rows of that order, ``"pad"`` repeats rows from its start;
- eval splits: each rank reads a contiguous share, every row exactly once;
- ``state_dict()`` / ``load_state_dict()`` record the epoch and the batches already
  yielded, so an iteration can resume right after batch k of epoch e.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import torch


class Batch(NamedTuple):
    x: torch.Tensor                  # float32 [b, F]
    y: torch.Tensor                  # int64 [b] (classes) or float32 [b, K] (regression)
    w: Optional[torch.Tensor] = None  # float32 [b] sample weights


class TensorLoader:
    def __init__(self, x: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor] = None, *,
                 batch_size: int, split: str = "train", rank: int = 0, world_size: int = 1,
                 shuffle: Optional[bool] = None, seed: int = 0, remainder: str = "drop",
                 device: torch.device | str = "cpu", meta: Optional[dict] = None):
        if len(x) != len(y) or (w is not None and len(w) != len(x)):
            raise ValueError(f"x, y and w must have the same number of rows, got {len(x)}, {len(y)}, "
                             f"{None if w is None else len(w)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if remainder not in ("drop", "pad"):
            raise ValueError(f"remainder must be 'drop' or 'pad', got {remainder!r}")
        self.x, self.y, self.w = x, y, w
        self.batch_size = batch_size
        self.split = split
        self.rank, self.world_size = rank, world_size
        self.shuffle = (split == "train") if shuffle is None else shuffle
        self.seed = seed
        self.remainder = remainder
        self.device = torch.device(device)
        self.meta = meta if meta is not None else default_meta(x, y)
        self.epoch = 0
        self.batches_done = 0   # batches of the current epoch already yielded
        self._resume_at = 0     # first batch of the next iteration (set by load_state_dict)

    # -- partition ---------------------------------------------------------------

    def _epoch_order(self) -> Optional[torch.Tensor]:
        """Row indices of this epoch in the order they are read, or None for 0..n-1."""
        if not self.shuffle:
            return None
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.x), generator=gen)

    def _rank_range(self) -> tuple[int, int]:
        """[start, stop) of this rank's share within the epoch's (possibly padded) order."""
        n, r, world = len(self.x), self.rank, self.world_size
        if self.split != "train":
            base, extra = divmod(n, world)
            start = r * base + min(r, extra)
            return start, start + base + (1 if r < extra else 0)
        per = n // world if self.remainder == "drop" else -(-n // world)
        return r * per, (r + 1) * per

    def __len__(self) -> int:
        start, stop = self._rank_range()
        return -(-(stop - start) // self.batch_size)

    # -- protocol ----------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.batches_done = 0
        self._resume_at = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "rows": len(self.x),
                "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rows", len(self.x)) != len(self.x):
            raise ValueError(f"loader state is for {state['rows']} rows, this loader has {len(self.x)}")
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        self._resume_at = self.batches_done

    def __iter__(self) -> Iterator[Batch]:
        first, self._resume_at = self._resume_at, 0
        order = self._epoch_order()
        start, stop = self._rank_range()
        n = len(self.x)
        for b in range(first, len(self)):
            lo = start + b * self.batch_size
            hi = min(lo + self.batch_size, stop)
            if order is None and hi <= n:
                batch = Batch(self.x[lo:hi], self.y[lo:hi], None if self.w is None else self.w[lo:hi])
            else:
                idx = torch.arange(lo, hi) % n if order is None else order[torch.arange(lo, hi) % n]
                batch = Batch(self.x[idx], self.y[idx], None if self.w is None else self.w[idx])
            self.batches_done = b + 1
            yield self._to_device(batch)

    def _to_device(self, batch: Batch) -> Batch:
        if self.device == batch.x.device:
            return batch
        return Batch(*(None if t is None else t.to(self.device, non_blocking=True) for t in batch))


def default_meta(x: torch.Tensor, y: torch.Tensor) -> dict:
    """Loader meta inferred from tensors: int64 y -> classes, float y -> regression targets."""
    n_features = int(x.shape[1])
    if y.dtype == torch.int64:
        n_classes = int(y.max().item()) + 1 if len(y) else 2
        task = "binary" if n_classes <= 2 else "multiclass"
        n_classes = max(n_classes, 2)
        n_targets = 1
    else:
        task, n_classes = "regression", 0
        n_targets = 1 if y.dim() == 1 else int(y.shape[1])
    return {"task": task, "n_features": n_features, "n_classes": n_classes, "n_targets": n_targets,
            "mean": [0.0] * n_features, "std": [1.0] * n_features,
            "feature_names": [f"x{i}" for i in range(n_features)]}
