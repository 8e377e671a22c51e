"""ShardLoader: one global sample order per epoch, whatever the world size; each rank serves its part.

One epoch of the train split, for a given (seed, epoch), is defined once for the dataset:

1. The split's rows are cut into contiguous blocks of ``block_rows`` (the last block of
   each shard is shorter). The order of the blocks is shuffled with an rng of
   (seed, epoch).
2. The row sequence this gives is cut into ``streams`` (S, ``data.streams``) contiguous
   streams. Global batch k of G rows (G = world size x batch size) takes the next
   floor((p+1)G/S) - floor(pG/S) rows of each stream p, streams in order.
3. Streams advance in rounds of K = max(1, block_rows * buffer_blocks // G) global
   batches; the rows of each stream's part of a round are shuffled (the round's permutation
   from an rng of (seed, epoch, stream)) before they are dealt out to the K batches.
4. ``remainder="drop"`` rounds the last global batch down to a multiple of S (fewer than
   S rows are left out); ``"pad"`` rounds it up (at most to G), wrapping to the start of
   the sequence.

Nothing above depends on the number of ranks R, only on G and S. Rank r of R (R must
divide S) serves streams [rS/R, (r+1)S/R): its batch k is rows [rB, (r+1)B) of global
batch k. It reads only its streams, contiguous runs of the block sequence, one HDF5
slice per block piece. Every global batch is a multiple of R rows, so every rank yields
the same number of batches of the same sizes, and global batch k is the same rows in the
same order for every R dividing S.

Eval splits are cut into contiguous shares of all rows in file order (nothing dropped;
shares differ by at most one row). A round's shuffle depends only on its stream and index,
so a loader restored with ``load_state_dict`` starts reading at the round of the next batch
and yields exactly the rows that were left, on any world size that keeps G and S.

A split of at most ``RESIDENT_BYTES`` is read from its files once, by the first epoch, and
kept in memory (``ResidentReader``); its epochs follow the same plans, filled from memory in
the calling thread without prefetch threads. The batches are the same, bit for bit.
"""
from __future__ import annotations

import bisect
import collections
import functools
import math
import os
import queue
import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, NamedTuple, Optional

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .shards import Dataset, ShardReader, ceil_div, open_dataset, standardization

STATE_FORMAT = 2
# Loader settings that fix a train epoch's global order: a saved position means nothing under
# other values. The world size is not one of them (eval splits add it, see _plan_keys).
PLAN_KEYS = ("split", "partition", "global_batch", "streams", "seed", "rows", "remainder", "block_rows",
             "buffer_blocks", "shuffle", "order_version")
# How the shuffles are drawn from (seed, epoch). 2: torch generators seeded from one
# SeedSequence per epoch; 1 (saved without the key): a numpy Generator per stream.
ORDER_VERSION = 2
DEFAULT_STREAMS = 8
_BLOCK_SALT = 0xB10C  # keeps the block order and the round shuffles on separate rng streams
_BUFFER_SALT = 0x5EED
# A split this small is read from its files once and kept in memory, and its epochs are cut
# in the calling thread: per epoch, opening the files and starting reader threads would cost
# more than reading the rows.
RESIDENT_BYTES = 32 << 20
# Threads that read and gather a loader's rows when it feeds a GPU (``threads`` 0, the default).
# On an H200 node (docs/benchmarks.md) one thread gave 3.2 M rows/s of 256 features, 4 and 8
# threads 4.4 and 4.3 M: four, because each thread beyond them only adds contention for the
# GIL with the training thread. A CPU run keeps to one: its cores are the training step's.
AUTO_GPU_THREADS = 4
EVAL_BATCH_ROWS, EVAL_BATCH_BYTES = 8192, 4 << 20  # eval_batch_size's bounds
# Round buffers kept for reuse, per pool: the round being filled, those queued between threads,
# one a blocked hand-over holds, the one in use (being taken from, or whose batches are being
# trained on or copied to a GPU), and one to spare.
_POOL_BUFFERS = 6
# torch runs an elementwise op of fewer elements than this (its grain size) on the calling
# thread without waking its thread pool.
_INLINE_ELEMENTS = 32768


class Batch(NamedTuple):
    x: torch.Tensor  # float32 [b, F]
    y: torch.Tensor  # int64 [b] (binary, multiclass) or float32 [b, K] (regression)
    w: Optional[torch.Tensor]  # float32 [b], or None when the shards hold no weights


# --------------------------------------------------------------------------- the global order (pure numpy)


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


def derived_seeds(entropy: list[int], count: int) -> list[int]:
    """``count`` independent 64-bit seeds from one SeedSequence of ``entropy``: seeding one
    numpy Generator per stream cost more than permuting a small split's rows."""
    return np.random.SeedSequence(entropy).generate_state(count, np.uint64).tolist()


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def permutation(gen: torch.Generator, n: int) -> np.ndarray:
    """A permutation of range(n) drawn from ``gen``: torch's randperm, about twice as fast as
    numpy's, and called without holding the GIL."""
    return torch.randperm(n, generator=gen).numpy()


def block_order(blocks: np.ndarray, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return blocks
    gen = seeded_generator(derived_seeds([seed, epoch, _BLOCK_SALT], 1)[0])
    return blocks[permutation(gen, len(blocks))]


def slice_segments(segments: list, ends: list[int], start: int, stop: int) -> list[list[int]]:
    """The pieces of ``segments`` [shard, start, stop] (laid end to end; ``ends`` their
    cumulative ends) covering [start, stop). Python lists: a round cuts only a few pieces,
    and numpy's per-call cost was most of a small split's epoch order."""
    if stop <= start:
        return []
    first, last = bisect.bisect_right(ends, start), bisect.bisect_left(ends, stop)
    out = [list(seg) for seg in segments[first:last + 1]]
    out[0][1] += start - (ends[first] - (segments[first][2] - segments[first][1]))
    out[-1][2] -= ends[last] - stop
    return out


def sequence_segments(blocks: list, ends: list[int], start: int, stop: int) -> list[list[int]]:
    """Segments [shard, start, stop] of positions [start, stop) of the block sequence, wrapping
    past its end (``pad``)."""
    total = ends[-1] if ends else 0
    pieces: list[list[int]] = []
    while start < stop and total:
        offset = start % total
        take = min(stop - start, total - offset)
        pieces += slice_segments(blocks, ends, offset, offset + take)
        start += take
    return pieces


def _segment_array(segments: list[list[int]]) -> np.ndarray:
    return np.array(segments, dtype=np.int64).reshape(-1, 3)


def _block_ends(blocks: np.ndarray) -> tuple[list, list[int]]:
    """The blocks as lists of [shard, start, stop], and their cumulative ends."""
    return blocks.tolist(), np.cumsum(blocks[:, 2] - blocks[:, 1]).tolist()


def stream_shares(rows: int, streams: int) -> np.ndarray:
    """Rows each stream gives to a global batch of ``rows``: floor((p+1)rows/S) - floor(p rows/S)."""
    return np.diff(np.arange(streams + 1, dtype=np.int64) * rows // streams)


class GlobalOrder:
    """How one epoch's global batches draw on the streams: a function of the split's rows, the
    global batch G, the stream count S, the remainder policy and the round window only."""

    def __init__(self, rows: int, global_batch: int, streams: int, remainder: str, window_rows: int):
        self.global_batch, self.streams = global_batch, streams
        self.full_batches, rest = divmod(rows, global_batch)
        if remainder == "drop":
            self.last_rows = rest - rest % streams
        else:
            self.last_rows = min(ceil_div(rest, streams) * streams, global_batch)
        self.batches = self.full_batches + (self.last_rows > 0)
        share, last_share = stream_shares(global_batch, streams), stream_shares(self.last_rows, streams)
        lengths = self.full_batches * share + last_share
        # Python ints: a round's plan does a few dozen sums with them, where numpy scalars cost more
        self.share, self.last_share = share.tolist(), last_share.tolist()
        self.stream_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64).tolist()
        self.round_batches = max(1, window_rows // global_batch)
        self.rounds = ceil_div(self.batches, self.round_batches)

    def batch_rows(self, k: int) -> int:
        return self.global_batch if k < self.full_batches else self.last_rows

    def round_span(self, j: int) -> tuple[int, int]:
        """Global batches [first, stop) of round ``j``."""
        first = j * self.round_batches
        return first, min(first + self.round_batches, self.batches)

    def stream_rows(self, p: int, first: int, stop: int) -> tuple[int, int]:
        """Positions [a, b) in the block sequence of stream ``p``'s rows of global batches [first, stop)."""
        def taken(k: int) -> int:
            return min(k, self.full_batches) * self.share[p] + (self.last_share[p] if k > self.full_batches else 0)
        return self.stream_start[p] + taken(first), self.stream_start[p] + taken(stop)


class Round(NamedTuple):
    segments: np.ndarray  # [shard, start, stop] of the rows to read, in buffer order
    order: Optional[np.ndarray]  # buffer positions in batch order; None: batches are the buffer as read
    batch_rows: list[int]  # this rank's rows of each batch of the round


class StreamPlan:
    """One rank's part of a train epoch: its streams of a GlobalOrder, round by round."""

    def __init__(self, order: GlobalOrder, blocks: np.ndarray, rank: int, world_size: int, seed: int,
                 epoch: int, shuffle: bool):
        per = order.streams // world_size
        self.global_order, self.world_size = order, world_size
        self.streams = range(rank * per, (rank + 1) * per)
        self.blocks, self.ends = _block_ends(blocks)
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.batches, self.round_batches, self.rounds = order.batches, order.round_batches, order.rounds
        self.gathers = shuffle or per > 1
        self._seeds = derived_seeds([seed, epoch, _BUFFER_SALT], order.streams) if shuffle else []
        self._generators: dict[int, tuple] = {}  # stream: (its generator, rounds drawn)
        self.rows = (order.full_batches * order.global_batch + order.last_rows) // world_size

    def round(self, j: int) -> Round:
        first, stop = self.global_order.round_span(j)
        segments, positions, offset = [], [], 0
        for p in self.streams:
            a, b = self.global_order.stream_rows(p, first, stop)
            segments += sequence_segments(self.blocks, self.ends, a, b)
            positions.append(offset + (self._shuffle(p, j, b - a) if self.shuffle else np.arange(b - a)))
            offset += b - a
        rows = [self.global_order.batch_rows(k) // self.world_size for k in range(first, stop)]
        order = self._batch_major(positions, first, stop) if self.gathers else None
        return Round(_segment_array(segments), order, rows)

    def _shuffle(self, stream: int, round_index: int, n: int) -> np.ndarray:
        """The shuffle of a stream's rows of a round: the round's permutation drawn from the
        stream's generator of the epoch. One generator per stream and epoch, not per round, as
        seeding one costs about as much as permuting a round. Rounds come in order; a resumed
        epoch first draws the permutations of the rounds already done."""
        gen, done = self._generators.get(stream, (None, 0))
        if gen is None or done > round_index:
            gen, done = seeded_generator(self._seeds[stream]), 0
        for j in range(done, round_index):
            a, b = self.global_order.stream_rows(stream, *self.global_order.round_span(j))
            permutation(gen, b - a)
        self._generators[stream] = (gen, round_index + 1)
        return permutation(gen, n)

    def _batch_major(self, positions: list[np.ndarray], first: int, stop: int) -> np.ndarray:
        """Interleave the streams' rows so that each batch is one contiguous run: stream p's
        share of batch 1, stream p+1's share of batch 1, ..., then batch 2."""
        full = max(0, min(stop, self.global_order.full_batches) - first)
        shares = [self.global_order.share[p] for p in self.streams]
        heads = [pos[:full * c].reshape(full, c) for pos, c in zip(positions, shares)]
        tails = [pos[full * c:] for pos, c in zip(positions, shares)]
        return np.concatenate([np.concatenate(heads, axis=1).reshape(-1)] + tails)


class ContiguousPlan:
    """One rank's contiguous share of an eval split, in file order: every row exactly once."""

    def __init__(self, blocks: np.ndarray, rows: int, rank: int, world_size: int, batch_size: int,
                 window_rows: int, seed: int, epoch: int, shuffle: bool):
        self.lo, hi = rank * rows // world_size, (rank + 1) * rows // world_size
        self.rows, self.batch_size = hi - self.lo, batch_size
        self.blocks, self.ends = _block_ends(blocks)
        self.seed, self.epoch, self.rank, self.shuffle = seed, epoch, rank, shuffle
        self.batches = ceil_div(self.rows, batch_size)
        self.round_batches = max(1, window_rows // batch_size)
        self.rounds = ceil_div(self.batches, self.round_batches)
        self.gathers = shuffle

    def round(self, j: int) -> Round:
        first = j * self.round_batches
        stop = min(first + self.round_batches, self.batches)
        a, b = first * self.batch_size, min(stop * self.batch_size, self.rows)
        order = None
        if self.shuffle:
            seed = derived_seeds([self.seed, self.epoch, self.rank, j, _BUFFER_SALT], 1)[0]
            order = permutation(seeded_generator(seed), b - a)
        rows = [min(self.batch_size, self.rows - k * self.batch_size) for k in range(first, stop)]
        segments = sequence_segments(self.blocks, self.ends, self.lo + a, self.lo + b)
        return Round(_segment_array(segments), order, rows)


# --------------------------------------------------------------------------- the loader


class ShardLoader:
    """Batches of one split for one rank; see the module docstring for the epoch's order."""

    def __init__(self, path_or_dataset: Any, split: str = "train", batch_size: int = 1024, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, seed: int = 0, remainder: str = "drop",
                 block_rows: int = 4096, buffer_blocks: int = 8, prefetch: int = 4, standardize: bool = True,
                 limit_rows: Optional[int] = None, device: Any = torch.device("cpu"),
                 partition: Optional[str] = None, streams: int = DEFAULT_STREAMS, threads: int = 0):
        _check_args(batch_size, rank, world_size, remainder, block_rows, buffer_blocks, prefetch, limit_rows,
                    streams)
        if threads < 0:
            raise ValueError(f"threads: {threads}; expected >= 0 (0: automatic)")
        self.dataset: Dataset = open_dataset(path_or_dataset)
        self.split = split
        self.shards = self.dataset.shards(split)
        # Train batches follow the global order; eval reads every row once.
        self.partition = partition or ("equal" if split == "train" else "contiguous")
        if self.partition not in ("equal", "contiguous"):
            raise ValueError(f"partition: {self.partition!r}; expected 'equal' or 'contiguous'")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.seed, self.remainder = bool(shuffle), seed, remainder
        self.block_rows, self.buffer_blocks, self.prefetch = block_rows, buffer_blocks, prefetch
        self.standardize, self.streams = standardize, streams
        self.device = torch.device(device)
        self.threads = threads or auto_threads(self.device)
        self._blocks = natural_blocks([s.rows for s in self.shards], block_rows, limit_rows)
        self.rows = int((self._blocks[:, 2] - self._blocks[:, 1]).sum())
        self.global_batch = batch_size * world_size
        self._order = None
        if self.partition == "equal":
            _check_streams(streams, world_size)
            self._order = GlobalOrder(self.rows, self.global_batch, streams, remainder, self._window_rows)
            if self._order.batches == 0:
                raise DataError(f"{self.dataset.path}: split {split!r} has {self.rows} rows; expected at least "
                                f"one per stream (data.streams = {streams})")
        self.epoch = 0
        self.batches_done = 0  # batches handed out in the current epoch
        self._resume_pending = False
        self._active: Optional[weakref.ref] = None
        self._resident: Optional[ResidentReader] = None
        # Buffers outlive an epoch: fresh ones each epoch would cost their page faults again
        # (tens of milliseconds an epoch for a GPU's batches of 8 MB).
        self._pools: dict[tuple, _BufferPool] = {}
        self._scales: dict[torch.device, tuple] = {}
        self.resident = self.dataset.rows(split) * _row_bytes(self.meta) <= RESIDENT_BYTES

    @classmethod
    def from_config(cls, data_cfg: Any, split: str, *, rank: int, world_size: int, seed: int,
                    device: Any = torch.device("cpu"), shuffle: Optional[bool] = None) -> "ShardLoader":
        """A loader from ``hpctrain.config.DataConfig``; shuffles the train split only unless told.
        Eval splits go in batches of ``eval_batch_size``."""
        dataset = open_dataset(data_cfg.path)
        batch = rank_batch_size(data_cfg, world_size)
        if split != "train":
            batch = eval_batch_size(batch, dataset.meta)
        return cls(dataset, split=split, batch_size=batch, rank=rank,
                   world_size=world_size, shuffle=(split == "train") if shuffle is None else shuffle, seed=seed,
                   remainder=data_cfg.remainder, block_rows=data_cfg.block_rows,
                   buffer_blocks=data_cfg.buffer_blocks, prefetch=data_cfg.prefetch,
                   standardize=data_cfg.standardize, limit_rows=data_cfg.limit_rows, device=device,
                   streams=getattr(data_cfg, "streams", DEFAULT_STREAMS),
                   threads=getattr(data_cfg, "loader_threads", 0))

    @property
    def meta(self):
        return self.dataset.meta

    @property
    def _window_rows(self) -> int:
        return self.block_rows * self.buffer_blocks

    @property
    def rows_per_rank(self) -> int:
        return self.plan().rows

    def __len__(self) -> int:
        if self._order is not None:
            return self._order.batches
        return ceil_div(self.plan().rows, self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows; a restored position is kept
        when ``epoch`` is the restored one."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.batches_done = 0
            self._resume_pending = False

    def plan(self, epoch: Optional[int] = None) -> "StreamPlan | ContiguousPlan":
        """This rank's reading plan of ``epoch`` (default: the selected one)."""
        epoch = self.epoch if epoch is None else epoch
        blocks = block_order(self._blocks, self.seed, epoch, self.shuffle)
        if self._order is not None:
            return StreamPlan(self._order, blocks, self.rank, self.world_size, self.seed, epoch, self.shuffle)
        return ContiguousPlan(blocks, self.rows, self.rank, self.world_size, self.batch_size, self._window_rows,
                              self.seed, epoch, self.shuffle)

    # ----------------------------------------------------------------- iteration

    def __iter__(self) -> "EpochIterator":
        self.close()  # one live iteration per loader: a new one supersedes the old
        first = self.batches_done if self._resume_pending else 0
        self._resume_pending = False
        self.batches_done = first
        it = EpochIterator(self, self.plan(), first, 0 if self.resident else self.prefetch)
        self._active = weakref.ref(it)
        return it

    def scale_on(self, device: torch.device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(shift, factor) on ``device``, with x * factor + shift == (x - mean) / std; None
        without standardisation. Made once: every epoch, and every eval, uses them."""
        if not self.standardize:
            return None
        if device not in self._scales:
            mean, inv_std = standardization(self.meta)
            self._scales[device] = (torch.from_numpy(-mean * inv_std).to(device), torch.from_numpy(inv_std).to(device))
        return self._scales[device]

    def buffer_pool(self, role: str, shapes: tuple, pinned: bool) -> "_BufferPool":
        """The loader's pool of round buffers of these shapes for one stage (``role``), made on first use."""
        key = (role, shapes, pinned)
        if key not in self._pools:
            self._pools[key] = _BufferPool(functools.partial(_empty_arrays, shapes, pinned))
        return self._pools[key]

    def reader(self) -> "ShardReader | ResidentReader":
        """Where an epoch reads its rows: the files, or the split's rows kept in memory."""
        if not self.resident:
            return ShardReader(self.dataset, self.split)
        if self._resident is None:
            self._resident = ResidentReader(self.dataset, self.split)
        return self._resident

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
        return {"split": self.split, "partition": self.partition, "global_batch": self.global_batch,
                "streams": self.streams, "world_size": self.world_size, "batch_size": self.batch_size,
                "seed": self.seed, "rows": self.rows, "remainder": self.remainder, "block_rows": self.block_rows,
                "buffer_blocks": self.buffer_blocks, "shuffle": self.shuffle, "order_version": ORDER_VERSION}

    def _plan_keys(self) -> tuple[str, ...]:
        # An eval split's shares are cut per rank, so there the world size matters too.
        return PLAN_KEYS if self.partition == "equal" else PLAN_KEYS + ("world_size", "batch_size")

    def state_dict(self) -> dict:
        """The position: epoch and batches handed out, plus the settings that fix the order.

        Plain Python types only. A train loader's batch k is the same global batch on every
        rank and for every world size that keeps the global batch and the streams, so rank
        0's copy restores every rank of any such world.
        """
        return {"format": STATE_FORMAT, "epoch": self.epoch, "batches_done": self.batches_done,
                "batches_total": len(self), **self._plan_values()}

    def load_state_dict(self, state: dict, strict: bool = False) -> None:
        """Resume after batch ``batches_done`` of ``epoch`` on the next iteration.

        Under the same order settings (any world size dividing the streams, with the same
        global batch) the rows that follow are exactly those an uninterrupted epoch would have
        read. A position saved under other settings (another global batch, say) cannot be
        continued exactly: ``strict`` raises DataError naming the settings; otherwise a
        warning is issued and the epoch resumes at the same fraction of its batches.
        """
        if state.get("format") not in (1, STATE_FORMAT):  # format 1: a world-size dependent order
            raise DataError(f"loader state: format {state.get('format')!r}; expected {STATE_FORMAT}")
        self.close()
        mine = self._plan_values()
        differ = {k: (state.get(k), mine[k]) for k in self._plan_keys() if state.get(k) != mine[k]}
        done = int(state["batches_done"])
        if differ and done > 0:
            detail = ", ".join(f"{k} {a!r} saved, {b!r} now" for k, (a, b) in differ.items())
            message = f"loader state of split {self.split!r} was saved under other settings ({detail})"
            if strict:
                raise DataError(f"{message}; an exact mid-epoch resume needs the same global order")
            total = max(1, int(state.get("batches_total") or done))
            done = round(done * len(self) / total)
            warnings.warn(f"{message}: resuming at batch {done} of {len(self)}, the same fraction of the epoch; "
                          f"some rows of this epoch may be seen twice or not at all", stacklevel=2)
        self.epoch = int(state["epoch"])
        self.batches_done = min(done, len(self))
        self._resume_pending = True


def rank_batch_size(data_cfg: Any, world_size: int) -> int:
    """This rank's batch: ``data.global_batch_size`` / world size when set, else ``data.batch_size``."""
    total = getattr(data_cfg, "global_batch_size", None)
    if total is None:
        return data_cfg.batch_size
    if total % world_size:
        raise ConfigError(f"data.global_batch_size: {total} is not a multiple of the world size {world_size}; "
                          f"expected a global batch that every rank can take an equal share of")
    return total // world_size


def eval_batch_size(train_batch: int, meta) -> int:
    """Rows per batch of an eval split: the train batch, or more, up to EVAL_BATCH_ROWS rows
    and EVAL_BATCH_BYTES of rows. Evaluation keeps no autograd graph, so a larger batch costs
    little memory and saves each batch's fixed cost: a small val split is one forward pass."""
    return max(train_batch, min(EVAL_BATCH_ROWS, EVAL_BATCH_BYTES // _row_bytes(meta)))


def auto_threads(device: torch.device) -> int:
    """Reading threads for ``threads: 0``: one on the CPU, up to AUTO_GPU_THREADS for a GPU,
    never more than the CPUs this process may run on (Slurm's binding, taskset)."""
    if device.type == "cpu":
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(AUTO_GPU_THREADS, cpus))


def _check_streams(streams: int, world_size: int) -> None:
    if streams % world_size:
        raise ConfigError(f"data.streams: {streams} streams cannot be shared by {world_size} ranks; the world size "
                          f"must divide data.streams (the epoch's order is defined over the streams). Use a world "
                          f"size that divides {streams}, or set data.streams to a multiple of {world_size} such as "
                          f"{math.lcm(streams, world_size)} (another order: runs on other world sizes then match it "
                          f"only if they use the same value)")


def _check_args(batch_size, rank, world_size, remainder, block_rows, buffer_blocks, prefetch, limit_rows,
                streams) -> None:
    if min(batch_size, block_rows, buffer_blocks, streams) < 1 or prefetch < 0:
        raise ValueError(f"batch_size, block_rows, buffer_blocks, streams must be >= 1 and prefetch >= 0; got "
                         f"{batch_size}, {block_rows}, {buffer_blocks}, {streams}, {prefetch}")
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

    Two stages: reading a round's rows from the files into a buffer, and taking the rows in
    batch order into the round's served buffer, standardised, whose views are the batches.
    With ``read_ahead`` the reading runs in a thread of its own, one round ahead: its preadv
    calls release the GIL, so reading overlaps the taking. With the loader's ``threads`` > 1
    each stage cuts its work into that many pieces run side by side (``_Pieces``); the bytes
    are the same either way.

    Work is done a round at a time, not a batch at a time: one numpy take, one hand-over
    between threads and one pooled buffer per round, where per-batch calls and hand-overs
    cost more than the rows themselves (docs/benchmarks.md, "Loader"). The read buffer never
    leaves the producer; the served buffer goes back to its pool once no batch cut from it is
    referenced anywhere (``_BufferPool.lend_tensors``), so a batch kept by the caller, saved
    by autograd or on its way to a GPU is never overwritten.
    """

    def __init__(self, loader: ShardLoader, plan: "StreamPlan | ContiguousPlan", first_batch: int,
                 read_ahead: bool, scale: Optional[tuple]):
        self.dataset, self.split, self.plan = loader.dataset, loader.split, plan
        self.open_reader = loader.reader
        self.first_batch, self.read_ahead = first_batch, read_ahead
        self.pieces = _Pieces(loader.threads, _row_bytes(loader.meta))
        shapes = _shapes(max(1, min(plan.round_batches * loader.batch_size, plan.rows)), loader.meta)
        self._read_pool = loader.buffer_pool("read", shapes, pinned=False)
        # Page-locked for a GPU, so that the copies to it run asynchronously.
        self._served_pool = loader.buffer_pool("served", shapes, pinned=loader.device.type == "cuda")
        self.scale = scale  # (shift, factor) when the host standardises; see EpochIterator

    def __call__(self) -> Iterator[list]:
        rounds = _Background(self._read_rounds, 2, "hpctrain-read") if self.read_ahead else self._read_rounds()
        try:
            yield from self._batches(rounds)
        finally:
            rounds.close()
            self.pieces.close()

    def _read_rounds(self) -> Iterator[tuple]:
        """(round index, its plan, a pooled buffer of its rows read from the files) for each
        round left in the epoch; the consumer gives the buffer back."""
        plan = self.plan
        if self.first_batch >= plan.batches:
            return
        reader = self.open_reader()  # files open in the thread that reads
        try:
            for j in range(self.first_batch // plan.round_batches, plan.rounds):
                rnd = plan.round(j)
                raw = self._read_pool.lend()
                self._fill(reader, rnd.segments, raw)
                yield j, rnd, raw
        finally:
            reader.close()

    def _batches(self, rounds: Iterator[tuple]) -> Iterator[list]:
        """Each round's batches, as one list: the round's rows left to serve, taken in batch
        order into a served buffer all at once; each batch is a view of it."""
        for j, rnd, raw in rounds:
            first = j * self.plan.round_batches
            sizes = rnd.batch_rows[max(0, self.first_batch - first):]  # resumed: batches already trained on
            hi = sum(rnd.batch_rows)
            lo = hi - sum(sizes)
            try:
                rows = self._served_pool.lend_tensors()
                source = lo if rnd.order is None else rnd.order[lo:hi]
                arrays = tuple(None if t is None else t.numpy() for t in rows)
                self.pieces.run(functools.partial(self._take, source, raw, arrays, self.scale),
                                _cuts(0, hi - lo, self.pieces.parts(hi - lo)))
            finally:
                self._read_pool.give_back(raw)
            yield _cut_batches(rows, sizes)

    @staticmethod
    def _take(source: "np.ndarray | int", raw: tuple, out: tuple, scale: Optional[tuple], a: int, b: int) -> None:
        """Rows [a, b) of ``out`` from the round's rows, standardised with ``scale`` where given:
        the rows at positions ``source[a:b]``, or, where the round keeps its read order, the
        run that starts at row ``source``."""
        for dest, src in zip(out, raw):
            if dest is None:
                continue
            if isinstance(source, np.ndarray):
                # mode="clip" lets numpy write straight into dest (mode="raise" buffers a copy)
                src.take(source[a:b], axis=0, out=dest[a:b], mode="clip")
            else:
                dest[a:b] = src[source + a:source + b]
        if scale is not None:
            _standardize(out[0][a:b], scale)

    def _fill(self, reader: ShardReader, segments: np.ndarray, arrays: tuple) -> None:
        """A round's rows from the files into ``arrays``, in pieces of at most 1/threads of them."""
        jobs, offset = [], 0
        rows = max(1, int((segments[:, 2] - segments[:, 1]).sum()))
        most = ceil_div(rows, self.pieces.parts(rows))
        for shard, start, stop in segments.tolist():
            for a, b in _cuts(start, stop, ceil_div(stop - start, most)):
                jobs.append((shard, a, b, offset + a - start))
            offset += stop - start
        reader.open_shards(sorted({job[0] for job in jobs}))  # before the threads share the reader

        def read(shard: int, start: int, stop: int, at: int) -> None:
            n = stop - start
            reader.read(shard, start, stop, *(None if arr is None else arr[at:at + n] for arr in arrays))

        self.pieces.run(read, jobs)


def _cut_batches(rows: tuple, sizes: list[int]) -> list[tuple]:
    """The batches (x, y, w) of ``sizes`` rows from the start of a served buffer's tensors
    (a resumed round leaves its last rows unused): one torch split per tensor, where
    slicing each batch cost a Python call per batch and tensor."""
    total = sum(sizes)
    x, y, w = (None if t is None else t[:total].split(sizes) for t in rows)
    return list(zip(x, y, w if w is not None else [None] * len(sizes)))


def _standardize(x: np.ndarray, scale: tuple) -> None:
    """x = (x - mean) / std in place, as x * factor + shift with ``scale`` = (shift, factor),
    in slices small enough for torch to run each on the calling thread: a larger op wakes a
    team of torch threads per calling thread, which competes with the training step."""
    xt = torch.from_numpy(x)
    step = max(1, _INLINE_ELEMENTS // max(1, x.shape[1]))
    for a in range(0, len(x), step):
        torch.addcmul(scale[0], xt[a:a + step], scale[1], out=xt[a:a + step])


def _shapes(n: int, meta) -> tuple:
    """(shape, dtype) of x, y and, with sample weights, w for ``n`` rows."""
    y_dtype = np.float32 if meta.task == "regression" else np.int64
    y_tail = (meta.n_targets,) if meta.task == "regression" else ()
    shapes = [((n, meta.n_features), np.float32), ((n,) + y_tail, y_dtype)]
    if meta.has_weights:
        shapes.append(((n,), np.float32))
    return tuple(shapes)


def _empty_arrays(shapes: tuple, pinned: bool) -> tuple:
    """Empty x, y, w arrays (w None without weights); page-locked (pinned) for a GPU, so that
    the copy to it runs asynchronously."""
    if pinned:
        arrays = [torch.empty(shape, dtype=_TORCH_DTYPES[np.dtype(dt)], pin_memory=True).numpy()
                  for shape, dt in shapes]
    else:
        arrays = [np.empty(shape, dtype=dt) for shape, dt in shapes]
    return tuple(arrays) + ((None,) if len(shapes) == 2 else ())


def _cuts(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) in ``parts`` contiguous pieces of near-equal length (fewer when it is shorter)."""
    parts = max(1, min(parts, hi - lo))
    return [(lo + (hi - lo) * i // parts, lo + (hi - lo) * (i + 1) // parts) for i in range(parts)]


class _Pieces:
    """Runs the pieces of one unit of work (a round's reads, or its take) on ``threads``
    threads, the calling thread one of them, and returns when all are done. The pieces
    write to disjoint rows and spend their time in preadv and numpy's take, which release
    the GIL, and torch ops small enough to run on the calling thread (_standardize)."""

    MIN_PIECE_BYTES = 256 << 10  # below this, handing a piece to a thread costs more than it saves

    def __init__(self, threads: int, row_bytes: int):
        self.threads = max(1, threads)
        self.min_rows = max(1, self.MIN_PIECE_BYTES // max(1, row_bytes))
        self._pool = ThreadPoolExecutor(self.threads - 1, "hpctrain-pieces") if self.threads > 1 else None

    def parts(self, rows: int) -> int:
        """How many pieces ``rows`` rows are cut into."""
        return max(1, min(self.threads, rows // self.min_rows))

    def run(self, fn: Callable[..., None], jobs: list[tuple]) -> None:
        if self._pool is None or len(jobs) < 2:
            for job in jobs:
                fn(*job)
            return
        futures = [self._pool.submit(fn, *job) for job in jobs[1:]]
        try:
            fn(*jobs[0])
        finally:
            for future in futures:
                future.result()  # raises a piece's error, after every piece has ended

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _row_bytes(meta) -> int:
    targets = meta.n_targets if meta.task == "regression" else 2  # regression: float32 each; else one int64
    return 4 * (meta.n_features + targets + (1 if meta.has_weights else 0))


class ResidentReader:
    """A split's rows, read once from its files into memory, with ShardReader's ``read``."""

    def __init__(self, dataset: Dataset, split: str):
        files = ShardReader(dataset, split)
        self.parts: list[tuple] = []
        meta = dataset.meta
        y_shape, y_dtype = ((meta.n_targets,), np.float32) if meta.task == "regression" else ((), np.int64)
        try:
            for index, info in enumerate(files.shards):
                x = np.empty((info.rows, meta.n_features), np.float32)
                y = np.empty((info.rows,) + y_shape, y_dtype)
                w = np.empty(info.rows, np.float32) if meta.has_weights else None
                files.read(index, 0, info.rows, x, y, w)
                self.parts.append((x, y, w))
        finally:
            files.close()

    def read(self, shard: int, start: int, stop: int, x_out: np.ndarray, y_out: np.ndarray,
             w_out: Optional[np.ndarray] = None) -> None:
        n = stop - start
        x, y, w = self.parts[shard]
        x_out[:n], y_out[:n] = x[start:stop], y[start:stop]
        if w_out is not None and w is not None:
            w_out[:n] = w[start:stop]

    def open_shards(self, shards: list[int]) -> None:
        """Nothing to open: the rows are in memory."""

    def close(self) -> None:
        """Nothing to close: the rows stay for the next epoch."""


_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.int64): torch.int64}


class _BufferPool:
    """Sets of x, y, w arrays reused from round to round.

    Reuse keeps the loader's memory a fixed handful of buffers, whatever the allocator does
    with memory freed in another thread, and spares the page faults of fresh multi-megabyte
    allocations. A set is made whenever none is free, and at most ``keep`` are kept.

    ``lend``/``give_back`` serve a buffer that its borrower alone uses. ``lend_tensors``
    serves one whose rows leave the loader as batches: the caller, autograd's saved inputs or
    a pending copy to a GPU may hold a batch as long as they like. Those tensors are made from
    fresh numpy views of the set, one per array, and a weak reference to each view sees it
    freed when the last tensor that shares its memory is gone; then the set is free again.
    """

    def __init__(self, make: Callable[[], tuple], keep: int = _POOL_BUFFERS):
        self._make, self._keep = make, keep
        self._free: collections.deque = collections.deque()  # given back from other threads
        # The weak references of lent tensors, by id, alive until they fire (a weak reference
        # hashes as its array, which cannot be hashed).
        self._watches: dict = {}
        self._lock = threading.Lock()

    def lend(self) -> tuple:
        try:
            return self._free.pop()
        except IndexError:
            return self._make()

    def give_back(self, arrays: tuple) -> None:
        if len(self._free) < self._keep:
            self._free.append(arrays)

    def lend_tensors(self) -> tuple:
        """A set as torch tensors (None stays None); it returns to the pool by itself once
        every tensor sharing its memory has been freed."""
        arrays = self.lend()
        views = [a[:] for a in arrays if a is not None]
        left = [len(views)]

        def freed(watch: weakref.ref) -> None:
            with self._lock:
                self._watches.pop(id(watch), None)
                left[0] -= 1
                done = left[0] == 0
            if done:
                self.give_back(arrays)

        with self._lock:
            for view in views:
                watch = weakref.ref(view, freed)
                self._watches[id(watch)] = watch
        tensors = iter([torch.from_numpy(v) for v in views])
        return tuple(None if a is None else next(tensors) for a in arrays)


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


def _background_worker(produce: Callable[[], Iterator[Any]], q: queue.Queue, stop: threading.Event) -> None:
    gen = None
    try:
        gen = produce()
        for item in gen:
            if not _put(q, stop, item):
                return
        _put(q, stop, _END)
    except BaseException as e:  # surfaces in the consumer: a failed read must never leave it waiting
        _put(q, stop, _Failure(e))
    finally:
        if gen is not None:
            gen.close()  # runs the generator's cleanup (closing shard files) in this thread


class _Background:
    """Runs a generator in a daemon thread, up to ``depth`` items ahead; iterating this object
    yields the items in order and re-raises the generator's error. Every hand-over between
    two Python threads costs a GIL switch, so items should be large: rounds, not batches."""

    def __init__(self, produce: Callable[[], Iterator[Any]], depth: int, name: str):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_background_worker, args=(produce, self._queue, self._stop),
                                        name=name, daemon=True)
        self._thread.start()

    def __iter__(self) -> "_Background":
        return self

    def __next__(self) -> Any:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise DataError(f"the data loader's {self._thread.name} thread stopped without a result") from None
        if isinstance(item, _Failure):
            raise item.error
        if item is _END:
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)


class EpochIterator:
    """Iterates one epoch; with ``prefetch`` > 0 background threads read ahead."""

    def __init__(self, loader: ShardLoader, plan: "StreamPlan | ContiguousPlan", first_batch: int, prefetch: int):
        self._loader = weakref.ref(loader)
        self._device = loader.device
        self._closed = False
        # Host batches whose non-blocking copies to the device may still be queued, each with
        # an event recorded after its copies: holding a batch keeps its pooled buffer from
        # being refilled until the device has read it.
        self._in_flight: collections.deque = collections.deque()
        # A GPU loader standardises on the GPU, after the copy: a torch op in the producer's
        # thread wakes a team of torch threads that competes with the training step's, and on
        # a 16-core H200 node that cost more than reading the rows.
        scale = loader.scale_on(self._device)
        on_host = self._device.type == "cpu"
        self._scale = None if on_host else scale
        produce = _BatchProducer(loader, plan, first_batch, read_ahead=prefetch > 0, scale=scale if on_host else None)
        # Rounds come whole; with prefetch, at least ``prefetch`` batches are ready ahead.
        rounds_ahead = ceil_div(prefetch, plan.round_batches)
        self._rounds: Any = _Background(produce, rounds_ahead, "hpctrain-prefetch") if prefetch > 0 else produce()
        self._ready: collections.deque = collections.deque()  # the current round's batches left

    def __iter__(self) -> "EpochIterator":
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise StopIteration
        try:
            while not self._ready:
                self._ready.extend(next(self._rounds))
        except BaseException:  # StopIteration at the end of the epoch, or a read error
            self.close()
            raise
        x, y, w = self._ready.popleft()
        if self._device.type != "cpu":
            x, y, w = self._to_device(x, y, w)
        loader = self._loader()
        if loader is not None:
            loader._yielded(self)
        return Batch(x, y, w)

    def _to_device(self, x, y, w):
        while self._in_flight and self._in_flight[0][0].query():
            self._in_flight.popleft()  # copied: its buffer may be refilled
        host = (x, y, w)
        x, y = x.to(self._device, non_blocking=True), y.to(self._device, non_blocking=True)
        w = None if w is None else w.to(self._device, non_blocking=True)
        if self._scale is not None:
            torch.addcmul(self._scale[0], x, self._scale[1], out=x)  # a fresh tensor: in place is safe
        if self._device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._in_flight.append((event, host))
        return x, y, w

    def close(self) -> None:
        """Stop reading ahead and close the shard files; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for event, _ in self._in_flight:
            event.synchronize()
        self._in_flight.clear()
        self._ready.clear()
        self._rounds.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass
