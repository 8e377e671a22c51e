"""Shared fixtures: the repository paths and a real local Slurm cluster; ``require``.

``slurm_cluster`` starts the cluster with scripts/local-slurm.sh once per test session
(a cluster already running under the same folder is reused and left running) and
exports SLURM_CONF to the tests and the processes they start.

``require(available, what)`` skips a test whose tool (mpirun, scontrol, Horovod) is
missing, except where HPCTRAIN_REQUIRE_ALL=1 (CI, ``make test``): there it fails, so a
broken install cannot pass as a run of skips.
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


def require(available: bool, what: str) -> None:
    """Go on when ``available``; else skip, or fail where HPCTRAIN_REQUIRE_ALL=1."""
    if available:
        return
    if os.environ.get("HPCTRAIN_REQUIRE_ALL") == "1":
        pytest.fail(f"{what} (HPCTRAIN_REQUIRE_ALL=1: every test must run here)", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of a running single-node cluster; skips (see ``require``) only when it cannot be started here."""
    script = REPO / "scripts" / "local-slurm.sh"
    require(shutil.which("slurmctld") is not None or os.geteuid() == 0,
            "Slurm is not installed and installing it needs root (scripts/local-slurm.sh)")
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
