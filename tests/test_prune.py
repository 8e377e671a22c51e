"""Successive halving across a sweep (prune.py): rungs, the asynchronous rule, the pruned
outcome through the CLI, and decisions that survive kill -9 and resubmission."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hpctrain.config import build_config
from hpctrain.prune import RungBook, rung_epochs

ROOT = Path(__file__).resolve().parent.parent


def test_rungs_are_r_times_powers_of_eta_below_the_last_epoch():
    assert rung_epochs(1, 3, 27) == [1, 3, 9]
    assert rung_epochs(2, 2, 16) == [2, 4, 8]
    assert rung_epochs(5, 3, 5) == []


def book(tmp_path, run_id, mode_metric="val_loss"):
    cfg = build_config({"train": {"epochs": 9, "monitor": mode_metric},
                        "prune": {"kind": "asha", "min_epochs": 1, "reduction": 3}})
    return RungBook(tmp_path, run_id, cfg)


def test_first_arrivals_go_on_and_later_ones_need_the_top_third(tmp_path):
    values = {"a": 0.5, "b": 0.9, "c": 0.3, "d": 0.6, "e": 0.2}
    decisions = {r: book(tmp_path, r).at_epoch_end(1, {"val_loss": v}) for r, v in values.items()}
    assert decisions["a"].go_on and decisions["a"].cutoff is None
    assert not decisions["b"].go_on  # worse than a, the only one before it
    assert decisions["c"].go_on      # best so far
    assert not decisions["d"].go_on  # the best third of (0.5, 0.9, 0.3) is <= 0.4667
    assert decisions["e"].go_on
    assert book(tmp_path, "a").at_epoch_end(2, {"val_loss": 9.0}) is None  # not a rung
    # a run that comes back to a rung takes its recorded decision, whatever it measures now
    again = book(tmp_path, "b").at_epoch_end(1, {"val_loss": 0.01})
    assert not again.go_on and again.value == 0.9


def test_higher_is_better_metrics_keep_the_top(tmp_path):
    first = book(tmp_path, "a", "val_accuracy").at_epoch_end(1, {"val_accuracy": 0.8})
    worse = book(tmp_path, "b", "val_accuracy").at_epoch_end(1, {"val_accuracy": 0.6})
    better = book(tmp_path, "c", "val_accuracy").at_epoch_end(1, {"val_accuracy": 0.9})
    assert first.go_on and not worse.go_on and better.go_on


def write_config(tmp_path, extra=""):
    path = tmp_path / "asha.yaml"
    path.write_text(textwrap.dedent(f"""
        name: asha
        data: {{path: {tmp_path / 'data'}, task: binary, batch_size: 64, synth: {{rows: 1500, features: 6, shards: 2}}}}
        model: {{hidden: [8]}}
        optim: {{name: adam}}
        train: {{epochs: 9, evaluate_test: false, tensorboard: false}}
        prune: {{kind: asha, min_epochs: 1, reduction: 3}}
        grid:
          optim.lr: [1e-2, 1e-5, 3e-3, 1e-6, 1e-4, 3e-6]
    """) + extra)
    return path


def hpctrain(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "hpctrain", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def states(sweep):
    grid = [json.loads(l) for l in (sweep / "grid.jsonl").read_text().splitlines()]
    return [json.loads((sweep / "runs" / r["run_id"] / "state.json").read_text()) for r in grid]


def test_a_pruned_sweep_through_the_cli(tmp_path):
    config, sweep = write_config(tmp_path), tmp_path / "s"
    out = hpctrain("submit", config, "--executor", "debug", "--sweep-dir", sweep)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    found = states(sweep)
    pruned = [s for s in found if s["status"] == "pruned"]
    assert pruned and all(s["status"] in ("done", "pruned") for s in found)
    assert all(s["epoch"] in (1, 3) and "pruned at rung epoch" in s["message"] for s in pruned)
    assert sum(s["epoch"] for s in found) < 0.7 * 9 * len(found)
    for s in pruned:  # checkpoints kept
        assert (sweep / "runs" / s["run_id"] / "checkpoints" / "last.pt").exists()
    status = hpctrain("status", sweep, "--no-slurm")
    assert f"{len(pruned)} pruned" in status.stdout
    board = (sweep / "leaderboard.md").read_text()
    assert board.count("| pruned |") == len(pruned)
    again = hpctrain("submit", config, "--executor", "debug", "--sweep-dir", sweep)
    assert "nothing to submit" in again.stdout and f"skipping {len(pruned)} run(s) pruned" in again.stdout
    # a pruned run resubmitted from scratch meets its own record at the rung: the same outcome
    first = pruned[0]
    redo = hpctrain("submit", config, "--executor", "debug", "--sweep-dir", sweep, "--only", first["index"],
                    "--no-collect")
    assert redo.returncode == 0, redo.stderr[-2000:]
    now = states(sweep)[first["index"]]
    assert (now["status"], now["epoch"], now["message"]) == ("pruned", first["epoch"], first["message"])
    # --rerun pruned promotes them: they go on past the rung that stopped them
    promoted = hpctrain("submit", config, "--executor", "debug", "--sweep-dir", sweep, "--rerun", "pruned",
                        "--no-collect")
    assert promoted.returncode == 0 and f"continues {len(pruned)} pruned run(s)" in promoted.stdout
    assert all(states(sweep)[s["index"]]["epoch"] > s["epoch"] for s in pruned)


def test_the_decision_survives_kill_9_and_resume(tmp_path):
    config, sweep = write_config(tmp_path, "slurm: {tasks_per_node: 1}\n"), tmp_path / "s"
    spec_id = None
    dry = hpctrain("submit", config, "--executor", "local", "--sweep-dir", sweep, "--dry-run")
    spec_id = [l.split()[3] for l in dry.stdout.splitlines() if l.startswith("# run ")][1]  # lr 1e-5
    # other runs already recorded much better values at rung 1
    rung = sweep / "rungs" / "1"
    rung.mkdir(parents=True)
    for k in range(3):
        (rung / f"other{k}.json").write_text(json.dumps({"run_id": f"other{k}", "epoch": 1, "value": 0.01,
                                                         "go_on": True, "cutoff": None, "before": k}))
    cmd = [sys.executable, "-m", "hpctrain", "run", str(config), "--index", "1", "--sweep-dir", str(sweep),
           "train.checkpoint_every_epochs=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = rung / f"{spec_id}.json"
    deadline = time.monotonic() + 120
    while not record.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert record.exists()
    decided = json.loads(record.read_text())
    assert decided["go_on"] is False
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    state = json.loads((sweep / "runs" / spec_id / "state.json").read_text())
    assert state["status"] == "pruned" and state["epoch"] == 1
    assert json.loads(record.read_text()) == decided
