"""`hpctrain status` and run selection on a sweep folder (no cluster needed)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from hpctrain.launch import queue
from hpctrain.launch.cli_status import rate_and_eta, render, rows, table
from hpctrain.plan import make_plan
from hpctrain.runner import prepare_sweep
from hpctrain.runstate import RunState, read_state
from state_files import put_state


def _sweep(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "st", "train": {"epochs": 4},
                                      "grid": {"optim.lr": [0.1, 0.01, 0.001], "model.hidden": [[8], [4, 4]]}}))
    sweep, raw, specs = prepare_sweep(config, [], tmp_path / "sw")
    for spec in specs:
        sweep.prepare_run(spec)  # as submitting them does: a folder and a pending state each
    return sweep, raw, specs


def test_status_survives_partial_and_missing_state_files(tmp_path):
    sweep, _raw, specs = _sweep(tmp_path)
    done = RunState(status="done", epoch=4, total_epochs=4, best_metric=0.25, index=0, run_id=specs[0].run_id,
                    params=specs[0].params, message="finished 4 epochs")
    done.slurm_job_id = "77_0"
    put_state(sweep.run_dir(specs[0].run_id), done)
    (sweep.run_dir(specs[1].run_id) / "state.json").write_text('{"status": "runn')  # torn write
    (sweep.run_dir(specs[2].run_id) / "state.json").unlink()
    runs = rows(str(sweep.root), slurm_states=False)
    assert [r["status"] for r in runs] == ["done", "?", "?", "pending", "pending", "pending"]
    text = render(runs)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["idx", "run_id", "hidden", "lr"]
    assert "4/4" in lines[1] and "0.25" in lines[1] and "77_0" in lines[1]
    assert "state.json missing or unreadable" in lines[2]
    assert "6 run(s): 2 ?, 1 done, 3 pending" in text


def test_selection_skips_finished_runs_and_reruns_on_request(tmp_path):
    sweep, raw, specs = _sweep(tmp_path)
    for spec, status in zip(specs, ["done", "failed", "diverged", "preempted", "running", "pruned"]):
        state = read_state(sweep.run_dir(spec.run_id))
        state.status = status
        state.slurm_job_id = f"9_{spec.index}"
        put_state(sweep.run_dir(spec.run_id), state)
    assert make_plan(sweep, raw, specs).indices == [3, 4]
    assert make_plan(sweep, raw, specs, rerun="failed").indices == [1, 3, 4]
    promoted = make_plan(sweep, raw, specs, rerun="pruned")
    assert promoted.indices == [3, 4, 5] and promoted.promoted == [5] and promoted.fresh == []
    plan = make_plan(sweep, raw, specs, rerun="all")
    assert plan.indices == [0, 1, 2, 3, 4, 5] and plan.fresh == [0, 2, 5]
    # a run whose element is still queued or running is not submitted twice
    plan = make_plan(sweep, raw, specs, queued={"9_4", "9_5"})
    assert plan.indices == [3] and sorted(sum(plan.skipped.values(), [])) == [0, 1, 2, 4, 5]


def _scene(tmp_path, statuses):
    """A sweep whose runs have the given on-disk statuses, each stamped with element 5_INDEX."""
    sweep, _raw, specs = _sweep(tmp_path)
    for spec, status in zip(specs, statuses):
        state = read_state(sweep.run_dir(spec.run_id))
        state.status, state.slurm_job_id = status, f"5_{spec.index}"
        state.message = "training"
        put_state(sweep.run_dir(spec.run_id), state)
    return sweep, specs


def test_status_reconciles_a_live_state_with_a_job_slurm_saw_end_badly(tmp_path, monkeypatch):
    sweep, _specs = _scene(tmp_path, ["running", "running", "running", "preempted", "pending", "done"])
    jobs = {"5_0": queue.Job("FAILED", "NonZeroExitCode", 69), "5_1": queue.Job("OUT_OF_MEMORY", "OutOfMemory"),
            "5_2": queue.Job("RUNNING", "None"), "5_3": queue.Job("CANCELLED", "None", 0),
            "5_4": queue.Job("CANCELLED", "None"), "5_5": queue.Job("COMPLETED", "None", 0)}
    asked = []

    def query(ids):
        asked.append(sorted(i for i in ids if i))
        return queue.View(dict(jobs), ["accounting is off (...)"], time.time())
    monkeypatch.setattr(queue, "query", query)
    found, unseen = table(str(sweep.root))
    assert len(asked) == 1 and len(asked[0]) == 6  # one batched query for the whole sweep
    by = {r["index"]: r for r in found}
    assert by[0]["status"] == "failed" and "slurm FAILED (rank lost)" in by[0]["message"]
    assert by[1]["status"] == "failed" and "out of memory" in by[1]["message"]
    assert by[2]["status"] == "running" and by[2]["message"] == "training"
    assert by[3]["status"] == "preempted" and "not requeued by Slurm" in by[3]["message"]
    assert by[4]["status"] == "pending" and "before the run started" in by[4]["message"]
    assert by[5]["status"] == "done"
    text = render(found, unseen)
    assert "FAILED (rank lost)" in text and "not seen: accounting is off" in text
    assert read_state(sweep.run_dir(by[0]["run_id"])).status == "running"  # status only reads
    # a second status within the cache's lifetime asks Slurm nothing
    table(str(sweep.root))
    assert len(asked) == 1


def test_rate_and_eta_come_from_the_state_progress():
    running = RunState(status="running", epoch=3, total_epochs=10, wall_time_s=60.0)
    rate, eta = rate_and_eta(running)
    assert rate == pytest.approx(3.0) and eta == pytest.approx(7 / 3)
    assert rate_and_eta(RunState(status="done", epoch=10, total_epochs=10, wall_time_s=60.0)) == (None, None)
    assert rate_and_eta(RunState(status="running", epoch=0, total_epochs=10)) == (None, None)


def test_watch_redraws_until_no_run_is_pending_or_running(tmp_path):
    sweep, specs = _scene(tmp_path, ["done"] * 5 + ["running"])
    state = read_state(sweep.run_dir(specs[5].run_id))
    state.epoch, state.total_epochs, state.wall_time_s = 2, 4, 30.0
    put_state(sweep.run_dir(specs[5].run_id), state)
    proc = subprocess.Popen([sys.executable, "-m", "hpctrain", "status", str(sweep.root), "--no-slurm",
                             "--watch", "1"], stdout=subprocess.PIPE, text=True)
    time.sleep(2.5)
    state.status = "done"
    put_state(sweep.run_dir(specs[5].run_id), state)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    tables = out.split("hpctrain status")[1:]
    assert len(tables) >= 2
    running = next(line for line in tables[0].splitlines() if " running " in line)
    assert "2/4" in running and " 4 " in running and "0.5m" in running  # 2 epochs in 30 s: 4/min, 2 left
    assert "6 run(s): 6 done" in tables[-1]
