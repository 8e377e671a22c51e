"""Put a run's state.json on disk as a test scene (what a finished or crashed job left behind).

Production code writes state.json only through hpctrain.runstate.RunRecorder; tests that need
a given state on disk write the file the way the recorder does, atomically.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from hpctrain.fsutil import atomic_write_json
from hpctrain.runstate import RunState


def put_state(run_dir: str | Path, state: RunState) -> None:
    atomic_write_json(Path(run_dir) / "state.json", dataclasses.asdict(state))
