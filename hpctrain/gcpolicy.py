"""Garbage collection while a run starts: no full collections of the import-time heap.

Importing torch (and torch._dynamo, which its optimizers load on first use) builds a heap
of about 300,000 objects that live as long as the process. Every full collection scans
all of them (180 ms each on the 2-core development VM), and building that heap triggers
five of them: 0.3-0.6 s of every rank's start (docs/benchmarks.md, "Start-up"). So
``hpctrain run`` defers full collections while it starts, and the runner settles once the
run's parts are built: the heap built so far is frozen out of every later collection and
full collections resume. Young objects are collected all along.
"""
from __future__ import annotations

import gc
from typing import Optional

_saved_thresholds: Optional[tuple[int, int, int]] = None
# A full collection runs when this many young-generation collections have passed, at most:
# never, within a start.
_NEVER = 1 << 30


def defer_full_collections() -> None:
    """Until ``settle``: young generations only. Call before the heavy imports."""
    global _saved_thresholds
    if _saved_thresholds is None:
        _saved_thresholds = gc.get_threshold()
        gc.set_threshold(_saved_thresholds[0], _saved_thresholds[1], _NEVER)


def settle() -> None:
    """The start is over: freeze what exists (it lives as long as the process) and restore
    the thresholds. Does nothing unless collections were deferred."""
    global _saved_thresholds
    if _saved_thresholds is None:
        return
    gc.freeze()
    gc.set_threshold(*_saved_thresholds)
    _saved_thresholds = None


def deferred() -> bool:
    return _saved_thresholds is not None
