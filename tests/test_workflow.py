"""A researcher's workflow through the CLI: debug runs beside a sweep, the monitored metric
everywhere, sweeps that evolve (grid values added, epochs raised, chosen points rerun)."""
import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mpi_scripts.launch import MPIRUN_ARGS, clean_env

ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp_path, lrs=(0.01, 0.003), epochs=2, extra=""):
    path = tmp_path / "wf.yaml"
    path.write_text(textwrap.dedent(f"""
        name: wf
        data:
          path: {tmp_path / 'data'}
          task: binary
          batch_size: 64
          synth: {{rows: 1200, features: 6, shards: 2}}
        model: {{hidden: [8], dropout: 0.0}}
        optim: {{name: adam, lr: 1e-2}}
        train: {{epochs: {epochs}, monitor: val_accuracy, evaluate_test: false}}
        grid:
          optim.lr: [{', '.join(map(str, lrs))}]
    """) + textwrap.dedent(extra))
    return path


def hpctrain(*args, cwd=None, ranks=0, timeout=300):
    cmd = [sys.executable, "-m", "hpctrain", *map(str, args)]
    if ranks:
        cmd = ["mpirun", "-np", str(ranks), *MPIRUN_ARGS, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=clean_env())


def ok(out):
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def grid(sweep: Path) -> list[dict]:
    return [json.loads(line) for line in (sweep / "grid.jsonl").read_text().splitlines()]


def state(sweep: Path, index: int) -> dict:
    return json.loads((sweep / "runs" / grid(sweep)[index]["run_id"] / "state.json").read_text())


def metrics(sweep: Path, index: int) -> list[dict]:
    return list(csv.DictReader((sweep / "runs" / grid(sweep)[index]["run_id"] / "metrics.csv").open()))


def submit(config, sweep, *extra):
    return hpctrain("submit", config, "--executor", "debug", "--sweep-dir", sweep, "--no-collect", *extra)


# --------------------------------------------------------------------------- debug runs


def test_a_debug_run_trains_in_scratch_and_the_sweep_still_runs_that_point(tmp_path):
    config = write_config(tmp_path)
    out = ok(hpctrain("run", config, "--index", "1", cwd=tmp_path))
    assert "scratch sweep" in out.stdout
    sweep = tmp_path / "sweeps" / "wf"
    scratch = sweep / "debug"
    assert len(list((scratch / "runs").glob("*/state.json"))) == 1
    assert not (sweep / "runs").exists()
    # another override needs no fresh folder: the scratch sweep is replaced
    ok(hpctrain("run", config, "--index", "1", "train.epochs=1", cwd=tmp_path))
    out = ok(hpctrain("submit", config, "--executor", "debug", "--no-collect", cwd=tmp_path))
    assert "2 of 2 grid point(s) to run" in out.stdout
    assert state(sweep, 1)["status"] == "done" and state(sweep, 1)["global_batch"] == 64


@pytest.mark.mpi
def test_into_sweep_is_refused_when_the_ranks_differ_from_the_sweeps_elements(tmp_path):
    config = write_config(tmp_path, extra="slurm: {tasks_per_node: 2}\n")
    out = hpctrain("run", config, "--index", "0", "--into-sweep", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "1 rank(s) (global batch 64)" in out.stderr and "global batch 128" in out.stderr
    assert not (tmp_path / "sweeps" / "wf" / "runs").exists()
    ok(hpctrain("run", config, "--index", "0", "--into-sweep", "dist.backend=mpi", cwd=tmp_path, ranks=2))
    s = state(tmp_path / "sweeps" / "wf", 0)
    assert (s["status"], s["world_size"], s["global_batch"]) == ("done", 2, 128)


def test_summary_and_leaderboard_show_ranks_and_global_batch(tmp_path):
    config, sweep = write_config(tmp_path), tmp_path / "s"
    ok(submit(config, sweep))
    out = ok(hpctrain("collect", sweep))
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["ranks"], r["global_batch"]) for r in rows] == [("1", "64"), ("1", "64")]
    board = (sweep / "leaderboard.md").read_text()
    assert "| epochs | ranks | global batch |" in board
    assert "different global batches" not in board and "note:" not in out.stdout


# --------------------------------------------------------------------------- one ranking metric


def test_collect_ranks_by_the_monitor_and_best_pt_holds_the_epoch_best_json_names(tmp_path):
    config, sweep = write_config(tmp_path, epochs=4), tmp_path / "s"
    ok(submit(config, sweep))
    out = ok(hpctrain("collect", sweep))
    assert "ranked by val_accuracy (max)" in out.stdout
    best = json.loads((sweep / "best" / "best.json").read_text())
    assert (best["metric"], best["mode"]) == ("val_accuracy", "max")
    assert best["best_epoch"] == best["checkpoint_epoch"]
    import torch
    ckpt = torch.load(sweep / "best" / "best.pt", weights_only=False)
    assert ckpt["epoch"] == best["checkpoint_epoch"]
    rows = metrics(sweep, best["index"])
    accs = [float(r["val_accuracy"]) for r in rows]
    assert best["value"] == max(accs) and best["best_epoch"] == accs.index(max(accs)) + 1
    status = ok(hpctrain("status", sweep))
    assert "best = val_accuracy" in status.stdout
    # asked for another metric, best.json says what best.pt holds
    other = ok(hpctrain("collect", sweep, "--metric", "val_loss", "--out", tmp_path / "by_loss"))
    info = json.loads((tmp_path / "by_loss" / "best" / "best.json").read_text())
    assert info["metric"] == "val_loss" and info["checkpoint_monitor"] == "val_accuracy"
    if info["best_epoch"] != info["checkpoint_epoch"]:
        assert "best by its train.monitor val_accuracy" in other.stderr


# --------------------------------------------------------------------------- sweeps that evolve


def test_adding_a_grid_value_adds_a_run_and_keeps_the_finished_ones(tmp_path):
    config, sweep = write_config(tmp_path), tmp_path / "s"
    ok(submit(config, sweep))
    before = {r["run_id"]: (sweep / "runs" / r["run_id"] / "metrics.csv").read_bytes() for r in grid(sweep)}
    bigger = write_config(tmp_path, lrs=(0.01, 0.001, 0.003))
    dry = ok(hpctrain("submit", bigger, "--executor", "debug", "--sweep-dir", sweep, "--dry-run"))
    assert "would adds 1 grid point(s) to the sweep: 1" in dry.stdout
    assert "would run 1 with executor debug" in dry.stdout
    out = ok(submit(bigger, sweep))
    assert "1 of 3 grid point(s) to run" in out.stdout
    assert [r["params"]["optim.lr"] for r in grid(sweep)] == [0.01, 0.001, 0.003]
    for run_id, data in before.items():
        assert (sweep / "runs" / run_id / "metrics.csv").read_bytes() == data
    assert state(sweep, 1)["status"] == "done"


def test_removing_a_value_with_results_is_refused_before_anything_changes(tmp_path):
    config, sweep = write_config(tmp_path), tmp_path / "s"
    ok(submit(config, sweep))
    yaml_before = (sweep / "sweep.yaml").read_bytes()
    smaller = write_config(tmp_path, lrs=(0.01,))
    for extra in (("--dry-run",), ()):
        out = submit(smaller, sweep, *extra)
        assert out.returncode == 2 and "already holds a different sweep" in out.stderr
        assert "1 run(s) with results there are not points of this config" in out.stderr
    assert (sweep / "sweep.yaml").read_bytes() == yaml_before


def test_raising_epochs_continues_finished_runs_as_if_trained_that_long(tmp_path):
    config, sweep, straight = write_config(tmp_path, epochs=2), tmp_path / "s", tmp_path / "straight"
    ok(submit(config, sweep))
    dry = ok(submit(config, sweep, "--extend-epochs", "4", "--dry-run"))
    assert "continues 2 finished run(s) from last.pt: 0, 1" in dry.stdout
    out = ok(submit(config, sweep, "--extend-epochs", "4"))
    assert "train.epochs 2 -> 4: 2 existing run(s) keep their results under new ids" in out.stdout
    ok(submit(write_config(tmp_path, epochs=4), straight))
    for i in (0, 1):
        assert state(sweep, i)["status"] == "done" and state(sweep, i)["epoch"] == 4
        cont = [{k: v for k, v in r.items() if "time" not in k} for r in metrics(sweep, i)]
        full = [{k: v for k, v in r.items() if "time" not in k} for r in metrics(straight, i)]
        assert cont == full  # continued = trained 4 epochs from the start
    assert sorted(p.name for p in (sweep / "runs").iterdir()) == sorted(r["run_id"] for r in grid(sweep))


def test_a_cosine_run_is_named_and_not_continued(tmp_path):
    config = write_config(tmp_path, epochs=2, extra="schedule: {name: cosine}\n")
    sweep = tmp_path / "s"
    ok(submit(config, sweep))
    out = ok(submit(config, sweep, "--extend-epochs", "3"))
    assert "cosine schedule's length depends on train.epochs" in out.stdout
    assert "nothing to submit" in out.stdout
    assert state(sweep, 0)["epoch"] == 2 and state(sweep, 0)["status"] == "done"


def test_only_reruns_the_chosen_points(tmp_path):
    config, sweep = write_config(tmp_path, lrs=(0.01, 0.003, 0.001)), tmp_path / "s"
    ok(submit(config, sweep))
    out = ok(submit(config, sweep, "--only", "0,2"))
    assert "2 of 3 grid point(s) to run" in out.stdout and "skipping 1 run(s) not in --only: 1" in out.stdout
    assert len(list((sweep / "replaced").iterdir())) == 2
    bad = submit(config, sweep, "--only", "7")
    assert bad.returncode == 2 and "--only 7: 7 out of range" in bad.stderr
