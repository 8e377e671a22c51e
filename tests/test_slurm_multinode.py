"""Two slurmd "nodes" on this host (local-slurm.sh with HPCTRAIN_SLURM_NODES=2): an element of
2 nodes x 1 rank trains exactly as 1 node x 2 ranks does, with torch.distributed and Horovod."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import require
from slurm_helpers import restart_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.mpi]
REPO = Path(__file__).resolve().parents[1]
SHAPES = {"2x1": (2, 1), "1x2": (1, 2)}  # nodes x tasks per node


def horovod_built() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import horovod.torch"], capture_output=True, timeout=120)
    return probe.returncode == 0


def write_config(folder: Path, backend: str, shape: str) -> Path:
    nodes, tasks = SHAPES[shape]
    raw = {"name": f"{backend}-{shape}", "seed": 0,
           # One data folder per sweep (the same rows): sweeps that start together would all
           # make a shared one at once.
           "data": {"path": str(folder / f"data-{backend}-{shape}"), "task": "binary", "batch_size": 64,
                    "synth": {"rows": 2000, "features": 8, "shards": 2, "seed": 0}},
           "model": {"hidden": [16]}, "optim": {"name": "adam", "lr": 0.01},
           "train": {"epochs": 2, "threads": 1}, "dist": {"backend": backend},
           "slurm": {"nodes": nodes, "tasks_per_node": tasks, "cpus_per_task": 1, "time_min": 10}}
    path = folder / f"{backend}-{shape}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_state(sweep: Path) -> dict:
    runs = list((sweep / "runs").glob("*/state.json")) if (sweep / "runs").exists() else []
    return json.loads(runs[0].read_text()) if runs else {"status": "?"}


def metrics(sweep: Path) -> list[dict]:
    """metrics.csv without its clock columns (wall time, throughput)."""
    rows = list(csv.DictReader(next((sweep / "runs").glob("*/metrics.csv")).open()))
    return [{k: v for k, v in r.items() if not any(w in k for w in ("time", "per_s", "wall", "_s"))} for r in rows]


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster, tmp_path_factory):
    """Every sweep of SHAPES x backends, submitted at once to a 2-node cluster, finished."""
    restart_cluster(nodes=2)
    try:
        folder = tmp_path_factory.mktemp("multinode")
        backends = ["torch"] + (["horovod"] if horovod_built() else [])
        sweeps = {}
        for backend in backends:
            for shape in SHAPES:
                sweep = folder / f"{backend}-{shape}"
                config = write_config(folder, backend, shape)
                result = subprocess.run([sys.executable, "-m", "hpctrain", "submit", str(config), "--executor", "slurm",
                                         "--sweep-dir", str(sweep), "--no-collect"],
                                        capture_output=True, text=True, timeout=300, cwd=REPO)
                assert result.returncode == 0, result.stderr
                sweeps[(backend, shape)] = sweep
        deadline = time.time() + 300
        while time.time() < deadline and any(run_state(s)["status"] not in ("done", "failed") for s in sweeps.values()):
            time.sleep(2)
        nodelists = {key: node_list(run_state(s).get("slurm_job_id") or "") for key, s in sweeps.items()}
        yield sweeps, nodelists
    finally:
        restart_cluster()


def node_list(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%N"], capture_output=True, text=True,
                         timeout=30).stdout
    return out.strip()


@pytest.mark.parametrize("backend", ["torch", "horovod"])
def test_two_nodes_of_one_rank_train_as_one_node_of_two(two_nodes, backend):
    sweeps, nodelists = two_nodes
    if backend == "horovod":
        require(("horovod", "2x1") in sweeps, "Horovod is not built (scripts/install-horovod.sh)")
    wide, tall = sweeps[(backend, "2x1")], sweeps[(backend, "1x2")]
    for sweep in (wide, tall):
        state = run_state(sweep)
        assert state["status"] == "done" and state["world_size"] == 2 and state["backend"] == backend, state
    assert nodelists[(backend, "2x1")] == "node[1-2]"
    assert "," not in nodelists[(backend, "1x2")] and "[" not in nodelists[(backend, "1x2")]
    first, second = metrics(wide), metrics(tall)
    assert len(first) == 2 and first == second
