"""The HDF5 shard format: a dataset folder, its meta.json, reading and validation.

A dataset is a folder::

    meta.json                  format version, task, features, row counts, train-only
                               mean/std, and each shard's file, row count and sha256
    train/part-00000.h5 ...    shards: x float32 [n, F], y int64 [n] (binary, multiclass)
    val/part-00000.h5 ...              or float32 [n, K] (regression), optional w float32 [n]
    test/part-00000.h5 ...

Every problem is a DataError that names the file. Readers open shard files read-only and
lazily, in the thread that reads, so no HDF5 handle crosses a fork.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import DataError

FORMAT_NAME = "hpctrain-shards"
FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val", "test")
TASKS = ("binary", "multiclass", "regression")
CHUNK_BYTES = 1 << 20  # HDF5 chunk size target: large enough for fast slices, small enough to cache


# --------------------------------------------------------------------------- meta


@dataclass(frozen=True)
class ShardInfo:
    split: str
    index: int
    file: str  # relative to the dataset folder, e.g. "train/part-00000.h5"
    path: Path
    rows: int
    sha256: str


@dataclass
class Meta:
    task: str
    n_features: int
    n_classes: int  # 2 for binary, C for multiclass, 0 for regression
    n_targets: int  # K for regression, 1 otherwise
    feature_names: list[str]
    mean: list[float]
    std: list[float]
    rows: dict[str, int]
    has_weights: bool = False
    target_names: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    source: dict = field(default_factory=dict)
    # The shape of one row's features for the model (e.g. [1, 8, 8] images); shards store rows flat.
    feature_shape: list[int] = field(default_factory=list)

    @property
    def row_shape(self) -> list[int]:
        return list(self.feature_shape) or [self.n_features]

    def to_json(self, shards: dict[str, list[ShardInfo]]) -> dict:
        return {
            "format": FORMAT_NAME, "format_version": self.format_version, "task": self.task,
            "n_features": self.n_features, "n_classes": self.n_classes, "n_targets": self.n_targets,
            "feature_names": list(self.feature_names), "target_names": list(self.target_names),
            "class_names": list(self.class_names), "has_weights": self.has_weights,
            "feature_shape": self.row_shape,
            "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std],
            "rows": {s: int(self.rows.get(s, 0)) for s in SPLITS},
            "shards": {s: [{"file": i.file, "rows": i.rows, "sha256": i.sha256} for i in shards.get(s, [])]
                       for s in SPLITS},
            "source": self.source,
        }


def _require(d: dict, key: str, kind: Any, where: Path) -> Any:
    if key not in d:
        raise DataError(f"{where}: missing key {key!r}")
    value = d[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise DataError(f"{where}: {key} must be an integer, got {value!r}")
    if kind is not int and not isinstance(value, kind):
        raise DataError(f"{where}: {key} has the wrong type ({type(value).__name__})")
    return value


def _feature_shape(value: Any, n_features: int, where: Path) -> list[int]:
    if value is None:
        return []
    if (not isinstance(value, list) or not value
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in value)):
        raise DataError(f"{where}: feature_shape {value!r}: expected a list of positive integers such as [1, 8, 8]")
    if math.prod(value) != n_features:
        raise DataError(f"{where}: feature_shape {value} holds {math.prod(value)} values; expected "
                        f"n_features = {n_features}")
    return [] if len(value) == 1 else list(value)


def parse_meta(raw: Any, folder: Path) -> tuple[Meta, dict[str, list[ShardInfo]]]:
    """Validate a meta.json mapping; every error names the meta.json file."""
    where = folder / META_FILE
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object")
    version = raw.get("format_version")
    if raw.get("format") != FORMAT_NAME or version is None:
        raise DataError(f"{where}: not an hpctrain dataset (expected \"format\": \"{FORMAT_NAME}\" "
                        f"and a format_version)")
    if version != FORMAT_VERSION:
        raise DataError(f"{where}: format_version {version!r} is not supported; expected {FORMAT_VERSION} "
                        f"(re-create the dataset with this hpctrain)")
    task = _require(raw, "task", str, where)
    if task not in TASKS:
        raise DataError(f"{where}: task {task!r} is not one of {', '.join(TASKS)}")
    n_features = _require(raw, "n_features", int, where)
    if n_features < 1:
        raise DataError(f"{where}: n_features must be >= 1, got {n_features}")
    meta = Meta(
        task=task, n_features=n_features,
        n_classes=_require(raw, "n_classes", int, where), n_targets=_require(raw, "n_targets", int, where),
        feature_names=list(_require(raw, "feature_names", list, where)),
        mean=[float(v) for v in _require(raw, "mean", list, where)],
        std=[float(v) for v in _require(raw, "std", list, where)],
        rows={s: int(n) for s, n in _require(raw, "rows", dict, where).items()},
        has_weights=bool(raw.get("has_weights", False)),
        target_names=list(raw.get("target_names", [])), class_names=list(raw.get("class_names", [])),
        format_version=version, source=dict(raw.get("source") or {}),
        feature_shape=_feature_shape(raw.get("feature_shape"), n_features, where),
    )
    for key in ("feature_names", "mean", "std"):
        if len(getattr(meta, key)) != n_features:
            raise DataError(f"{where}: {key} has {len(getattr(meta, key))} entries; expected n_features = {n_features}")
    if task == "regression" and meta.n_targets < 1:
        raise DataError(f"{where}: n_targets must be >= 1 for regression, got {meta.n_targets}")
    if task != "regression" and meta.n_classes < 2:
        raise DataError(f"{where}: n_classes must be >= 2 for {task}, got {meta.n_classes}")
    shards = _parse_shards(_require(raw, "shards", dict, where), folder, meta, where)
    return meta, shards


def _parse_shards(raw: dict, folder: Path, meta: Meta, where: Path) -> dict[str, list[ShardInfo]]:
    shards: dict[str, list[ShardInfo]] = {}
    for split in SPLITS:
        entries = raw.get(split, [])
        infos = []
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get("file"), str) or not isinstance(e.get("rows"), int):
                raise DataError(f"{where}: shards.{split}[{i}] must have a file name and a row count")
            rel = e["file"]
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise DataError(f"{where}: shards.{split}[{i}].file {rel!r} must be a path inside the dataset folder")
            infos.append(ShardInfo(split, i, rel, folder / rel, e["rows"], str(e.get("sha256", ""))))
        total = sum(s.rows for s in infos)
        if total != meta.rows.get(split, 0):
            raise DataError(f"{where}: rows.{split} is {meta.rows.get(split, 0)} but its shards hold {total} rows")
        shards[split] = infos
    return shards


# --------------------------------------------------------------------------- shard files


def h5_open(path: Path, mode: str = "r"):
    """Open an HDF5 file. Read-only opens skip file locking, which network filesystems often
    lack, and the chunk cache: blocks are read once each, in shuffled order, and a cache then
    only costs a second copy (uncached partial-chunk reads measured about 2x faster)."""
    import h5py

    if mode == "r":
        try:
            return h5py.File(path, "r", locking=False, rdcc_nbytes=0)
        except TypeError:  # h5py built against an HDF5 without the locking switch
            return h5py.File(path, "r", rdcc_nbytes=0)
    return h5py.File(path, mode)


def expected_y(meta: Meta) -> tuple[np.dtype, tuple[int, ...]]:
    """dtype and per-row shape of y for the dataset's task."""
    if meta.task == "regression":
        return np.dtype(np.float32), (meta.n_targets,)
    return np.dtype(np.int64), ()


def check_shard_file(info: ShardInfo, meta: Meta) -> None:
    """Open one shard and check its version, datasets, shapes and dtypes against meta.json."""
    path = info.path
    if not path.is_file():
        raise DataError(f"{path}: shard file is missing (listed in {META_FILE})")
    try:
        f = h5_open(path)
    except OSError as e:
        raise DataError(f"{path}: cannot open the shard as HDF5 (truncated or corrupt file?): {e}") from None
    try:
        check_shard_contents(f, info, meta)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise DataError(f"{path}: unreadable shard: {e}") from None
    finally:
        f.close()


def check_shard_contents(f: Any, info: ShardInfo, meta: Meta) -> None:
    path = info.path
    version = f.attrs.get("format_version")
    if version is None or int(version) != FORMAT_VERSION:
        raise DataError(f"{path}: shard format_version is {version!r}; expected {FORMAT_VERSION}")
    for name in ("x", "y") + (("w",) if meta.has_weights else ()):
        if name not in f:
            raise DataError(f"{path}: no dataset {name!r} in the shard")
    x, y = f["x"], f["y"]
    if x.ndim != 2 or x.dtype != np.float32:
        raise DataError(f"{path}: x is {x.dtype} with shape {x.shape}; expected float32 [rows, {meta.n_features}]")
    if x.shape[1] != meta.n_features:
        raise DataError(f"{path}: x has {x.shape[1]} features; {META_FILE} says n_features = {meta.n_features}")
    if x.shape[0] != info.rows:
        raise DataError(f"{path}: x has {x.shape[0]} rows; {META_FILE} says {info.rows}")
    dtype, tail = expected_y(meta)
    if y.dtype != dtype or y.shape != (info.rows,) + tail:
        raise DataError(f"{path}: y is {y.dtype} with shape {y.shape}; expected {dtype} {(info.rows,) + tail} "
                        f"for task {meta.task}")
    if meta.has_weights:
        w = f["w"]
        if w.dtype != np.float32 or w.shape != (info.rows,):
            raise DataError(f"{path}: w is {w.dtype} with shape {w.shape}; expected float32 ({info.rows},)")


def inspect_shard(info: ShardInfo, meta: Meta, *, checksum: bool = True) -> None:
    """Everything ``hpctrain data inspect`` checks in one shard: the header (as at open), the
    sha256 recorded in meta.json, label range and finite values. DataError names the file."""
    check_shard_file(info, meta)
    if checksum and info.sha256:
        actual = file_sha256(info.path)
        if actual != info.sha256:
            raise DataError(f"{info.path}: sha256 checksum mismatch (file {actual[:16]}..., {META_FILE} "
                            f"{info.sha256[:16]}...): the file is corrupt or was changed after conversion")
    try:
        with h5_open(info.path) as f:
            step = max(1, (64 << 20) // max(1, 4 * meta.n_features))
            for start in range(0, info.rows, step):
                _check_values(info, meta, start, f["x"][start:start + step], f["y"][start:start + step],
                              f["w"][start:start + step] if meta.has_weights else None)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise DataError(f"{info.path}: unreadable shard: {e}") from None


def _check_values(info: ShardInfo, meta: Meta, start: int, x: np.ndarray, y: np.ndarray,
                  w: Optional[np.ndarray]) -> None:
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(bad):
        raise DataError(f"{info.path}: row {start + int(bad[0])} of x holds a non-finite value")
    if meta.task != "regression":
        bad = np.flatnonzero((y < 0) | (y >= meta.n_classes))
        if len(bad):
            raise DataError(f"{info.path}: row {start + int(bad[0])}: label {y[bad[0]]} is outside 0..{meta.n_classes - 1}")
    elif not np.isfinite(y).all():
        raise DataError(f"{info.path}: y holds a non-finite target")
    if w is not None and not (np.isfinite(w).all() and (w >= 0).all()):
        raise DataError(f"{info.path}: w holds a negative or non-finite weight")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    # One reused buffer: reading into it saves an allocation and a copy per block (~10 %).
    digest = hashlib.sha256()
    buf = memoryview(bytearray(chunk))
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                return digest.hexdigest()
            digest.update(buf[:n])


def chunk_rows(row_bytes: int, rows: int) -> int:
    """Rows per HDF5 chunk: a power of two, at most 4096 (the default block of the loader, so
    blocks align with chunks) and at most CHUNK_BYTES of data."""
    target = max(1, min(4096, CHUNK_BYTES // max(1, row_bytes)))
    return max(1, min(rows, 1 << (target.bit_length() - 1)))


# --------------------------------------------------------------------------- datasets


class Dataset:
    """An opened dataset folder: ``meta`` and the shards of each split (no file handle kept)."""

    def __init__(self, path: Path, meta: Meta, shards: dict[str, list[ShardInfo]]):
        self.path = path
        self.meta = meta
        self._shards = shards

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in SPLITS:
            raise DataError(f"{self.path}: no split {split!r}; expected one of {', '.join(SPLITS)}")
        return self._shards.get(split, [])

    def rows(self, split: str) -> int:
        return sum(s.rows for s in self.shards(split))

    def check_shards(self, splits: Sequence[str] = SPLITS) -> None:
        for split in splits:
            for info in self.shards(split):
                check_shard_file(info, self.meta)

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r}, task={self.meta.task}, rows={self.meta.rows})"


_OPENED: dict[tuple, Dataset] = {}


def open_dataset(path: str | os.PathLike | Dataset, *, check: bool = True) -> Dataset:
    """Read and validate ``path/meta.json``; with ``check``, open every shard and check its header.

    Opening the same unchanged dataset again in one process reuses the first result, so the
    train, val and test loaders of a rank validate the shards once.
    """
    if isinstance(path, Dataset):
        return path
    folder = Path(path)
    meta_path = folder / META_FILE
    if not folder.is_dir():
        raise DataError(f"{folder}: no such dataset folder (expected a folder with {META_FILE} and "
                        f"train/val/test shards; make one with `hpctrain data convert` or `hpctrain data synth`)")
    try:
        stat = meta_path.stat()
    except FileNotFoundError:
        raise DataError(f"{meta_path}: not found; {folder} is not a dataset folder (make one with "
                        f"`hpctrain data convert` or `hpctrain data synth`)") from None
    key = (str(folder.resolve()), stat.st_mtime_ns, stat.st_size, check)
    if key in _OPENED:
        return _OPENED[key]
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{meta_path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{meta_path}: not valid JSON: {e}") from None
    meta, shards = parse_meta(raw, folder)
    dataset = Dataset(folder, meta, shards)
    if check:
        dataset.check_shards()
    _OPENED[key] = dataset
    return dataset


class ShardReader:
    """Reads row ranges of one split's shards into caller-owned arrays.

    Files open on first use in the calling thread, read-only, and stay open until close();
    a reader used in another process than the one that opened its files reopens them.
    """

    def __init__(self, dataset: Dataset, split: str):
        self.dataset = dataset
        self.shards = dataset.shards(split)
        self._open: dict[int, tuple] = {}
        self._pid = os.getpid()

    def _sources(self, shard: int) -> tuple:
        if self._pid != os.getpid():  # inherited across fork: never touch the parent's handles
            self._open.clear()
            self._pid = os.getpid()
        sources = self._open.get(shard)
        if sources is None:
            sources = self._open[shard] = self._open_shard(self.shards[shard])
        return sources

    def _open_shard(self, info: ShardInfo) -> tuple:
        if not info.path.is_file():
            raise DataError(f"{info.path}: shard file is missing (listed in {META_FILE})")
        f = fd = None
        try:
            f = h5_open(info.path)
            fd = os.open(info.path, os.O_RDONLY)
            names = ("x", "y", "w") if self.dataset.meta.has_weights else ("x", "y")
            return (f, fd) + tuple(RowSource(f[name], fd) for name in names)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            _close_quietly(f, fd)
            raise DataError(f"{info.path}: cannot open the shard as HDF5 (truncated or corrupt file?): {e}") from None

    def open_shards(self, shards: list[int]) -> None:
        """Open these shards now: threads may then share ``read`` on them (preadv has no
        file position to share; HDF5 reads go through h5py's lock)."""
        for shard in shards:
            self._sources(shard)

    def read(self, shard: int, start: int, stop: int, x_out: np.ndarray, y_out: np.ndarray,
             w_out: Optional[np.ndarray] = None) -> None:
        """Rows [start, stop) of ``shard`` into the first stop-start rows of the out arrays."""
        sources = self._sources(shard)
        try:
            sources[2].read(start, stop, x_out)
            sources[3].read(start, stop, y_out)
            if w_out is not None and len(sources) > 4:
                sources[4].read(start, stop, w_out)
        except (OSError, ValueError, RuntimeError) as e:
            raise DataError(f"{self.shards[shard].path}: cannot read rows {start}:{stop}: {e}") from None

    def close(self) -> None:
        opened, self._open = self._open, {}
        if self._pid != os.getpid():
            return
        for f, fd, *_ in opened.values():
            _close_quietly(f, fd)


def _close_quietly(f: Any, fd: Optional[int]) -> None:
    # Closing is best effort: a failed close must not mask the error that led here.
    try:
        if f is not None:
            f.close()
    except Exception:
        pass
    try:
        if fd is not None:
            os.close(fd)
    except OSError:
        pass


class RowSource:
    """Row ranges of one HDF5 dataset (x, y or w of a shard).

    When the dataset is stored raw (no filters, native byte order, chunks spanning whole
    rows), rows are read with pread at the byte offsets of HDF5's own chunk index: one system
    call per chunk piece, no per-read HDF5 overhead, and the GIL is released while reading,
    so the prefetch thread overlaps the training step. Any other layout reads through HDF5.
    """

    def __init__(self, dset: Any, fd: int):
        self.dset = dset
        self.fd = fd
        self.row_bytes = dset.dtype.itemsize * int(np.prod(dset.shape[1:], dtype=np.int64))
        self.chunk_rows, self.offsets = _raw_layout(dset, self.row_bytes)

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        n = stop - start
        if n <= 0:
            return
        if self.offsets is None:
            self.dset.read_direct(out, np.s_[start:stop], np.s_[0:n])
            return
        raw = out[:n].reshape(-1).view(np.uint8)
        cr, rb = self.chunk_rows, self.row_bytes
        row, at = start, 0
        while row < stop:
            chunk = row // cr
            end = min(stop, (chunk + 1) * cr)
            size = (end - row) * rb
            got = os.preadv(self.fd, [raw[at:at + size]], self.offsets[chunk] + (row - chunk * cr) * rb)
            if got != size:
                raise OSError(f"short read ({got} of {size} bytes): the file is truncated")
            row, at = end, at + size


def _raw_layout(dset: Any, row_bytes: int) -> tuple[int, Optional[list[int]]]:
    """(rows per chunk, byte offset of each chunk) when rows can be read straight from the
    file; (0, None) when they must go through HDF5."""
    from h5py import h5d

    plist = dset.id.get_create_plist()
    rows = dset.shape[0] if dset.shape else 0
    if (not dset.dtype.isnative or dset.dtype.hasobject or plist.get_nfilters() or plist.get_external_count()
            or rows == 0):
        return 0, None
    layout = plist.get_layout()
    if layout == h5d.CONTIGUOUS:
        offset = dset.id.get_offset()
        return (rows, [offset]) if offset is not None else (0, None)
    if layout != h5d.CHUNKED or tuple(dset.chunks[1:]) != tuple(dset.shape[1:]):
        return 0, None
    cr = dset.chunks[0]
    offsets: list[Optional[int]] = [None] * ceil_div(rows, cr)
    for i in range(dset.id.get_num_chunks()):
        info = dset.id.get_chunk_info(i)
        if info.filter_mask or info.size != cr * row_bytes or info.byte_offset is None:
            return 0, None
        offsets[info.chunk_offset[0] // cr] = info.byte_offset
    if any(o is None for o in offsets):  # a chunk never written reads as fill values: leave it to HDF5
        return 0, None
    return cr, offsets  # type: ignore[return-value]


def standardization(meta: Meta) -> tuple[np.ndarray, np.ndarray]:
    """(mean, 1/std) as float32 rows; a std of 0 (a constant feature) is treated as 1."""
    mean = np.asarray(meta.mean, dtype=np.float64)
    std = np.asarray(meta.std, dtype=np.float64)
    std = np.where((std > 0) & np.isfinite(std), std, 1.0)
    return mean.astype(np.float32), (1.0 / std).astype(np.float32)


def split_sizes(total: int, parts: int) -> list[int]:
    """``total`` rows into ``parts`` shard sizes differing by at most one."""
    if parts == 0:
        return []
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def shard_count(rows: int, shards: int) -> int:
    return 0 if rows == 0 else max(1, min(shards, rows))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- writing


class DatasetExists(DataError):
    """The output folder of a new dataset already exists."""


class RunningStats:
    """Per-feature mean and std over rows seen in chunks (Chan's pairwise update, in float64)."""

    def __init__(self, n_features: int):
        self.count = 0
        self.mean = np.zeros(n_features)
        self.m2 = np.zeros(n_features)

    def update(self, x: np.ndarray) -> None:
        if len(x) == 0:
            return
        x = np.asarray(x, dtype=np.float64)
        n_b = len(x)
        mean_b = x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / total)
        self.m2 = self.m2 + m2_b + delta ** 2 * (self.count * n_b / total)
        self.count = total

    def result(self) -> tuple[list[float], list[float]]:
        if self.count == 0:
            return [0.0] * len(self.mean), [1.0] * len(self.mean)
        return self.mean.tolist(), np.sqrt(self.m2 / self.count).tolist()


class DatasetWriter:
    """Writes a new dataset into a temporary folder beside ``out`` and renames it into place.

    The row count of every split is known up front, so each shard is created at its final
    size and filled in order (``append``) or shard by shard (``append_to_shard``). Mean and
    std come from the train rows only. ``finish()`` checksums the shards, writes meta.json
    and renames the folder, so readers never see a half-written dataset.
    """

    def __init__(self, out: str | os.PathLike, meta: Meta, *, shards: int = 1, overwrite: bool = False,
                 shard_rows: Optional[dict[str, list[int]]] = None):
        self.out = Path(out)
        self.meta = meta
        self.overwrite = overwrite
        if self.out.exists() and not overwrite and not _is_empty_dir(self.out):
            raise DatasetExists(f"{self.out}: already exists; expected a new folder (or pass --overwrite)")
        self.sizes = {s: split_sizes(meta.rows.get(s, 0), shard_count(meta.rows.get(s, 0), shards)) for s in SPLITS}
        for split, sizes in (shard_rows or {}).items():  # explicit sizes, e.g. uneven shards
            if sum(sizes) != meta.rows.get(split, 0) or any(n < 1 for n in sizes):
                raise ValueError(f"shard_rows[{split!r}] = {sizes} must be positive and sum to {meta.rows.get(split, 0)}")
            self.sizes[split] = list(sizes)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self._filled = {s: [0] * len(self.sizes[s]) for s in SPLITS}
        self._files: dict[tuple[str, int], Any] = {}
        self._stats = RunningStats(meta.n_features)
        self._y_dtype, self._y_tail = expected_y(meta)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self.abort()

    def shard_file(self, split: str, index: int) -> str:
        return f"{split}/part-{index:05d}.h5"

    def _file(self, split: str, index: int) -> Any:
        key = (split, index)
        f = self._files.get(key)
        if f is None:
            path = self.tmp / self.shard_file(split, index)
            path.parent.mkdir(exist_ok=True)
            f = h5_open(path, "w")
            rows, nf = self.sizes[split][index], self.meta.n_features
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["split"] = split
            f.attrs["index"] = index
            cr = chunk_rows(4 * nf, rows)
            f.create_dataset("x", shape=(rows, nf), dtype=np.float32, chunks=(cr, nf))
            f.create_dataset("y", shape=(rows,) + self._y_tail, dtype=self._y_dtype, chunks=(cr,) + self._y_tail)
            if self.meta.has_weights:
                f.create_dataset("w", shape=(rows,), dtype=np.float32, chunks=(cr,))
            self._files[key] = f
        return f

    def append(self, split: str, x: np.ndarray, y: np.ndarray, w: Optional[np.ndarray] = None) -> None:
        """Rows in order: they fill the split's shards one after the other."""
        done = 0
        while done < len(x):
            index = next((i for i, (n, size) in enumerate(zip(self._filled[split], self.sizes[split])) if n < size), None)
            if index is None:
                raise ValueError(f"more rows than the {sum(self.sizes[split])} planned for split {split!r}")
            take = min(len(x) - done, self.sizes[split][index] - self._filled[split][index])
            self.append_to_shard(split, index, x[done:done + take], y[done:done + take],
                                 None if w is None else w[done:done + take])
            done += take

    def append_to_shard(self, split: str, index: int, x: np.ndarray, y: np.ndarray,
                        w: Optional[np.ndarray] = None) -> None:
        n = len(x)
        if n == 0:
            return
        start = self._filled[split][index]
        if start + n > self.sizes[split][index]:
            raise ValueError(f"shard {split}/{index} holds {self.sizes[split][index]} rows; got more")
        f = self._file(split, index)
        f["x"][start:start + n] = np.asarray(x, dtype=np.float32)
        f["y"][start:start + n] = np.asarray(y, dtype=self._y_dtype).reshape((n,) + self._y_tail)
        if self.meta.has_weights:
            f["w"][start:start + n] = np.asarray(w, dtype=np.float32)
        self._filled[split][index] = start + n
        if split == "train":
            self._stats.update(x)

    def shuffle_shards(self, seed: int) -> None:
        """Permute the rows inside every shard (in memory, one shard at a time)."""
        for split in SPLITS:
            for index in range(len(self.sizes[split])):
                f = self._file(split, index)
                perm = np.random.default_rng([seed, SPLITS.index(split), index]).permutation(self.sizes[split][index])
                for name in ("x", "y", "w"):
                    if name in f:
                        f[name][...] = f[name][...][perm]

    def finish(self) -> Path:
        for split in SPLITS:
            for index, (n, size) in enumerate(zip(self._filled[split], self.sizes[split])):
                if n != size:
                    raise ValueError(f"shard {split}/{index}: {n} of {size} rows written")
        for f in self._files.values():
            f.close()
        self._files.clear()
        self.meta.mean, self.meta.std = self._stats.result()
        shards = {s: [ShardInfo(s, i, self.shard_file(s, i), self.out / self.shard_file(s, i), size,
                                file_sha256(self.tmp / self.shard_file(s, i)))
                      for i, size in enumerate(self.sizes[s])] for s in SPLITS}
        (self.tmp / META_FILE).write_text(json.dumps(self.meta.to_json(shards), indent=2) + "\n", encoding="utf-8")
        try:
            _publish(self.tmp, self.out, self.overwrite)
        except BaseException:
            self.abort()
            raise
        return self.out

    def abort(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except Exception:  # best effort: the folder is removed next
                pass
        self._files.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder into place; with ``overwrite`` the old one is removed after."""
    if overwrite and out.exists() and not _is_empty_dir(out):
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / "old")
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.replace(tmp, out)  # atomic; fails when another process already put a non-empty folder there
    except OSError:
        raise DatasetExists(f"{out}: already exists; expected a new folder (or pass --overwrite)") from None


__all__ = ["FORMAT_VERSION", "META_FILE", "SPLITS", "Dataset", "Meta", "ShardInfo", "ShardReader",
           "DatasetWriter", "DatasetExists", "open_dataset", "check_shard_file", "file_sha256",
           "standardization"]
