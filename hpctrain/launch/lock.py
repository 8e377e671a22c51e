"""One submitter at a time per sweep folder.

Two ``hpctrain submit`` of the same sweep at the same moment would both see the same runs
unsubmitted and submit two arrays training in the same run folders. The submitter holds
``SWEEP/.submit.lock`` from laying out the folder until every job id is recorded; a
second one waits for it, then finds those runs queued and skips them.

The lock file is created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and on
NFSv3 and later) and holds who took it. A lock whose holder is gone is stale: on the same
host, when its pid no longer runs; from another host, when it is older than ``stale_after_s``
(no process there can be asked).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from ..errors import HpctrainError

LOCK_NAME = ".submit.lock"


class SweepLocked(HpctrainError):
    """Another live process holds the sweep's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


class SweepLock:
    def __init__(self, root: str | os.PathLike, *, wait_s: float = 60.0, stale_after_s: float = 3600.0,
                 poll_s: float = 0.2):
        self.path = Path(root) / LOCK_NAME
        self.wait_s, self.stale_after_s, self.poll_s = wait_s, stale_after_s, poll_s
        self._held = False

    def __enter__(self) -> "SweepLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        while not self._try_create():
            holder = self.holder()
            if holder is not None and self._is_stale(holder):
                self._break(holder)
                continue
            if time.monotonic() >= deadline:
                raise SweepLocked(f"{self.path.parent} is being submitted by {self._describe(holder)}; "
                                  f"waited {self.wait_s:g} s. Run again when it has finished, or remove "
                                  f"{self.path} if that process is gone")
            time.sleep(self.poll_s)
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def holder(self) -> Optional[dict]:
        """Who holds the lock ({} while the holder is still writing it), None when it is free."""
        try:
            text = self.path.read_text(encoding="utf-8")
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            info = json.loads(text)
        except ValueError:
            info = {}
        info.setdefault("time", mtime)
        return info

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        record = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                  "command": " ".join(["hpctrain", *sys.argv[1:3]])}
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        return True

    def _is_stale(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname() and "pid" in holder:
            return not _pid_alive(int(holder["pid"]))
        return time.time() - float(holder.get("time", time.time())) > self.stale_after_s

    def _break(self, holder: dict) -> None:
        # Another waiter may have broken it and taken a fresh lock since we read it.
        if self.holder() != holder:
            return
        print(f"hpctrain: removing the stale lock {self.path} of {self._describe(holder)}", file=sys.stderr)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    @staticmethod
    def _describe(holder: Optional[dict]) -> str:
        if not holder:
            return "another process"
        when = time.strftime("%H:%M:%S", time.localtime(float(holder.get("time", 0))))
        return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} ({holder.get('command', '?')}, since {when})"
