"""ShardLoader: the rank-partitioned, block-shuffled, prefetching, resumable batch loader.

One epoch of the train split, for a given (seed, epoch):

1. The split's rows are cut into contiguous blocks of ``block_rows`` (the last block of
   each shard is shorter). The order of the blocks is shuffled with an rng of
   (seed, epoch) - the same on every rank.
2. The row sequence this gives is cut into ``world_size`` contiguous shares of equal
   length, so a rank reads only about N/R rows. ``remainder="drop"`` leaves out the last
   N mod R rows of the sequence (different rows every epoch, since the order changes);
   ``"pad"`` repeats the first rows of the sequence to fill the last share.
3. Each rank reads its share one buffer of ``buffer_blocks`` blocks at a time (one HDF5
   slice per block piece) and shuffles the rows inside the buffer with an rng of
   (seed, epoch, rank, buffer index).
4. The rows are cut into batches of ``batch_size``; the last batch is smaller and has the
   same size on every rank, so every rank yields the same number of batches.

Eval splits are cut into contiguous shares of all rows (nothing dropped; shares differ by
at most one row). Every buffer's shuffle depends only on its index, so a loader restored
with ``load_state_dict`` starts reading at the buffer of the next batch and yields exactly
the rows that were left.
"""
from __future__ import annotations

import collections
import queue
import sys
import threading
import warnings
import weakref
from typing import Any, Callable, Iterator, NamedTuple, Optional

import numpy as np
import torch

from ..errors import DataError
from .shards import Dataset, ShardReader, ceil_div, open_dataset, standardization

STATE_FORMAT = 1
# Loader settings that fix an epoch's plan: a saved position means nothing under other values.
PLAN_KEYS = ("split", "partition", "world_size", "batch_size", "seed", "rows", "remainder", "block_rows",
             "buffer_blocks", "shuffle")
_BLOCK_SALT = 0xB10C  # keeps the block order and the buffer shuffles on separate rng streams
_BUFFER_SALT = 0x5EED
_POOL_BUFFERS = 4  # buffers kept for reuse: the prefetch queue's batches span at most about three


class Batch(NamedTuple):
    x: torch.Tensor  # float32 [b, F]
    y: torch.Tensor  # int64 [b] (binary, multiclass) or float32 [b, K] (regression)
    w: Optional[torch.Tensor]  # float32 [b], or None when the shards hold no weights


# --------------------------------------------------------------------------- the plan (pure numpy)


def natural_blocks(shard_rows: list[int], block_rows: int, limit: Optional[int] = None) -> np.ndarray:
    """Blocks [shard, start, stop] in file order, cut at each shard's end and after ``limit`` rows."""
    parts = []
    for shard, rows in enumerate(shard_rows):
        starts = np.arange(0, rows, block_rows, dtype=np.int64)
        stops = np.minimum(starts + block_rows, rows)
        parts.append(np.stack([np.full_like(starts, shard), starts, stops], axis=1))
    blocks = np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)
    ends = np.cumsum(blocks[:, 2] - blocks[:, 1])
    if limit is not None and len(ends) and limit < ends[-1]:
        keep = int(np.searchsorted(ends, limit, side="left")) + 1
        blocks = blocks[:keep].copy()
        if ends[keep - 1] > limit:
            blocks[-1, 2] -= ends[keep - 1] - limit
    return blocks


def block_order(blocks: np.ndarray, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return blocks
    return blocks[np.random.default_rng([seed, epoch, _BLOCK_SALT]).permutation(len(blocks))]


def share_bounds(rows: int, rank: int, world_size: int, partition: str, remainder: str) -> tuple[int, int]:
    """[start, stop) of this rank's share, in positions of the epoch's row sequence.

    ``equal``: every rank the same length; with ``pad`` the positions may run past ``rows``
    and wrap to the start of the sequence. ``contiguous``: all rows, shares differ by <= 1.
    """
    if partition == "contiguous":
        return rank * rows // world_size, (rank + 1) * rows // world_size
    per = rows // world_size if remainder == "drop" else ceil_div(rows, world_size)
    return rank * per, (rank + 1) * per


def slice_segments(segments: np.ndarray, ends: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The pieces of ``segments`` (laid end to end; ``ends`` their cumulative ends) covering [start, stop)."""
    if stop <= start:
        return segments[:0]
    first = int(np.searchsorted(ends, start, side="right"))
    last = int(np.searchsorted(ends, stop, side="left"))
    out = segments[first:last + 1].copy()
    lengths = out[:, 2] - out[:, 1]
    out[0, 1] += start - (ends[first] - lengths[0])
    out[-1, 2] -= ends[last] - stop
    return out


def rank_segments(order: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Segments [shard, start, stop] of positions [start, stop) of the sequence ``order`` (wrapping)."""
    ends = np.cumsum(order[:, 2] - order[:, 1])
    total = int(ends[-1]) if len(ends) else 0
    pieces = []
    while start < stop and total:
        offset = start % total
        take = min(stop - start, total - offset)
        pieces.append(slice_segments(order, ends, offset, offset + take))
        start += take
    return np.concatenate(pieces) if pieces else np.zeros((0, 3), dtype=np.int64)


class EpochPlan(NamedTuple):
    segments: np.ndarray  # this rank's rows, in reading order
    ends: np.ndarray  # cumulative ends of segments
    rows: int  # rows this rank yields this epoch


# --------------------------------------------------------------------------- the loader


class ShardLoader:
    """Batches of one split for one rank; see the module docstring for the epoch plan."""

    def __init__(self, path_or_dataset: Any, split: str = "train", batch_size: int = 1024, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, seed: int = 0, remainder: str = "drop",
                 block_rows: int = 4096, buffer_blocks: int = 8, prefetch: int = 4, standardize: bool = True,
                 limit_rows: Optional[int] = None, device: Any = torch.device("cpu"),
                 partition: Optional[str] = None):
        _check_args(batch_size, rank, world_size, remainder, block_rows, buffer_blocks, prefetch, limit_rows)
        self.dataset: Dataset = open_dataset(path_or_dataset)
        self.split = split
        self.shards = self.dataset.shards(split)
        # Train batches must line up across ranks (equal shares); eval reads every row once.
        self.partition = partition or ("equal" if split == "train" else "contiguous")
        if self.partition not in ("equal", "contiguous"):
            raise ValueError(f"partition: {self.partition!r}; expected 'equal' or 'contiguous'")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.seed, self.remainder = bool(shuffle), seed, remainder
        self.block_rows, self.buffer_blocks, self.prefetch = block_rows, buffer_blocks, prefetch
        self.standardize = standardize
        self.device = torch.device(device)
        self._blocks = natural_blocks([s.rows for s in self.shards], block_rows, limit_rows)
        self.rows = int((self._blocks[:, 2] - self._blocks[:, 1]).sum())
        if self.partition == "equal" and self.rows < world_size:
            raise DataError(f"{self.dataset.path}: split {split!r} has {self.rows} rows; expected at least "
                            f"one per rank (world size {world_size})")
        self.epoch = 0
        self.batches_done = 0  # batches handed out in the current epoch
        self._resume_pending = False
        self._active: Optional[weakref.ref] = None

    @classmethod
    def from_config(cls, data_cfg: Any, split: str, *, rank: int, world_size: int, seed: int,
                    device: Any = torch.device("cpu"), shuffle: Optional[bool] = None) -> "ShardLoader":
        """A loader from ``hpctrain.config.DataConfig``; shuffles the train split only unless told."""
        return cls(data_cfg.path, split=split, batch_size=data_cfg.batch_size, rank=rank, world_size=world_size,
                   shuffle=(split == "train") if shuffle is None else shuffle, seed=seed,
                   remainder=data_cfg.remainder, block_rows=data_cfg.block_rows,
                   buffer_blocks=data_cfg.buffer_blocks, prefetch=data_cfg.prefetch,
                   standardize=data_cfg.standardize, limit_rows=data_cfg.limit_rows, device=device)

    @property
    def meta(self):
        return self.dataset.meta

    @property
    def rows_per_rank(self) -> int:
        start, stop = share_bounds(self.rows, self.rank, self.world_size, self.partition, self.remainder)
        return stop - start

    def __len__(self) -> int:
        return ceil_div(self.rows_per_rank, self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan the next iteration follows; a restored position is kept
        when ``epoch`` is the restored one."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.batches_done = 0
            self._resume_pending = False

    def plan(self, epoch: Optional[int] = None) -> EpochPlan:
        epoch = self.epoch if epoch is None else epoch
        order = block_order(self._blocks, self.seed, epoch, self.shuffle)
        start, stop = share_bounds(self.rows, self.rank, self.world_size, self.partition, self.remainder)
        segments = rank_segments(order, start, stop)
        return EpochPlan(segments, np.cumsum(segments[:, 2] - segments[:, 1]), stop - start)

    # ----------------------------------------------------------------- iteration

    def __iter__(self) -> "EpochIterator":
        self.close()  # one live iteration per loader: a new one supersedes the old
        first = self.batches_done if self._resume_pending else 0
        self._resume_pending = False
        self.batches_done = first
        it = EpochIterator(self, self.plan(), first, self.prefetch)
        self._active = weakref.ref(it)
        return it

    def close(self) -> None:
        """Stop the running iteration (its prefetch thread) and close its files."""
        it = self._active() if self._active is not None else None
        self._active = None
        if it is not None:
            it.close()

    def _yielded(self, it: "EpochIterator") -> None:
        if self._active is not None and self._active() is it:
            self.batches_done += 1

    # ----------------------------------------------------------------- checkpoints

    def _plan_values(self) -> dict:
        return {"split": self.split, "partition": self.partition, "world_size": self.world_size,
                "batch_size": self.batch_size, "seed": self.seed, "rows": self.rows,
                "remainder": self.remainder, "block_rows": self.block_rows,
                "buffer_blocks": self.buffer_blocks, "shuffle": self.shuffle}

    def state_dict(self) -> dict:
        """The position: epoch and batches handed out, plus the settings that fix the plan.

        Plain Python types only. The state is the same on every rank of a train loader,
        so rank 0's copy restores all of them.
        """
        return {"format": STATE_FORMAT, "epoch": self.epoch, "batches_done": self.batches_done,
                "batches_total": len(self), **self._plan_values()}

    def load_state_dict(self, state: dict, strict: bool = False) -> None:
        """Resume after batch ``batches_done`` of ``epoch`` on the next iteration.

        Under the same plan settings the rows that follow are exactly those an uninterrupted
        epoch would have read. A position saved under other settings (a requeued job with
        another world size, say) cannot be continued exactly: ``strict`` raises DataError
        naming the settings; otherwise a warning is issued and the epoch resumes at the
        same fraction of its batches.
        """
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"loader state: format {state.get('format')!r}; expected {STATE_FORMAT}")
        self.close()
        mine = self._plan_values()
        differ = {k: (state.get(k), mine[k]) for k in PLAN_KEYS if state.get(k) != mine[k]}
        done = int(state["batches_done"])
        if differ and done > 0:
            detail = ", ".join(f"{k} {a!r} saved, {b!r} now" for k, (a, b) in differ.items())
            message = f"loader state of split {self.split!r} was saved under other settings ({detail})"
            if strict:
                raise DataError(f"{message}; an exact mid-epoch resume needs the same settings")
            total = max(1, int(state.get("batches_total") or done))
            done = round(done * len(self) / total)
            warnings.warn(f"{message}: resuming at batch {done} of {len(self)}, the same fraction of the epoch; "
                          f"some rows of this epoch may be seen twice or not at all", stacklevel=2)
        self.epoch = int(state["epoch"])
        self.batches_done = min(done, len(self))
        self._resume_pending = True


def _check_args(batch_size, rank, world_size, remainder, block_rows, buffer_blocks, prefetch, limit_rows) -> None:
    if batch_size < 1 or block_rows < 1 or buffer_blocks < 1 or prefetch < 0:
        raise ValueError(f"batch_size, block_rows, buffer_blocks must be >= 1 and prefetch >= 0; got "
                         f"{batch_size}, {block_rows}, {buffer_blocks}, {prefetch}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world size {world_size}: expected 0 <= rank < world_size")
    if remainder not in ("drop", "pad"):
        raise ValueError(f"remainder: {remainder!r}; expected 'drop' or 'pad'")
    if limit_rows is not None and limit_rows < 1:
        raise ValueError(f"limit_rows: {limit_rows}; expected >= 1 or None")


# --------------------------------------------------------------------------- producing batches


class _BatchProducer:
    """Everything one epoch's reading needs, copied from the loader so that the background
    threads hold no reference to the loader or its iterator.

    Two stages: reading buffers from the files, and shuffling them into batches. With
    ``read_ahead`` the reading runs in a thread of its own, one buffer ahead: its preadv
    calls release the GIL, so reading overlaps the gather and standardisation.
    """

    def __init__(self, loader: ShardLoader, plan: EpochPlan, first_batch: int, read_ahead: bool):
        self.dataset, self.split, self.plan = loader.dataset, loader.split, plan
        self.batch_size, self.seed, self.epoch, self.rank = loader.batch_size, loader.seed, loader.epoch, loader.rank
        self.shuffle, self.read_ahead = loader.shuffle, read_ahead
        self.buffer_rows = min(loader.block_rows * loader.buffer_blocks, max(plan.rows, 1))
        self.first_row = min(first_batch * loader.batch_size, plan.rows)
        self.pin = loader.device.type == "cuda"
        meta = loader.meta
        self.n_features, self.has_weights = meta.n_features, meta.has_weights
        self.y_dtype = np.float32 if meta.task == "regression" else np.int64
        self.y_tail = (meta.n_targets,) if meta.task == "regression" else ()
        self._read_pool: list[tuple] = []  # buffers read from the files
        self._batch_pool: list[tuple] = []  # shuffled buffers that batches are views of
        self.scale = None
        if loader.standardize:
            mean, inv_std = standardization(meta)
            self.scale = (torch.from_numpy(-mean * inv_std), torch.from_numpy(inv_std))  # shift, factor

    def __call__(self) -> Iterator[tuple]:
        buffers = _Background(self._read_buffers, 2, "hpctrain-read") if self.read_ahead else self._read_buffers()
        try:
            yield from self._batches(buffers)
        finally:
            buffers.close()

    def _read_buffers(self) -> Iterator[tuple]:
        """(buffer index, its rows read from the files) for each buffer left in the epoch."""
        size, rows = self.buffer_rows, self.plan.rows
        if self.first_row >= rows:
            return
        reader = ShardReader(self.dataset, self.split)  # opened in the thread that reads
        try:
            for k in range(self.first_row // size, ceil_div(rows, size)):
                lo, hi = k * size, min((k + 1) * size, rows)
                # Without shuffling, batches are views of the buffer read: pin it for a GPU.
                arrays = _from_pool(self._read_pool, lambda: self._arrays(size, self.pin and not self.shuffle),
                                    hi - lo)
                self._fill(reader, lo, hi, arrays)
                yield k, arrays
                del arrays  # so the pool sees the buffer free once the batches are done with it
        finally:
            reader.close()

    def _batches(self, buffers: Iterator[tuple]) -> Iterator[tuple]:
        """Shuffle each buffer and cut it into batches (views of it).

        Rows are gathered into the shuffled buffer batch by batch and standardised right
        away, while the batch is still in the CPU cache: one pass over memory, not two.
        """
        size, rows, b = self.buffer_rows, self.plan.rows, self.batch_size
        pos = self.first_row
        pending: list[tuple] = []  # the first rows of a batch that continues in the next buffer
        for k, raw in buffers:
            n = len(raw[0])
            lo = k * size
            order, dest = None, raw
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch, self.rank, k, _BUFFER_SALT]).permutation(n)
                dest = _from_pool(self._batch_pool, lambda: self._arrays(self.buffer_rows, self.pin), n)
            p = pos - lo
            while p < n:
                end = min((pos // b + 1) * b, rows)  # where the batch holding ``pos`` ends
                take = min(end - pos, n - p)
                if order is not None:
                    for out, src in zip(dest, raw):
                        if out is not None:
                            # mode="clip" lets numpy write straight into out (mode="raise" buffers a copy)
                            src.take(order[p:p + take], axis=0, out=out[p:p + take], mode="clip")
                # One tensor per batch, not views of one buffer tensor: views share autograd's
                # version counter, and standardising the next batch in place would then
                # invalidate the input the current step saved for its backward pass.
                piece = self._standardize(tuple(None if a is None else torch.from_numpy(a[p:p + take])
                                                for a in dest))
                p, pos = p + take, pos + take
                if pos < end:
                    pending.append(piece)
                    continue
                yield self._concat(pending + [piece]) if pending else piece
                pending = []
            del raw, dest

    def _standardize(self, batch: tuple) -> tuple:
        if self.scale is not None:
            # (x - mean) / std in one pass, in place. Batch by batch, not on the whole buffer:
            # an op this small runs on the calling thread instead of waking torch's thread pool,
            # which competes with the training step for the same cores.
            torch.addcmul(self.scale[0], batch[0], self.scale[1], out=batch[0])
        return batch

    def _fill(self, reader: ShardReader, lo: int, hi: int, arrays: tuple) -> None:
        xbuf, ybuf, wbuf = arrays
        offset = 0
        for shard, start, stop in slice_segments(self.plan.segments, self.plan.ends, lo, hi).tolist():
            n = stop - start
            reader.read(shard, start, stop, xbuf[offset:offset + n], ybuf[offset:offset + n],
                        None if wbuf is None else wbuf[offset:offset + n])
            offset += n

    def _arrays(self, n: int, pinned: bool) -> tuple:
        """Empty x, y, w arrays for ``n`` rows; page-locked (pinned) for a GPU, so that the copy
        to it runs asynchronously."""
        shapes = [((n, self.n_features), np.float32), ((n,) + self.y_tail, self.y_dtype)]
        if self.has_weights:
            shapes.append(((n,), np.float32))
        if pinned:
            arrays = [torch.empty(shape, dtype=_TORCH_DTYPES[np.dtype(dt)], pin_memory=True).numpy()
                      for shape, dt in shapes]
        else:
            arrays = [np.empty(shape, dtype=dt) for shape, dt in shapes]
        return tuple(arrays) + ((None,) if not self.has_weights else ())

    def _concat(self, pieces: list[tuple]) -> tuple:
        joined = []
        for parts in zip(*pieces):
            if parts[0] is None:
                joined.append(None)
                continue
            out = torch.empty((sum(len(p) for p in parts),) + tuple(parts[0].shape[1:]), dtype=parts[0].dtype,
                              pin_memory=self.pin)
            joined.append(torch.cat(parts, out=out))
        return tuple(joined)


_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.int64): torch.int64}


def _from_pool(pool: list[tuple], make: Callable[[], tuple], rows: int) -> tuple:
    """Views of the first ``rows`` rows of a pooled set of arrays that nothing else refers to.

    Batches are views of a buffer and a caller may keep one as long as it likes, so a
    buffer is reused only when nothing but the pool refers to it (the views handed out
    hold references to it). Reuse keeps the loader's memory a fixed handful of buffers,
    whatever the allocator does with memory freed in another thread, and spares the page
    faults of fresh multi-megabyte allocations.
    """
    for arrays in pool:
        if all(a is None or sys.getrefcount(a) == 3 for a in arrays):  # the tuple, ``a``, the call
            return tuple(None if a is None else a[:rows] for a in arrays)
    arrays = make()
    if len(pool) < _POOL_BUFFERS:
        pool.append(arrays)
    return tuple(None if a is None else a[:rows] for a in arrays)


# --------------------------------------------------------------------------- background threads


_END = object()


class _Failure(NamedTuple):
    error: BaseException


def _put(q: queue.Queue, stop: threading.Event, item: Any) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _background_worker(produce: Callable[[], Iterator[Any]], q: queue.Queue, stop: threading.Event,
                       group: int) -> None:
    gen = None
    try:
        gen = produce()
        items: list = []
        for item in gen:
            items.append(item)
            if len(items) == group:
                if not _put(q, stop, items):
                    return
                items = []
        items.append(_END)
        _put(q, stop, items)
    except BaseException as e:  # surfaces in the consumer: a failed read must never leave it waiting
        _put(q, stop, [_Failure(e)])
    finally:
        if gen is not None:
            gen.close()  # runs the generator's cleanup (closing shard files) in this thread


class _Background:
    """Runs a generator in a daemon thread, up to ``depth`` items ahead; iterating this object
    yields the items in order and re-raises the generator's error.

    Items are handed over in groups of depth // 2: every hand-over between two Python
    threads costs a GIL switch, and grouping halves their number or better.
    """

    def __init__(self, produce: Callable[[], Iterator[Any]], depth: int, name: str):
        group = max(1, depth // 2)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth // group))
        self._stop = threading.Event()
        self._ready: collections.deque = collections.deque()
        self._thread = threading.Thread(target=_background_worker, args=(produce, self._queue, self._stop, group),
                                        name=name, daemon=True)
        self._thread.start()

    def __iter__(self) -> "_Background":
        return self

    def __next__(self) -> Any:
        while not self._ready:
            try:
                self._ready.extend(self._queue.get(timeout=1.0))
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise DataError(f"the data loader's {self._thread.name} thread stopped without a result") from None
        item = self._ready.popleft()
        if isinstance(item, _Failure):
            raise item.error
        if item is _END:
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._ready.clear()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)


class EpochIterator:
    """Iterates one epoch; with ``prefetch`` > 0 background threads read ahead."""

    def __init__(self, loader: ShardLoader, plan: EpochPlan, first_batch: int, prefetch: int):
        self._loader = weakref.ref(loader)
        self._device = loader.device
        self._closed = False
        produce = _BatchProducer(loader, plan, first_batch, read_ahead=prefetch > 0)
        self._source: Any = _Background(produce, prefetch, "hpctrain-prefetch") if prefetch > 0 else produce()

    def __iter__(self) -> "EpochIterator":
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise StopIteration
        try:
            x, y, w = next(self._source)
        except BaseException:  # StopIteration at the end of the epoch, or a read error
            self.close()
            raise
        if self._device.type != "cpu":
            x, y = x.to(self._device, non_blocking=True), y.to(self._device, non_blocking=True)
            w = None if w is None else w.to(self._device, non_blocking=True)
        loader = self._loader()
        if loader is not None:
            loader._yielded(self)
        return Batch(x, y, w)

    def close(self) -> None:
        """Stop reading ahead and close the shard files; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._source.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass
