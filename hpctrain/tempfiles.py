"""Leftover temp files of atomic writes whose writer died mid-write (kill -9, a lost node).

:func:`hpctrain.fsutil.atomic_write` writes ``.<target>.<pid>@<host>.<random>.tmp`` and
renames it over the target; a writer killed before the rename leaves the temp file behind,
and nothing else would ever remove it. A temp file is stale when no writer can still be at
work on it:

- written on this host by a pid that no longer exists;
- written on another host (whose processes cannot be seen from here), or named without its
  writer (hpctrain before the writer was recorded), and untouched for ``STALE_AFTER_S``: a
  writer writes its file in one go, so one that has not changed for an hour has no writer.

A file of a live pid on this host is kept however old it is: removing a live writer's file
would make its rename fail. (A reused pid only delays the clean-up.)
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional

from .fsutil import temp_writer

STALE_AFTER_S = 3600.0


def remove_stale_temp_files(folder: str | os.PathLike, log: Callable[[str], None] = print) -> list[Path]:
    """Remove the stale temp files directly in ``folder``; returns them (one log line if any)."""
    removed = []
    for path in stale_temp_files(folder):
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:  # another process cleaned it up first
            continue
        removed.append((path, size))
    if removed:
        kib = sum(size for _, size in removed) / 1024
        log(f"removed {len(removed)} temp files of writers that died mid-write ({kib:.0f} KiB) in {folder}")
    return [path for path, _ in removed]


def stale_temp_files(folder: str | os.PathLike, now: Optional[float] = None) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now = time.time() if now is None else now
    host = socket.gethostname()
    return sorted(p for p in folder.iterdir()
                  if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file() and _is_stale(p, host, now))


def _is_stale(path: Path, host: str, now: float) -> bool:
    writer = temp_writer(path.name)
    if writer is not None and writer[1] == host:
        return not _pid_alive(writer[0])
    try:
        return now - path.stat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True
