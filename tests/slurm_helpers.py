"""Helpers of the tests that run on the local Slurm cluster: restarting it with other
settings (scripts/local-slurm.sh) and waiting for what a job does."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "local-slurm.sh"
SETTINGS = ("HPCTRAIN_SLURM_MAX_ARRAY", "HPCTRAIN_SLURM_ACCOUNTING", "HPCTRAIN_SLURM_NODES")


def restart_cluster(**settings) -> None:
    """local-slurm.sh restart with these settings, the others at their defaults."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update({f"HPCTRAIN_SLURM_{k.upper()}": str(v) for k, v in settings.items()})
    result = subprocess.run([str(SCRIPT), "restart"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def wait_until(predicate, timeout: float, what: str, poll: float = 1.0):
    """The first truthy value of ``predicate()``, polled; fails the test after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
