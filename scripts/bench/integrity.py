#!/usr/bin/env python
"""What verifying a dataset before training costs: the sha256 of every shard, and the stamp check.

    python scripts/bench/integrity.py [--rows 2000000] [--features 28] [--shards 16] [--cold]

Prints, from this same run,
  (a) raw read throughput of the shards (4 MiB reads into one buffer, no hashing): the baseline,
  (b) the first run's verification (hpctrain.data.integrity, the stamp deleted first): sha256 of
      every shard, one thread and the default thread count,
  (c) a later run's verification with a valid stamp: read and hash meta.json, stat every shard,
and the ratios (b)/(a) (throughput) and (c)/(b) (time). (a) and (b) alternate for --rounds
rounds and the best of each counts, so load from other processes on a shared machine hits
both alike. --cold evicts the shards from the page cache (posix_fadvise DONTNEED, these files
only) before each measurement, so (a) and (b) read from the disk. The dataset goes to a
temporary folder (removed unless --keep).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hpctrain.data import integrity  # noqa: E402
from hpctrain.data.shards import SPLITS, open_dataset  # noqa: E402
from hpctrain.data.synthetic import make_synthetic  # noqa: E402

BLOCK = 1 << 22


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2_000_000, help="train rows (default 2,000,000)")
    p.add_argument("--features", type=int, default=28)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--stamp-checks", type=int, default=200, help="stamp checks timed for (c)")
    p.add_argument("--cold", action="store_true", help="evict the shards from the page cache before (a) and (b)")
    p.add_argument("--dir", help="dataset folder to use or create (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the temporary dataset")
    return p.parse_args(argv)


def shard_paths(folder: Path) -> list[Path]:
    ds = open_dataset(folder, check=False)
    return [info.path for split in SPLITS for info in ds.shards(split)]


def make_dataset(folder: Path, args) -> None:
    if (folder / "meta.json").exists():
        return
    t = time.perf_counter()
    make_synthetic(folder, rows=args.rows, features=args.features, task="binary", shards=args.shards,
                   split=(1.0, 0.0, 0.0), seed=0)
    # dated back as a dataset converted earlier: a fresh one is verified but not stamped yet
    for path in [folder / "meta.json", *shard_paths(folder)]:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 3600 * 10**9))
    print(f"dataset: {args.rows:,} rows x {args.features} float32 in {args.shards} shards, "
          f"written in {time.perf_counter() - t:.1f} s to {folder}")


def evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[Path], cold: bool) -> None:
    if cold:
        evict(paths)
    else:
        raw_read(paths)


def raw_read(paths: list[Path]) -> None:
    buf = memoryview(bytearray(BLOCK))
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def first_run(folder: Path) -> None:
    for place in integrity.stamp_places(folder):
        place.stamp.unlink(missing_ok=True)
    assert integrity.verify_dataset(folder, log=lambda m: None) == "hashed"


def later_run(folder: Path) -> None:
    assert integrity.verify_dataset(folder, log=lambda m: None) == "stamp"


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = None if args.dir else Path(tempfile.mkdtemp(prefix="hpctrain-bench-integrity-"))
    folder = Path(args.dir) if args.dir else tmp / "ds"
    os.environ.setdefault("HPCTRAIN_CACHE", str((tmp or folder.parent) / "cache"))
    try:
        make_dataset(folder, args)
        paths = shard_paths(folder)
        size = sum(p.stat().st_size for p in paths)
        threads = min(integrity.MAX_HASH_THREADS, integrity._cpus(), len(paths))
        print(f"{len(paths)} shards, {size / 1e6:,.1f} MB, page cache {'evicted' if args.cold else 'warm'}, "
              f"{integrity._cpus()} cores available, {threads} hash threads")
        best = {"raw": float("inf"), "hash1": float("inf"), "hashN": float("inf")}
        saved = integrity.MAX_HASH_THREADS
        for _ in range(args.rounds):
            warm(paths, args.cold)
            best["raw"] = min(best["raw"], timed(lambda: raw_read(paths)))
            warm(paths, args.cold)
            integrity.MAX_HASH_THREADS = 1
            best["hash1"] = min(best["hash1"], timed(lambda: first_run(folder)))
            integrity.MAX_HASH_THREADS = saved
            warm(paths, args.cold)
            best["hashN"] = min(best["hashN"], timed(lambda: first_run(folder)))
        later_run(folder)
        checks = [timed(lambda: later_run(folder)) for _ in range(args.stamp_checks)]
        stamp = statistics.median(checks)
        gbs = {k: size / 1e9 / v for k, v in best.items()}
        print(f"(a) raw read                     {gbs['raw']:7.2f} GB/s   {best['raw']:8.3f} s")
        print(f"(b) first run, sha256, 1 thread  {gbs['hash1']:7.2f} GB/s   {best['hash1']:8.3f} s   "
              f"(b)/(a) = {gbs['hash1'] / gbs['raw']:.2f}")
        print(f"(b) first run, sha256, {threads} threads {gbs['hashN']:7.2f} GB/s   {best['hashN']:8.3f} s   "
              f"(b)/(a) = {gbs['hashN'] / gbs['raw']:.2f}")
        print(f"(c) later run, stamp check      {stamp * 1e3:8.3f} ms (median of {len(checks)}, "
              f"{stamp / len(paths) * 1e6:.1f} us per shard)   (c)/(b) = {stamp / best['hashN']:.2e}")
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
