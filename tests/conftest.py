"""Shared fixtures: the repository paths and a real local Slurm cluster.

``slurm_cluster`` starts the cluster with scripts/local-slurm.sh once per test session
(a cluster already running under the same folder is reused and left running) and
exports SLURM_CONF to the tests and the processes they start.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of a running single-node cluster; skips only when it cannot be started here."""
    script = REPO / "scripts" / "local-slurm.sh"
    if shutil.which("slurmctld") is None and os.geteuid() != 0:
        pytest.skip("Slurm is not installed and installing it needs root (scripts/local-slurm.sh)")
    status = subprocess.run([str(script), "status"], capture_output=True, text=True, timeout=60)
    was_running = status.returncode == 0
    started = subprocess.run([str(script), "start"], capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, f"local-slurm.sh start failed:\n{started.stdout}\n{started.stderr}"
    conf = re.search(r"export SLURM_CONF=(\S+)", started.stdout).group(1)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    if not was_running:
        subprocess.run([str(script), "stop"], capture_output=True, text=True, timeout=120)
