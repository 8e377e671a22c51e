"""Recording a run whose ranks the launcher killed: the dead rank is named from srun's or mpirun's report."""
from __future__ import annotations

from types import SimpleNamespace

from hpctrain.launch.step_end import first_dead_rank, record_lost_run
from hpctrain.runstate import RunRecorder, read_state

SRUN = """run 0/1: lr0.01_15431863 in /tmp/sw/runs/lr0.01_15431863
srun: error: localhost: task 1: Killed
slurmstepd-localhost: error:  mpi/pmix_v4: _errhandler: localhost [0]: pmixp_client_v2.c:211: Error handler invoked
srun: error: localhost: task 0: Killed
"""
MPIRUN = """--------------------------------------------------------------------------
mpirun noticed that process rank 1 with PID 0 on node vm exited on signal 9 (Killed).
--------------------------------------------------------------------------
"""


def test_the_first_rank_the_launcher_reports_is_named():
    assert first_dead_rank(SRUN) == "rank 1 (Killed on localhost)"
    assert first_dead_rank(MPIRUN) == "rank 1 (signal 9 (Killed) on vm)"
    assert first_dead_rank("srun: error: n3: tasks 2-3: Exited with exit code 7") == "rank 2 (Exited with exit code 7 on n3)"
    assert first_dead_rank("nothing to see") is None


def _running(tmp_path):
    rec = RunRecorder(tmp_path, index=0, run_id="r", params={})
    rec.pending(total_epochs=4)
    rec.running(total_epochs=4, world_size=2, backend="horovod", job_id="7_0")
    return rec


def test_a_run_left_running_is_recorded_failed_naming_the_rank(tmp_path):
    rec = _running(tmp_path)
    assert record_lost_run(rec, "srun", 137, SRUN)
    state = read_state(tmp_path)
    assert state.status == "failed" and state.requeues == 0
    assert "rank 1 (Killed on localhost) died" in state.message and "exit status 137" in state.message


def test_a_run_that_recorded_its_outcome_is_left_alone(tmp_path):
    rec = _running(tmp_path)
    rec.report(SimpleNamespace(status="preempted", message="stopped by SIGTERM", epoch=1, total_epochs=4, step=9,
                               best_metric=None, best_epoch=None, monitor="val_loss", world_size=2,
                               backend="horovod", wall_time_s=1.0, samples_per_s=None, test={}))
    assert not record_lost_run(rec, "srun", 143, SRUN)
    assert read_state(tmp_path).status == "preempted"
