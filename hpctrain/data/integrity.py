"""Shard checksums verified before training: hashed once, then trusted while nothing changed.

meta.json records every shard's sha256, but opening a dataset only checks the shards'
headers, so a shard whose bytes changed (same size) trained silently. Hashing every shard
before every run costs size / throughput per run (docs/data.md has the figures), and an array
of 1000 elements would read the dataset 1000 times. So the first run hashes and records a
stamp: meta.json's sha256 and (size, mtime_ns, inode) of every shard. A later run whose stat
calls give the same stamp skips the hashing; writing to a shard (new mtime), replacing it
(new inode) or a new meta.json makes the stamp stale. st_dev is left out: a network
filesystem may show another device number on every node.

The stamp is ``<dataset>/.hpctrain-verified.json`` when the dataset folder is writable, else
a file in the user's cache ($HPCTRAIN_CACHE, default ~/.cache/hpctrain). It is written
atomically, under a lock file beside it: one process hashes while the others wait for its
stamp, so array elements starting together hash the dataset once. A failed verification
is recorded too, so they all fail at once with the same message.

What a stamp cannot see: bytes changed below the filesystem (a failing disk, a bit flip on
the file server) keep size, mtime and inode. ``hpctrain data inspect`` always hashes, and
deleting the stamp makes the next run hash again.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..errors import DataError
from ..fsutil import atomic_write_json
from .shards import META_FILE, SPLITS, Dataset, ShardInfo, file_sha256, parse_meta

Log = Callable[[str], None]

STAMP = ".hpctrain-verified.json"
LOCK = ".hpctrain-verified.lock"
STAMP_FORMAT = "hpctrain-verified-1"
# A shard modified less than this before the hash began may have been modified again within
# the same timestamp tick (1 s or 2 s on some filesystems) and keep its mtime: such a dataset
# is verified but not stamped, so the next run hashes it again.
SETTLE_NS = 2 * 10**9
MAX_HASH_THREADS = 8  # hashlib and file reads release the GIL: shards hash in parallel


# --------------------------------------------------------------------------- entry points


def verify_on_root(dataset: str | os.PathLike | Dataset, backend: Any, log: Log = print) -> None:
    """Rank 0 verifies; the others wait for its verdict, and every rank raises the same
    DataError when the dataset fails (no rank is left waiting in a collective)."""
    problem, error = None, None
    if backend.is_root:
        try:
            verify_dataset(dataset, log=log)
        except Exception as e:  # whatever it is, the others must hear of it or they wait below
            problem, error = (str(e) if isinstance(e, DataError)
                              else f"rank 0 could not verify the dataset: {type(e).__name__}: {e}"), e
    if backend.size > 1:
        problem = backend.broadcast_object(problem)
    if error is not None:
        raise error
    if problem is not None:
        raise DataError(problem)


def verify_dataset(dataset: str | os.PathLike | Dataset, log: Log = print) -> str:
    """Check every shard against the sha256 in meta.json, unless a valid stamp says that was
    done. Returns "stamp" or "hashed"; a mismatch is a DataError naming the shard."""
    folder = Path(dataset.path if isinstance(dataset, Dataset) else dataset)
    places = stamp_places(folder)
    found = _valid_stamp(places, current_key(folder))
    if found is None:
        with _locked(places, folder, log) as place:
            found = _valid_stamp(places, current_key(folder))  # another process may have just done it
            if found is None:
                _raise_problem(_hash_and_record(folder, place, log))
                return "hashed"
    _raise_problem(found.get("problem"))
    return "stamp"


def _raise_problem(problem: Optional[str]) -> None:
    if problem:
        raise DataError(problem)


# --------------------------------------------------------------------------- the key


def current_key(folder: Path) -> dict:
    """What a stamp is valid for: meta.json's sha256 and a stat of every shard it lists."""
    return snapshot(folder)[0]


def snapshot(folder: Path) -> tuple[dict, list[ShardInfo]]:
    """The key and the shards of meta.json, both from one read of it."""
    raw = _read_meta(folder)
    infos = _shards(folder, raw)
    key = {"meta_sha256": hashlib.sha256(raw).hexdigest(),
           "shards": {info.file: stat_key(info.path) for info in infos}}
    return key, infos


def stat_key(path: Path) -> list[int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: shard file is missing (listed in {META_FILE})") from None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _read_meta(folder: Path) -> bytes:
    try:
        return (folder / META_FILE).read_bytes()
    except OSError as e:
        raise DataError(f"{folder / META_FILE}: cannot read: {e}") from None


def _shards(folder: Path, raw: bytes) -> list[ShardInfo]:
    try:
        meta_json = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{folder / META_FILE}: not valid JSON: {e}") from None
    _, shards = parse_meta(meta_json, folder)
    return [info for split in SPLITS for info in shards.get(split, [])]


# --------------------------------------------------------------------------- hashing


def _hash_and_record(folder: Path, place: Optional[Place], log: Log) -> Optional[str]:
    """Hash every shard and, when the files held still, record the outcome. The problem or None."""
    started = time.time_ns()
    key, infos = snapshot(folder)
    infos = [info for info in infos if info.sha256]  # datasets made without sums: nothing to compare
    t = time.perf_counter()
    problem = mismatch_message(folder, infos, hash_files([info.path for info in infos]))
    seconds = time.perf_counter() - t
    mb = sum(key["shards"][info.file][0] for info in infos) / 1e6
    log(f"verified {len(infos)} shards of {folder} against the sha256 in {META_FILE}: {mb:,.1f} MB in "
        f"{seconds:.2f} s" + (f" ({mb / 1e3 / seconds:.2f} GB/s)" if seconds > 0 else ""))
    # A file changed while it was hashed, or one changed within a timestamp tick, could carry
    # the key of bytes that were never hashed: no stamp then.
    if place is not None and _settled(key, started) and current_key(folder) == key:
        _write_stamp(place, folder, key, problem, log)
    return problem


def hash_files(paths: list[Path]) -> list[str]:
    """sha256 of each file, several files at a time."""
    threads = min(MAX_HASH_THREADS, _cpus(), len(paths))
    if threads <= 1:
        return [_sha256(p) for p in paths]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(_sha256, paths))


def _sha256(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read the shard to verify it: {e}") from None


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores Slurm gave this task, not the node's
    except AttributeError:
        return os.cpu_count() or 1


def mismatch_message(folder: Path, infos: list[ShardInfo], digests: list[str]) -> Optional[str]:
    """A message naming the first shard that differs from meta.json (and how many more), or None."""
    bad = [(info, actual) for info, actual in zip(infos, digests) if actual != info.sha256]
    if not bad:
        return None
    info, actual = bad[0]
    more = f" ({len(bad) - 1} more shard(s) differ: {', '.join(i.file for i, _ in bad[1:4])}" \
           f"{', ...' if len(bad) > 4 else ''})" if len(bad) > 1 else ""
    return (f"{info.path}: sha256 mismatch: {META_FILE} expects {info.sha256}, the file has {actual}{more}. "
            f"The shard changed after the dataset was made (overwritten or corrupt); re-create the dataset "
            f"(`hpctrain data convert ... --overwrite`, or delete {folder} when data.synth makes it) and check "
            f"it with `hpctrain data inspect {folder}`")


def _settled(key: dict, started_ns: int) -> bool:
    return all(mtime_ns <= started_ns - SETTLE_NS for _, mtime_ns, _ in key["shards"].values())


# --------------------------------------------------------------------------- stamps and their lock


@dataclass(frozen=True)
class Place:
    stamp: Path
    lock: Path


def stamp_places(folder: Path) -> list[Place]:
    """Where a stamp may be: beside the dataset, else in the user's cache (for read-only data)."""
    cache = cache_dir() / "verified"
    name = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
    return [Place(folder / STAMP, folder / LOCK), Place(cache / f"{name}.json", cache / f"{name}.lock")]


def cache_dir() -> Path:
    return Path(os.environ.get("HPCTRAIN_CACHE") or Path.home() / ".cache" / "hpctrain")


def _valid_stamp(places: list[Place], key: dict) -> Optional[dict]:
    for place in places:
        try:
            stamp = json.loads(place.stamp.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(stamp, dict) and stamp.get("format") == STAMP_FORMAT and stamp.get("key") == key:
            return stamp
    return None


def _write_stamp(place: Place, folder: Path, key: dict, problem: Optional[str], log: Log) -> None:
    stamp = {"format": STAMP_FORMAT, "dataset": str(folder.resolve()), "key": key, "problem": problem,
             "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        atomic_write_json(place.stamp, stamp)
    except OSError as e:  # verified all the same; the next run hashes again
        log(f"warning: cannot record the verification of {folder} in {place.stamp}: {e}")


@contextlib.contextmanager
def _locked(places: list[Place], folder: Path, log: Log) -> Iterator[Optional[Place]]:
    """Hold the lock of the first place whose lock file can be opened for writing; yields that
    place, or None when there is none (the dataset is then hashed without a stamp)."""
    for place in places:
        fd = _open_lock(place.lock)
        if fd is None:
            continue
        try:
            _lock(fd, folder, log)
            yield place
        finally:
            os.close(fd)  # releases the lock
        return
    log(f"warning: no writable place for the verification stamp of {folder} "
        f"(tried {', '.join(str(p.stamp.parent) for p in places)}); it is hashed before every run")
    yield None


def _open_lock(path: Path) -> Optional[int]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a read-only dataset folder, or no home directory
        return None


def _lock(fd: int, folder: Path, log: Log) -> None:
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that verifies {folder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # no locks here (Lustre without -o flock): processes hash side by side, still safe
        pass
