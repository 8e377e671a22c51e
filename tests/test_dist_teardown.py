"""Leaving a backend: no communication thread may outlive it, and a finished run exits 0.

The torch backend's Gloo worker threads end only when the process group itself is freed,
not when destroy_process_group() forgets it. One that is still alive when the interpreter
finalises aborts a run that finished (status 134, "terminate called without an active
exception") whenever it drops a tensor at the wrong moment; these tests look for the
threads themselves, which is deterministic, and then provoke the abort on purpose.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import require
from mpi_scripts.launch import HERE, clean_env, mpirun_available, results, run_mpi
from tiny_run import launch_run, write_tiny_config

pytestmark = pytest.mark.mpi

# Thread names of torch.distributed's Gloo backend and of its TCP store.
TORCH_THREADS = ("pt_gloo", "gloo_", "pt_tcpstore")


def torch_threads(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith(TORCH_THREADS)]


def ranks_of(out) -> dict:
    assert out.returncode == 0, f"{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    found = results(out.stdout)
    assert sorted(found) == [0, 1], out.stdout[-2000:]
    return found


@pytest.mark.parametrize("backend, mode", [
    ("torch", "done"), ("torch", "error"), ("torch", "no_shutdown"),
    ("horovod", "done"), ("mpi", "done"),
])
def test_no_torch_thread_outlives_the_backend(backend, mode):
    require(mpirun_available(), "mpirun is not installed")
    found = ranks_of(run_mpi("teardown_paths.py", backend, mode, np=2, timeout=120))
    for rank, r in found.items():
        assert torch_threads(r["threads"]) == [], f"rank {rank} ({mode}): {r['threads']}"


def test_a_real_run_leaves_no_gloo_thread(tmp_path):
    require(mpirun_available(), "mpirun is not installed")
    config = write_tiny_config(tmp_path, "torch")
    out = run_mpi("run_and_list_threads.py", str(config), str(tmp_path / "sweep"), np=2, timeout=180)
    for rank, r in ranks_of(out).items():
        assert r["exit"] == 0
        assert torch_threads(r["threads"]) == [], f"rank {rank}: {r['threads']}"


@pytest.mark.parametrize("backend", ["torch", "horovod", "mpi"])
def test_a_diverged_run_exits_zero(tmp_path, backend):
    require(mpirun_available(), "mpirun is not installed")
    config = write_tiny_config(tmp_path, backend, name="diverge", lr=1e30)  # Adam's first steps overflow
    launch = launch_run(config, tmp_path / "sweep")
    assert (launch.returncode, launch.status) == (0, "diverged"), launch.tail()


@pytest.mark.slow
def test_a_slow_gloo_worker_does_not_abort_a_finished_run(tmp_path):
    """Gloo workers wait 0.2 s before taking the GIL: with a group still alive at interpreter
    exit, about half of such launches abort after the run is done (5 of 10 before the fix)."""
    require(mpirun_available(), "mpirun is not installed")
    compiler = shutil.which("cc") or shutil.which("gcc")
    require(compiler is not None, "no C compiler to build tests/mpi_scripts/slow_gloo_gil.c")
    shim = tmp_path / "slow_gloo_gil.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(shim), str(HERE / "slow_gloo_gil.c"), "-ldl",
                    "-lpthread"], check=True, capture_output=True, timeout=120)
    config = write_tiny_config(tmp_path, "torch")
    env = clean_env(LD_PRELOAD=str(shim), HOLD_US="200000")
    failures = []
    for i in range(1, 4):
        launch = launch_run(config, tmp_path / f"sweep{i}", env=env, timeout=300)
        if (launch.returncode, launch.status) != (0, "done"):
            failures.append(f"launch {i}: exit status {launch.returncode}, run status {launch.status!r}\n"
                            f"{launch.tail()}")
    assert not failures, "\n\n".join(failures)
