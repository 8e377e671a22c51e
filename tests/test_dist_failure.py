"""A rank that dies or hangs mid-training makes the job fail in bounded time with a clear message.

2 ranks under mpirun (with orte_abort_on_non_zero_status, Open MPI's default made explicit);
rank 1 leaves after 3 training steps: `die` is os._exit(1), `hang` sleeps for an hour.
"""
import time

import pytest

from conftest import require
from mpi_scripts.launch import mpirun_available, run_mpi

TIMEOUT_S = 8  # dist.timeout_s of the ranks: short, yet longer than a late start on a loaded machine


def _run(backend: str, mode: str, marker):
    require(mpirun_available(), "mpirun is not installed")
    start = time.monotonic()
    out = run_mpi("fail_rank.py", backend, mode, str(TIMEOUT_S), str(marker), np=2, timeout=60)
    return out, time.monotonic() - start, out.stdout + out.stderr


@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["torch", "horovod", "mpi"])
def test_dead_rank_fails_the_job(backend, tmp_path):
    out, elapsed, text = _run(backend, "die", tmp_path / "marker")
    assert (tmp_path / "marker").read_text() == "rank 1: die at step 3" and "finished all steps" not in text
    assert out.returncode != 0
    assert elapsed < 30
    # Open MPI names the rank that exited; or the survivor's collective saw the closed connection first.
    assert ("exited with non-zero status" in text or "rank 1 failed" in text or "MPI_ABORT" in text), text[-3000:]


@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["torch", "horovod"])
def test_hung_rank_times_out_with_a_clear_message(backend, tmp_path):
    out, elapsed, text = _run(backend, "hang", tmp_path / "marker")
    assert (tmp_path / "marker").read_text() == "rank 1: hang at step 3" and "finished all steps" not in text
    assert out.returncode != 0
    assert elapsed < 40  # the hung rank sleeps for an hour: only the timeout ends the job
    assert (f"{backend} collective on rank 0 of 2 timed out after {TIMEOUT_S} s (dist.timeout_s): "
            "rank 1 stopped taking part") in text, text[-3000:]
