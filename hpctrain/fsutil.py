"""Atomic file writes: readers never see a half-written file.

Every file that another process may read while it is being written (state.json,
metrics, checkpoints, summaries) goes through here: write a temporary file in the
same folder, fsync it, then rename it over the target. rename() within one
filesystem is atomic on POSIX, so a reader sees either the old or the new file.
"""
from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, IO, Optional

# .<target>.<pid>@<host>.<random>.tmp: the writer's pid and host let a later process tell the
# leftover of a writer killed mid-write from a live writer's file (hpctrain.tempfiles).
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.(?P<pid>\d+)@(?P<host>[^/]+)\.[a-z0-9_]+\.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, durable: bool = True) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, then rename it into place.

    ``durable=False`` skips the fsyncs: readers still never see a partial file, but a crash
    of the machine may lose the write. For files that can be made again (a sweep's layout).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.{os.getpid()}@{socket.gethostname()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        _fsync_dir(path.parent)


def temp_writer(name: str) -> Optional[tuple[int, str]]:
    """(pid, host) of the process that made the temp file ``name``; None for any other name,
    including temp files named before the writer was recorded (``.<target>.<random>.tmp``)."""
    m = _TEMP_NAME.fullmatch(name)
    return (int(m["pid"]), m["host"]) if m else None


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the directory entry is flushed.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    atomic_write(path, lambda f: f.write(data), durable=durable)


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)
