"""CSV, NPY, NPZ or HDF5 -> a shard dataset, streaming the input in chunks.

Two passes over the input, one chunk of rows in memory at a time:

1. count the rows, check every value, and collect the class labels (classification);
   then assign every row a split (seeded; stratified by class on request) and a shard of
   that split (uniformly at random, so a sorted input ends up mixed across shards);
2. read the input again and append each chunk's rows to their shards.

Finally each shard's rows are permuted in memory (one shard at a time), so blocks of
consecutive rows are random samples of the split, which the loader's block shuffle relies
on. Mean and std are computed from the train rows only, as they are written.
"""
from __future__ import annotations

import itertools
import math
import zipfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from ..errors import DataError
from .shards import SPLITS, TASKS, DatasetWriter, Meta, h5_open, shard_count, split_sizes
from .synthetic import split_counts

CHUNK_ROWS = 65536
FORMATS = ("csv", "npy", "npz", "h5")
_SUFFIXES = {".csv": "csv", ".txt": "csv", ".npy": "npy", ".npz": "npz", ".h5": "h5", ".hdf5": "h5", ".hdf": "h5"}


# --------------------------------------------------------------------------- sources


class Source:
    """An input file read in chunks: ``chunks()`` yields (first row, x float64, y, w or None)."""

    path: Path
    feature_names: list[str]
    target_names: list[str]
    has_weights: bool
    row_label = "row"  # how error messages count rows

    def chunks(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, Optional[np.ndarray]]]:
        raise NotImplementedError

    def where(self, row: int) -> str:
        return f"{self.path}: {self.row_label} {row + 1}"


def _split_spec(spec: Optional[str]) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()] if spec else []


def _resolve_columns(spec: Optional[str], names: list[str], path: Path, what: str) -> list[int]:
    """Columns given by name or index (negative counts from the end), comma separated."""
    out = []
    for item in _split_spec(spec):
        if item in names:
            out.append(names.index(item))
            continue
        try:
            index = int(item)
        except ValueError:
            raise DataError(f"{path}: no column {item!r} for {what}; columns are: {', '.join(names)}") from None
        if not -len(names) <= index < len(names):
            raise DataError(f"{path}: column index {index} for {what} is out of range; the file has "
                            f"{len(names)} columns")
        out.append(index % len(names))
    return out


class CsvSource(Source):
    row_label = "data row"

    def __init__(self, path: Path, target: Optional[str], weights: Optional[str], task: str):
        self.path, self.task = path, task
        try:
            with open(path, "r", encoding="utf-8", newline="") as f:
                header = f.readline()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read: {e}") from None
        names = [h.strip().strip('"') for h in header.rstrip("\r\n").split(",")]
        if not header.strip() or len(names) < 2:
            raise DataError(f"{path}: expected a header row naming at least two comma-separated columns")
        targets = _resolve_columns(target, names, path, "--target") or [len(names) - 1]
        wcols = _resolve_columns(weights, names, path, "--weights")
        if len(wcols) > 1 or set(wcols) & set(targets):
            raise DataError(f"{path}: --weights must name one column that is not a target")
        self.target_cols, self.weight_cols = targets, wcols
        self.feature_cols = [i for i in range(len(names)) if i not in targets and i not in wcols]
        if not self.feature_cols:
            raise DataError(f"{path}: no feature columns left after the target and weight columns")
        self.feature_names = [names[i] for i in self.feature_cols]
        self.target_names = [names[i] for i in targets]
        self.has_weights = bool(wcols)

    def chunks(self):
        with open(self.path, "r", encoding="utf-8", newline="") as f:
            f.readline()
            row = 0
            while True:
                lines = [line for line in itertools.islice(f, CHUNK_ROWS) if line.strip()]
                if not lines:
                    return
                yield row, self._parse(lines, row, self.feature_cols, float), \
                    self._parse(lines, row, self.target_cols, float if self.task == "regression" else str), \
                    self._parse(lines, row, self.weight_cols, float)[:, 0] if self.has_weights else None
                row += len(lines)

    def _parse(self, lines: list[str], row: int, cols: list[int], kind: type) -> np.ndarray:
        dtype = np.float64 if kind is float else str
        try:
            values = np.loadtxt(lines, delimiter=",", usecols=cols, ndmin=2, quotechar='"', dtype=dtype)
        except ValueError:
            for i, line in enumerate(lines):  # find the first bad line, to name it
                try:
                    np.loadtxt([line], delimiter=",", usecols=cols, ndmin=2, quotechar='"', dtype=dtype)
                except ValueError as e:
                    reason = str(e).split(" at row ")[0]
                    raise DataError(f"{self.path}: data row {row + i + 1} (line {row + i + 2}): {reason}") from None
            raise
        if kind is str:
            values = np.char.strip(values)
        return values


class NpySource(Source):
    def __init__(self, path: Path, target: Optional[str], weights: Optional[str]):
        self.path = path
        try:
            self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read as .npy: {e}") from None
        if self.array.ndim != 2 or self.array.shape[1] < 2 or not np.issubdtype(self.array.dtype, np.number):
            raise DataError(f"{path}: expected a numeric 2-D array [rows, columns >= 2]; got "
                            f"{self.array.dtype} {self.array.shape}")
        names = [f"c{i}" for i in range(self.array.shape[1])]
        self.target_cols = _resolve_columns(target, names, path, "--target") or [len(names) - 1]
        self.weight_cols = _resolve_columns(weights, names, path, "--weights")
        if len(self.weight_cols) > 1 or set(self.weight_cols) & set(self.target_cols):
            raise DataError(f"{path}: --weights must name one column that is not a target")
        self.feature_cols = [i for i in range(len(names)) if i not in self.target_cols and i not in self.weight_cols]
        if not self.feature_cols:
            raise DataError(f"{path}: no feature columns left after the target and weight columns")
        self.feature_names = [f"f{i}" for i in range(len(self.feature_cols))]
        self.target_names = [f"c{i}" for i in self.target_cols]
        self.has_weights = bool(self.weight_cols)

    def chunks(self):
        for start in range(0, len(self.array), CHUNK_ROWS):
            block = np.asarray(self.array[start:start + CHUNK_ROWS], dtype=np.float64)
            yield start, block[:, self.feature_cols], block[:, self.target_cols], \
                block[:, self.weight_cols[0]] if self.has_weights else None


class _NpzMember:
    """One array of an .npz archive, read row chunks at a time from the (maybe compressed) member."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name
        with zipfile.ZipFile(path) as zf:
            if name + ".npy" not in zf.namelist():
                have = ", ".join(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
                raise DataError(f"{path}: no array {name!r} in the archive; it holds: {have}")
            with zf.open(name + ".npy") as f:
                self.shape, self.fortran, self.dtype = _npy_header(f, path, name)
        if self.dtype.hasobject or not self.shape:
            raise DataError(f"{path}: array {name!r} must be a numeric array with rows; got {self.dtype} {self.shape}")

    def chunks(self) -> Iterator[np.ndarray]:
        row_shape = self.shape[1:]
        if self.fortran:  # column-major data cannot be streamed by rows
            array = np.load(self.path, allow_pickle=False)[self.name]
            for start in range(0, len(array), CHUNK_ROWS):
                yield array[start:start + CHUNK_ROWS]
            return
        row_bytes = self.dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
        with zipfile.ZipFile(self.path) as zf, zf.open(self.name + ".npy") as f:
            _npy_header(f, self.path, self.name)
            for start in range(0, self.shape[0], CHUNK_ROWS):
                n = min(CHUNK_ROWS, self.shape[0] - start)
                data = f.read(n * row_bytes)
                if len(data) != n * row_bytes:
                    raise DataError(f"{self.path}: array {self.name!r} ends early (truncated archive?)")
                yield np.frombuffer(data, dtype=self.dtype).reshape((n,) + row_shape)


def _npy_header(f: Any, path: Path, name: str) -> tuple:
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read(f)
    except ValueError as e:
        raise DataError(f"{path}: array {name!r} is not a valid .npy member: {e}") from None


class _ArraySource(Source):
    """x [rows, F], y [rows] or [rows, K], optional w [rows], as row-chunk iterators."""

    def _setup(self, x_shape: tuple, y_shape: tuple, w_shape: Optional[tuple], names: Sequence[str]) -> None:
        if len(x_shape) < 2:
            raise DataError(f"{self.path}: x must be [rows, features] or [rows, *shape] (e.g. images "
                            f"[rows, 1, 8, 8]); got shape {x_shape}")
        # N-d rows are stored flat; their shape goes to meta.json for the model.
        self.feature_shape = list(x_shape[1:]) if len(x_shape) > 2 else []
        x_shape = (x_shape[0], math.prod(x_shape[1:]))
        if len(y_shape) not in (1, 2) or y_shape[0] != x_shape[0]:
            raise DataError(f"{self.path}: y must have {x_shape[0]} rows like x; got shape {y_shape}")
        if w_shape is not None and w_shape != (x_shape[0],):
            raise DataError(f"{self.path}: weights must have shape ({x_shape[0]},); got {w_shape}")
        self.feature_names = list(names) if len(names) == x_shape[1] else [f"f{i}" for i in range(x_shape[1])]
        k = 1 if len(y_shape) == 1 else y_shape[1]
        self.target_names = ["y"] if k == 1 else [f"y{i}" for i in range(k)]
        self.has_weights = w_shape is not None

    def _zip_chunks(self, xs, ys, ws):
        row = 0
        for x, y, w in zip(xs, ys, ws if ws is not None else itertools.repeat(None)):
            y = np.asarray(y)
            yield row, np.asarray(x, dtype=np.float64).reshape(len(x), -1), y.reshape(len(y), -1), \
                None if w is None else np.asarray(w, dtype=np.float64)
            row += len(x)


class NpzSource(_ArraySource):
    def __init__(self, path: Path, x_key: str, y_key: str, w_key: Optional[str]):
        self.path = path
        try:
            self.x, self.y = _NpzMember(path, x_key), _NpzMember(path, y_key)
            self.w = _NpzMember(path, w_key) if w_key else None
        except (OSError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: cannot read as .npz: {e}") from None
        self._setup(self.x.shape, self.y.shape, self.w.shape if self.w else None, [])

    def chunks(self):
        return self._zip_chunks(self.x.chunks(), self.y.chunks(), self.w.chunks() if self.w else None)


class H5Source(_ArraySource):
    def __init__(self, path: Path, x_key: str, y_key: str, w_key: Optional[str]):
        self.path, self.keys = path, (x_key, y_key, w_key)
        with self._open() as f:
            shapes = []
            for key in (x_key, y_key, w_key):
                if key is None:
                    shapes.append(None)
                    continue
                if key not in f or not hasattr(f[key], "shape"):
                    have = ", ".join(k for k in f.keys())
                    raise DataError(f"{path}: no dataset {key!r}; the file holds: {have}")
                shapes.append(f[key].shape)
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in f[x_key].attrs.get("feature_names", [])]
        self._setup(shapes[0], shapes[1], shapes[2], names)

    def _open(self):
        try:
            return h5_open(self.path)
        except OSError as e:
            raise DataError(f"{self.path}: cannot open as HDF5: {e}") from None

    def chunks(self):
        with self._open() as f:
            dsets = [f[k] if k else None for k in self.keys]
            n = dsets[0].shape[0]

            def rows(d):
                return (d[s:s + CHUNK_ROWS] for s in range(0, n, CHUNK_ROWS))
            yield from self._zip_chunks(rows(dsets[0]), rows(dsets[1]), rows(dsets[2]) if dsets[2] else None)


def open_source(path: str | Path, task: str, target: Optional[str] = None, weights: Optional[str] = None,
                features: str = "x", fmt: Optional[str] = None) -> Source:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    fmt = fmt or _SUFFIXES.get(path.suffix.lower())
    if fmt not in FORMATS:
        raise DataError(f"{path}: cannot tell the input format from the suffix {path.suffix!r}; expected "
                        f"one of {', '.join(sorted(_SUFFIXES))} (or pass --format)")
    if fmt == "csv":
        return CsvSource(path, target, weights, task)
    if fmt == "npy":
        return NpySource(path, target, weights)
    if fmt == "npz":
        return NpzSource(path, features, target or "y", weights)
    return H5Source(path, features, target or "y", weights)


# --------------------------------------------------------------------------- labels


class LabelEncoder:
    """Class labels -> 0..C-1. Non-negative integer labels keep their value (C = max + 1);
    any other labels (text, -1/1, ...) are numbered in sorted order."""

    def __init__(self):
        self.values: dict[Any, int] = {}  # raw label -> provisional code (order of appearance)

    def encode(self, raw: np.ndarray) -> np.ndarray:
        uniques, inverse = np.unique(raw.reshape(-1), return_inverse=True)
        codes = np.array([self.values.setdefault(_label_key(u), len(self.values)) for u in uniques.tolist()],
                         dtype=np.int64)
        return codes[inverse]

    def finish(self, task: str, path: Path) -> tuple[np.ndarray, list[str]]:
        """(lookup from provisional code to class index, class names)."""
        keys = list(self.values)
        numbers = [_as_number(k) for k in keys]
        if all(n is not None and float(n).is_integer() and n >= 0 for n in numbers):
            index = [int(n) for n in numbers]
            count = max(index) + 1
            if task == "binary" and count > 2:
                raise DataError(f"{path}: a binary target needs labels 0/1 (or two distinct values); found "
                                f"{', '.join(map(str, sorted(index)[:10]))}")
            names = [str(i) for i in range(max(count, 2))]
        else:
            ordered = sorted(keys, key=lambda k: (_as_number(k) is None, _as_number(k) or 0.0, str(k)))
            index = [ordered.index(k) for k in keys]
            names = [str(k) for k in ordered]
            if task == "binary" and len(names) != 2:
                raise DataError(f"{path}: a binary target needs two distinct values; found {len(names)}: "
                                f"{', '.join(names[:10])}")
        return np.asarray(index, dtype=np.int64), names


def _label_key(value: Any) -> Any:
    number = _as_number(value)
    if number is not None and float(number).is_integer():
        return int(number)
    return number if number is not None else str(value)


def _as_number(value: Any) -> Optional[float]:
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- splits


def assign_splits(n: int, fractions: Sequence[float], seed: int, labels: Optional[np.ndarray] = None) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) of every row: seeded, and per class when ``labels``."""
    rng = np.random.default_rng([seed, 1])
    assignment = np.empty(n, dtype=np.int8)
    if labels is None:
        groups = [np.arange(n)]
    else:
        order = np.argsort(labels, kind="stable")
        groups = np.split(order, np.cumsum(np.bincount(labels))[:-1])
    for rows in groups:
        rows = rng.permutation(rows)
        counts = split_counts(len(rows), fractions)
        edges = np.cumsum([0] + [counts[s] for s in SPLITS])
        for i in range(len(SPLITS)):
            assignment[rows[edges[i]:edges[i + 1]]] = i
    return assignment


def assign_shards(count: int, shards: int, rng: np.random.Generator) -> np.ndarray:
    """A shard index for each of ``count`` rows: the planned shard sizes, in random order."""
    sizes = split_sizes(count, shard_count(count, shards))
    return rng.permutation(np.repeat(np.arange(len(sizes), dtype=np.int32), sizes))


# --------------------------------------------------------------------------- conversion


def convert(input_path: str | Path, out: str | Path, *, task: str, target: Optional[str] = None,
            weights: Optional[str] = None, features: str = "x", shards: int = 4,
            split: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, stratify: bool = False,
            fmt: Optional[str] = None, overwrite: bool = False, feature_shape: Optional[Sequence[int]] = None,
            log=None) -> Path:
    """Convert one input file into a dataset folder at ``out``; returns its path.

    ``feature_shape`` (e.g. (1, 8, 8)) is the shape of a row's features for the model: given
    for flat input (CSV, 2-D arrays), or taken from an N-d array, which it must then match."""
    if task not in TASKS:
        raise DataError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    if shards < 1:
        raise DataError(f"--shards {shards}: expected at least 1")
    if stratify and task == "regression":
        raise DataError("--stratify needs class labels; it does not apply to --task regression")
    log = log or (lambda _msg: None)
    source = open_source(input_path, task, target, weights, features, fmt)
    n, labels, encoder = _first_pass(source, task)
    log(f"{source.path}: {n} rows, {len(source.feature_names)} features")
    lookup, class_names = encoder.finish(task, source.path) if encoder else (None, [])
    if labels is not None:
        labels = lookup[labels]
    assignment = assign_splits(n, split, seed, labels if stratify else None)
    counts = {s: int((assignment == i).sum()) for i, s in enumerate(SPLITS)}
    if counts["train"] == 0:
        raise DataError(f"{source.path}: the train split would be empty ({n} rows, split {tuple(split)})")
    meta = Meta(task=task, n_features=len(source.feature_names),
                n_classes={"binary": 2, "multiclass": len(class_names), "regression": 0}[task],
                n_targets=len(source.target_names) if task == "regression" else 1,
                feature_names=source.feature_names, mean=[], std=[], rows=counts, has_weights=source.has_weights,
                target_names=source.target_names, class_names=class_names,
                source={"kind": "convert", "input": str(source.path), "seed": seed, "split": list(split),
                        "stratify": stratify},
                feature_shape=_row_shape(source, feature_shape))
    if task != "regression" and len(source.target_names) != 1:
        raise DataError(f"{source.path}: {task} needs one target column; got {', '.join(source.target_names)}")
    rng = np.random.default_rng([seed, 2])
    dest = [assign_shards(counts[s], shards, rng) for s in SPLITS]
    with DatasetWriter(out, meta, shards=shards, overwrite=overwrite) as writer:
        _second_pass(source, writer, assignment, dest, labels)
        writer.shuffle_shards(seed)
        path = writer.finish()
    log(f"{path}: " + ", ".join(f"{s} {counts[s]} rows" for s in SPLITS))
    return path


def _row_shape(source: Source, given: Optional[Sequence[int]]) -> list[int]:
    found = list(getattr(source, "feature_shape", []) or [])
    n = len(source.feature_names)
    if given is None:
        return found
    given = [int(d) for d in given]
    if math.prod(given) != n:
        raise DataError(f"--feature-shape {','.join(map(str, given))}: holds {math.prod(given)} values but "
                        f"{source.path} has {n} features per row")
    if found and found != given:
        raise DataError(f"--feature-shape {','.join(map(str, given))}: {source.path} holds rows of shape "
                        f"{found}; leave the option out or give that shape")
    return given if len(given) > 1 else []


def _first_pass(source: Source, task: str) -> tuple[int, Optional[np.ndarray], Optional[LabelEncoder]]:
    encoder = LabelEncoder() if task != "regression" else None
    codes = []
    n = 0
    for row, x, y, w in source.chunks():
        _check_finite(source, row, x, "feature", source.feature_names)
        if encoder is not None:
            codes.append(encoder.encode(y))
        else:
            _check_finite(source, row, y.astype(np.float64), "target", source.target_names)
        if w is not None:
            _check_finite(source, row, w[:, None], "weight", ["weight"])
            bad = np.flatnonzero(w < 0)
            if len(bad):
                raise DataError(f"{source.where(row + int(bad[0]))}: weight {w[bad[0]]} is negative; expected >= 0")
        n += len(x)
    if n == 0:
        raise DataError(f"{source.path}: no data rows")
    return n, (np.concatenate(codes) if codes else None), encoder


def _check_finite(source: Source, row: int, values: np.ndarray, what: str, names: list[str]) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        r, c = (int(i[0]) for i in np.nonzero(bad))
        raise DataError(f"{source.where(row + r)}: {what} {names[c]!r} is {values[r, c]}; expected a finite number")


def _second_pass(source: Source, writer: DatasetWriter, assignment: np.ndarray, dest: list[np.ndarray],
                 labels: Optional[np.ndarray]) -> None:
    cursors = [0] * len(SPLITS)
    for row, x, y, w in source.chunks():
        part = assignment[row:row + len(x)]
        if labels is not None:
            y = labels[row:row + len(x)]
        else:
            y = y.astype(np.float32)
        for s, split in enumerate(SPLITS):
            rows = np.flatnonzero(part == s)
            shard_of = dest[s][cursors[s]:cursors[s] + len(rows)]
            cursors[s] += len(rows)
            for shard in np.unique(shard_of).tolist():
                pick = rows[shard_of == shard]
                writer.append_to_shard(split, shard, x[pick].astype(np.float32), y[pick],
                                       None if w is None else w[pick])
