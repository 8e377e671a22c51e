"""The run-state recorder: the transitions users read in `hpctrain status` and state.json."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from hpctrain.runstate import RunRecorder, RunState, read_state


def progress(status="running", message="", epoch=1, **extra):
    fields = dict(status=status, message=message, epoch=epoch, total_epochs=4, step=10 * epoch,
                  best_metric=0.5, best_epoch=epoch, monitor="val_loss", world_size=2, backend="torch",
                  wall_time_s=1.5 * epoch, samples_per_s=100.0, test={})
    fields.update(extra)
    return SimpleNamespace(**fields)


def recorder(tmp_path):
    return RunRecorder(tmp_path, index=3, run_id="lr0.1_abcd1234", params={"optim.lr": 0.1})


def test_pending_is_written_once_and_never_resets_a_run(tmp_path):
    rec = recorder(tmp_path)
    first = rec.pending(total_epochs=4)
    assert (first.status, first.index, first.run_id, first.params) == ("pending", 3, "lr0.1_abcd1234",
                                                                        {"optim.lr": 0.1})
    assert first.slurm_job_id is None and first.total_epochs == 4
    rec.report(progress("done", "finished 4 epochs", epoch=4))
    assert rec.pending(total_epochs=4) is None
    assert read_state(tmp_path).status == "done"


def test_a_run_goes_pending_running_preempted_running_done_counting_one_requeue(tmp_path):
    rec = recorder(tmp_path)
    rec.pending(total_epochs=4)
    rec.queued("51_3", total_epochs=4, monitor="val_loss", exists=True)
    assert read_state(tmp_path).slurm_job_id == "51_3"
    state = rec.running(total_epochs=4, world_size=2, backend="torch", job_id="51_3")
    assert (state.status, state.requeues, state.world_size, state.backend) == ("running", 0, 2, "torch")
    started = state.started_at
    rec.report(progress("running", "resumed from last.pt"))
    rec.report(progress("running", epoch=2))
    assert read_state(tmp_path).message == "resumed from last.pt"  # an epoch's report keeps it
    rec.report(progress("preempted", "stopped by SIGUSR2 at epoch 3, step 25; saved last.pt", epoch=2))
    rec.note("preempted; requeued job 51_3 (1 of 3)")
    assert read_state(tmp_path).message == "preempted; requeued job 51_3 (1 of 3)"
    state = rec.running(total_epochs=4, world_size=2, backend="torch", job_id="51_3")
    assert state.requeues == 1 and state.started_at == started and state.message == ""
    rec.report(progress("done", "finished 4 epochs", epoch=4, test={"test_loss": 0.3}))
    final = read_state(tmp_path)
    assert (final.status, final.epoch, final.step, final.requeues) == ("done", 4, 40, 1)
    assert final.test == {"test_loss": 0.3} and final.slurm_job_id == "51_3"


def test_a_local_start_clears_the_job_id_of_an_earlier_slurm_attempt(tmp_path):
    rec = recorder(tmp_path)
    rec.pending(total_epochs=4)
    rec.queued("51_3", total_epochs=4, monitor="val_loss", exists=True)
    assert rec.running(total_epochs=4, world_size=1, backend="none").slurm_job_id is None


def test_finished_runs_keep_their_job_and_notes_touch_only_preempted_runs(tmp_path):
    rec = recorder(tmp_path)
    rec.pending(total_epochs=4)
    rec.running(total_epochs=4, world_size=1, backend="none", job_id="51_3")
    rec.report(progress("done", "finished 4 epochs", epoch=4))
    rec.queued("99_0", total_epochs=4, monitor="val_loss", exists=True)
    assert rec.note("preempted; requeued") is None
    state = read_state(tmp_path)
    assert (state.slurm_job_id, state.message) == ("51_3", "finished 4 epochs")


def test_failed_keeps_progress_and_a_bounded_message(tmp_path):
    rec = recorder(tmp_path)
    rec.pending(total_epochs=4)
    rec.report(progress("running", epoch=2))
    state = rec.failed("x" * 5000, wall_time_s=9.0)
    assert state.status == "failed" and state.epoch == 2 and len(state.message) == 2000
    assert state.wall_time_s == 3.0  # the trainer's own figure wins over the runner's estimate


def test_writes_are_atomic_and_leave_no_temp_files(tmp_path):
    rec = recorder(tmp_path)
    rec.pending(total_epochs=4)
    for epoch in range(20):
        rec.report(progress("running", epoch=epoch))
    assert read_state(tmp_path).epoch == 19
    assert os.listdir(tmp_path) == ["state.json"]
    assert json.loads((tmp_path / "state.json").read_text())["host"]


def test_unknown_status_is_refused_and_a_torn_file_reads_as_none(tmp_path):
    with pytest.raises(ValueError, match="not one of"):
        RunState(status="finished")
    (tmp_path / "state.json").write_text('{"status": "runn')
    assert read_state(tmp_path) is None
    assert read_state(tmp_path / "missing") is None
