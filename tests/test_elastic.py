"""Elastic determinism through the CLI: the real ShardLoader (shuffled), `hpctrain run` on one
process against `mpirun -np 2` and `-np 4` with the global batch shared out, for every
backend; and runs preempted mid-epoch on one world size and resumed on another.

Every run trains 3 epochs with a global batch of 256 (`data.global_batch_size`, so the run id
and run folder do not depend on the world size); its metrics.csv must equal the single
process's to 1e-4 relative, value by value. The weighted multiclass dataset checks that the
loss is the weighted mean over the global batch, not a mean of the ranks' means.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import require
from hpctrain import exitcodes
from mpi_scripts.launch import PYTHON, REPO, clean_env, mpirun_available

HPCTRAIN = str(Path(PYTHON).with_name("hpctrain"))
REL = 1e-4
SYNC_EVERY = 5  # ranks act on a stop request at steps 5, 10, ... : step 5 is inside epoch 1 (13 steps)
SIGUSR1_BIT = 1 << (signal.SIGUSR1 - 1)

pytestmark = pytest.mark.mpi


def horovod_imports() -> bool:
    # In a child process: importing horovod.torch here would load its MPI into pytest.
    return subprocess.run([PYTHON, "-c", "import horovod.torch"], capture_output=True, env=clean_env()).returncode == 0


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    from hpctrain.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("elastic-data")
    return {
        "binary": make_synthetic(root / "binary", rows=4000, features=8, task="binary", shards=4, seed=1),
        "weighted": make_synthetic(root / "weighted", rows=4000, features=8, task="multiclass", classes=4,
                                   shards=4, weights=True, seed=2),
    }


def write_config(folder: Path, data: Path, kind: str, backend: str) -> Path:
    cfg = {
        "name": f"elastic-{kind}", "seed": 0,
        # Small blocks and rounds of 2 global batches, so the order has many pieces to get wrong.
        "data": {"path": str(data), "task": "binary" if kind == "binary" else "multiclass",
                 "global_batch_size": 256, "block_rows": 128, "buffer_blocks": 4, "prefetch": 2},
        "model": {"hidden": [32, 32]}, "optim": {"name": "adam", "lr": 0.003},
        "loss": {"weighted": kind == "weighted"},
        "train": {"epochs": 3, "evaluate_test": False, "threads": 1},
        "dist": {"backend": backend, "sync_every_steps": SYNC_EVERY, "timeout_s": 120},
    }
    path = folder / f"{kind}-{backend}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def command(config: Path, sweep: Path, np: int) -> list[str]:
    run = [HPCTRAIN, "run", str(config), "--sweep-dir", str(sweep)]
    return run if np == 1 else ["mpirun", "-np", str(np), "--oversubscribe", *run]


def train(config: Path, sweep: Path, np: int) -> list[dict]:
    proc = subprocess.run(command(config, sweep, np), capture_output=True, text=True, timeout=300,
                          env=clean_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return metrics(sweep)


def metrics(sweep: Path) -> list[dict]:
    (run,) = (sweep / "runs").iterdir()
    with open(run / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert list(g) == list(w)
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=REL, abs=1e-12), (g["epoch"], key)


@pytest.fixture(scope="module")
def reference(datasets, tmp_path_factory):
    """One process, global batch 256 in one piece; computed once per dataset."""
    folder, cache = tmp_path_factory.mktemp("elastic-reference"), {}

    def get(kind: str) -> list[dict]:
        if kind not in cache:
            cache[kind] = train(write_config(folder, datasets[kind], kind, "none"), folder / kind, 1)
            assert cache[kind][-1]["train_loss"] < 0.8 * cache[kind][0]["train_loss"]  # it does learn
        return cache[kind]
    return get


def require_backend(backend: str) -> None:
    require(mpirun_available(), "mpirun is not installed")
    if backend == "horovod":
        require(horovod_imports(), "horovod.torch does not import (scripts/install-horovod.sh)")


# Every backend, dataset and world size; the default run covers each at least once and the
# rest of the grid is marked slow (every launch starts 2-4 interpreters on a 2-core machine).
FAST = {("binary", "torch", 4), ("binary", "horovod", 2), ("binary", "mpi", 2),
        ("weighted", "torch", 2), ("weighted", "horovod", 2), ("weighted", "mpi", 4)}
GRID = [pytest.param(kind, backend, np, marks=() if (kind, backend, np) in FAST else pytest.mark.slow)
        for kind in ("binary", "weighted") for backend in ("torch", "horovod", "mpi") for np in (2, 4)]


@pytest.mark.parametrize("kind, backend, np", GRID)
def test_ranks_sharing_the_global_batch_match_one_process(datasets, reference, tmp_path, kind, backend, np):
    require_backend(backend)
    got = train(write_config(tmp_path, datasets[kind], kind, backend), tmp_path / "sweep", np)
    assert_same_metrics(got, reference(kind))


def rank_pids(proc: subprocess.Popen, np: int, timeout: float = 120) -> list[int]:
    """The processes that train: ``proc`` itself, or mpirun's children."""
    if np == 1:
        return [proc.pid]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        if len(children) == np:
            return [int(c) for c in children]
        time.sleep(0.02)
    raise AssertionError(f"mpirun did not start {np} ranks")


def catches_sigusr1(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & SIGUSR1_BIT)
    return False


def preempt(config: Path, sweep: Path, np: int) -> str:
    """Start the run and send every rank SIGUSR1 (what `scancel --signal=USR1` does) as soon as
    all of them catch it, long before their first step; returns the run's state message."""
    proc = subprocess.Popen(command(config, sweep, np), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=clean_env(), cwd=REPO)
    try:
        pids = rank_pids(proc, np)
        deadline = time.monotonic() + 120
        while not all(catches_sigusr1(p) for p in pids):
            assert proc.poll() is None and time.monotonic() < deadline, "the ranks never installed their handler"
            time.sleep(0.01)
        for pid in pids:
            os.kill(pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == exitcodes.PREEMPTED, out[-3000:]
    (run,) = (sweep / "runs").iterdir()
    return json.loads((run / "state.json").read_text())["message"]


@pytest.mark.parametrize("first_np, then_np, backend, stop_step", [
    (4, 2, "mpi", SYNC_EVERY),  # ranks agree on the stop at the first sync step
    (1, 2, "torch", 1),  # one process checks its flag after every step (torch on one process: none)
])
def test_preempted_mid_epoch_resumes_on_another_world_size(datasets, reference, tmp_path, first_np, then_np,
                                                           backend, stop_step):
    require_backend("mpi")
    config = write_config(tmp_path, datasets["binary"], "binary", backend)
    message = preempt(config, tmp_path / "sweep", first_np)
    assert f"stopped by SIGUSR1 at epoch 1, step {stop_step}; saved last.pt" in message
    proc = subprocess.run(command(config, tmp_path / "sweep", then_np), capture_output=True, text=True,
                          timeout=300, env=clean_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from last.pt: epoch 0, step {stop_step} (batch {stop_step} of epoch 1)" in proc.stdout
    assert f"the checkpoint was written by {first_np} ranks, this run has {then_np}" in proc.stdout
    assert "saved under other settings" not in proc.stdout + proc.stderr  # an exact continuation, no fallback
    assert_same_metrics(metrics(tmp_path / "sweep"), reference("binary"))
