"""The README's first command, `make demo`, end to end: every element exits 0 and every run is done."""
from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from mpi_scripts.launch import clean_env

pytestmark = [pytest.mark.mpi, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def test_demo_sweep_as_make_demo_runs_it_ends_6_of_6_done_every_element_exit_0(tmp_path):
    # No overrides: `dist.backend: auto` picks mpi for the CPU ranks mpirun starts.
    sweep = tmp_path / "demo"
    result = subprocess.run(["bash", "scripts/demo.sh"], capture_output=True, text=True,
                            timeout=1200, cwd=REPO, env=clean_env(SWEEP=str(sweep), OMP_NUM_THREADS="1"))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    exits = [line.rsplit("exit status", 1)[1].split()[0] for line in result.stdout.splitlines()
             if "exit status" in line]
    assert exits == ["0"] * 6, out[-4000:]
    assert "6 run(s): 6 done" in result.stdout
    states = [json.loads(p.read_text()) for p in sorted((sweep / "runs").glob("*/state.json"))]
    assert [s["status"] for s in states] == ["done"] * 6
    assert {(s["backend"], s["world_size"]) for s in states} == {("mpi", 2)}
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 6 and (sweep / "leaderboard.md").exists()
    logs = "".join(p.read_text() for p in (sweep / "logs" / "local").glob("*.log"))
    assert "terminate called" not in logs and "Traceback" not in logs
