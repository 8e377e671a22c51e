"""The sweep lock: one submitter at a time, stale locks of dead holders broken, live ones reported."""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time

import pytest

from hpctrain.launch.lock import LOCK_NAME, SweepLock, SweepLocked


def _hold(root, seconds, ready):
    with SweepLock(root):
        ready.set()
        time.sleep(seconds)


def test_a_second_holder_waits_for_the_first(tmp_path):
    ready = multiprocessing.Event()
    proc = multiprocessing.Process(target=_hold, args=(tmp_path, 1.5, ready))
    proc.start()
    assert ready.wait(30)
    started = time.monotonic()
    with SweepLock(tmp_path, wait_s=30):
        waited = time.monotonic() - started
    proc.join(30)
    assert waited > 0.5
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_live_holder_is_named_when_waiting_runs_out(tmp_path):
    with SweepLock(tmp_path):
        with pytest.raises(SweepLocked, match=rf"pid {os.getpid()} on {socket.gethostname()}"):
            SweepLock(tmp_path, wait_s=0.3).acquire()
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_of_a_dead_process_is_broken(tmp_path):
    proc = multiprocessing.Process(target=time.sleep, args=(0,))
    proc.start()
    proc.join()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": proc.pid,
                                                  "time": time.time(), "command": "hpctrain submit"}))
    with SweepLock(tmp_path, wait_s=1) as lock:
        assert lock.holder()["pid"] == os.getpid()


def test_a_lock_from_another_host_is_stale_only_when_old(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": time.time()}))
    with pytest.raises(SweepLocked, match="elsewhere"):
        SweepLock(tmp_path, wait_s=0.3).acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": time.time() - 7200}))
    with SweepLock(tmp_path, wait_s=1, stale_after_s=3600):
        pass
