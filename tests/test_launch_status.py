"""`hpctrain status` and run selection on a sweep folder (no cluster needed)."""
from __future__ import annotations


import yaml

from hpctrain.launch.cli_status import render, rows
from hpctrain.launch.slurm import select_runs
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
    table = rows(str(sweep.root), slurm_states=False)
    assert [r["status"] for r in table] == ["done", "?", "?", "pending", "pending", "pending"]
    text = render(table)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["idx", "run_id", "hidden", "lr"]
    assert "4/4" in lines[1] and "0.25" in lines[1] and "77_0" in lines[1]
    assert "state.json missing or unreadable" in lines[2]
    assert "6 run(s): 2 ?, 1 done, 3 pending" in text


def test_selection_skips_finished_runs_and_reruns_on_request(tmp_path):
    sweep, _raw, specs = _sweep(tmp_path)
    for spec, status in zip(specs, ["done", "failed", "diverged", "preempted", "running", "pending"]):
        state = read_state(sweep.run_dir(spec.run_id))
        state.status = status
        state.slurm_job_id = f"9_{spec.index}"
        put_state(sweep.run_dir(spec.run_id), state)
    assert select_runs(sweep, specs).indices == [3, 4, 5]
    assert select_runs(sweep, specs, "failed").indices == [1, 3, 4, 5]
    sel = select_runs(sweep, specs, "all")
    assert sel.indices == [0, 1, 2, 3, 4, 5] and sel.fresh == [0, 2]
    # a run whose element is still queued or running is not submitted twice
    sel = select_runs(sweep, specs, "none", queued={"9_4", "9_5"})
    assert sel.indices == [3] and sorted(sum(sel.skipped.values(), [])) == [0, 1, 2, 4, 5]
