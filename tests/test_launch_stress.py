"""Launch paths under repetition: 20 consecutive 2-rank `hpctrain run` launches per backend.

A crash at interpreter exit (a Gloo worker thread releasing a tensor after finalisation
began) hit one launch in three or four; only repetition finds it. Every launch must exit 0
and end with state `done`.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import require
from mpi_scripts.launch import MPIRUN_ARGS, clean_env, mpirun_available

pytestmark = [pytest.mark.mpi, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
LAUNCHES = 20


def _config(folder: Path, backend: str) -> Path:
    cfg = {"name": f"stress-{backend}", "seed": 0,
           "data": {"path": str(folder / "data"), "task": "binary", "batch_size": 64,
                    "synth": {"rows": 1200, "features": 8, "shards": 2, "seed": 0}},
           "model": {"hidden": [16]}, "optim": {"name": "adam", "lr": 0.01},
           "train": {"epochs": 1, "threads": 1}, "dist": {"backend": backend}}
    path = folder / "stress.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _horovod_imports() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import horovod.torch"], capture_output=True, timeout=120)
    return probe.returncode == 0


@pytest.mark.parametrize("backend", ["torch", "horovod", "mpi"])
def test_twenty_consecutive_2_rank_launches_all_exit_0_and_done(backend, tmp_path):
    require(mpirun_available(), "mpirun (Open MPI)")
    if backend == "horovod":
        require(_horovod_imports(), "Horovod (scripts/install-horovod.sh)")
    config = _config(tmp_path, backend)
    failures, started = [], time.monotonic()
    for launch in range(LAUNCHES):
        sweep = tmp_path / f"sweep{launch}"
        cmd = ["mpirun", "-np", "2", *MPIRUN_ARGS, sys.executable, "-m", "hpctrain", "run", str(config),
               "--index", "0", "--sweep-dir", str(sweep)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO, env=clean_env())
        states = [json.loads(p.read_text())["status"] for p in sweep.glob("runs/*/state.json")]
        if out.returncode != 0 or states != ["done"]:
            tail = (out.stdout + out.stderr)[-1500:]
            failures.append(f"launch {launch}: exit status {out.returncode}, states {states}\n{tail}")
    elapsed = time.monotonic() - started
    print(f"{backend}: {LAUNCHES - len(failures)}/{LAUNCHES} launches exit 0 and done in {elapsed:.0f} s")
    assert not failures, f"{len(failures)} of {LAUNCHES} {backend} launches failed:\n" + "\n".join(failures)
