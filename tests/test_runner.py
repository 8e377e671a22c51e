"""`hpctrain run` end to end: HDF5 shards -> loader -> model -> trainer -> run files."""
import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mpi_scripts.launch import MPIRUN_ARGS, clean_env

ROOT = Path(__file__).resolve().parent.parent


def small_config(tmp_path, extra=""):
    path = tmp_path / "small.yaml"
    path.write_text(textwrap.dedent(f"""
        name: small
        data:
          path: {tmp_path / 'data'}
          task: binary
          batch_size: 64
          synth: {{rows: 2000, features: 6, shards: 3}}
        model: {{hidden: [16], dropout: 0.1}}
        optim: {{name: adam, lr: 1e-2}}
        train: {{epochs: 3}}
        grid:
          model.activation: [relu, tanh]
    """) + textwrap.dedent(extra))
    return path


def hpctrain(*args, mpi_ranks=0, timeout=180):
    cmd = [sys.executable, "-m", "hpctrain", *args]
    if mpi_ranks:
        cmd = ["mpirun", "-np", str(mpi_ranks), *MPIRUN_ARGS, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=clean_env())


def run_dir(sweep: Path, index: int) -> Path:
    records = [json.loads(l) for l in (sweep / "grid.jsonl").read_text().splitlines()]
    return sweep / "runs" / records[index]["run_id"]


def test_run_writes_every_file_of_a_run(tmp_path):
    sweep = tmp_path / "sweep"
    out = hpctrain("run", str(small_config(tmp_path)), "--index", "1", "--sweep-dir", str(sweep))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rd = run_dir(sweep, 1)
    state = json.loads((rd / "state.json").read_text())
    assert state["status"] == "done" and state["epoch"] == 3 and state["index"] == 1
    assert state["params"] == {"model.activation": "tanh"}
    assert set(state["test"]) >= {"test_loss", "test_accuracy", "test_auc"}
    rows = list(csv.DictReader((rd / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["val_accuracy"]) > 0.7  # the synthetic task is learnable
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(rd / "checkpoints" / name, weights_only=True)
        assert ckpt["model_meta"]["n_features"] == 6 and len(ckpt["model_meta"]["mean"]) == 6
    # the other grid point is untouched: it gets its folder when it is submitted or runs
    assert not run_dir(sweep, 0).exists()
    # running the finished point again resumes from its last checkpoint and changes nothing
    before = (rd / "metrics.csv").read_bytes()
    again = hpctrain("run", str(small_config(tmp_path)), "--index", "1", "--sweep-dir", str(sweep))
    assert again.returncode == 0
    assert (rd / "metrics.csv").read_bytes() == before


@pytest.mark.mpi
def test_run_under_mpirun_uses_two_ranks(tmp_path):
    sweep = tmp_path / "sweep"
    out = hpctrain("run", str(small_config(tmp_path)), "dist.backend=torch", "--sweep-dir", str(sweep), mpi_ranks=2)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    state = json.loads((run_dir(sweep, 0) / "state.json").read_text())
    assert (state["status"], state["world_size"], state["backend"]) == ("done", 2, "torch")
    assert out.stdout.count("epoch 3/3") == 1  # only rank 0 reports


@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["mpi", "torch", "horovod"])
def test_overfit_check_over_two_ranks_trains_their_parts_of_the_same_batches(tmp_path, backend):
    # The loss before training is a collective evaluation before fit: every rank must take part.
    sweep = tmp_path / "sweep"
    out = hpctrain("run", str(small_config(tmp_path)), "--index", "0", "train.epochs=300", "optim.lr=0.03",
                   "model.dropout=0.0", f"dist.backend={backend}", "--overfit-batches", "2", "--sweep-dir",
                   str(sweep), mpi_ranks=2, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.count("passed, the model and training loop can fit the data") == 2  # the verdict, the run's line
    run = run_dir(sweep, 0)
    state = json.loads((sweep / "overfit" / run.name / "state.json").read_text())
    assert (state["status"], state["world_size"], state["backend"]) == ("done", 2, backend)
    assert "2 fixed batches (256 rows)" in state["message"]  # 2 global batches of 2 x 64 rows
    assert not (run / "metrics.csv").exists()


def test_an_overfit_check_of_no_batches_is_refused_before_anything_is_written(tmp_path):
    sweep = tmp_path / "sweep"
    out = hpctrain("run", str(small_config(tmp_path)), "--overfit-batches", "0", "--sweep-dir", str(sweep))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--overfit-batches: 0; expected a number of batches >= 1" in out.stderr
    assert not sweep.exists()


def test_missing_dataset_is_refused_with_the_folder_named_before_anything_is_written(tmp_path):
    cfg = small_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("  synth: {rows: 2000, features: 6, shards: 3}\n", ""))
    sweep = tmp_path / "sweep"
    out = hpctrain("run", str(cfg), "--sweep-dir", str(sweep))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "data.path" in out.stderr and str(tmp_path / "data") in out.stderr
    assert not sweep.exists()


def test_task_mismatch_names_meta_json(tmp_path):
    sweep = tmp_path / "sweep"
    assert hpctrain("run", str(small_config(tmp_path)), "--sweep-dir", str(sweep)).returncode == 0
    cfg = small_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("  synth: {rows: 2000, features: 6, shards: 3}\n", ""))
    out = hpctrain("run", str(cfg), "data.task=regression", "--sweep-dir", str(tmp_path / "s2"))
    assert out.returncode == 2
    assert "meta.json" in out.stderr and "'binary'" in out.stderr and "data.task is 'regression'" in out.stderr


def test_diverging_run_is_recorded_and_exits_zero(tmp_path):
    sweep = tmp_path / "sweep"
    out = hpctrain("run", str(small_config(tmp_path)), "optim.name=sgd", "optim.lr=1e12", "optim.momentum=0.0",
                   "--sweep-dir", str(sweep))
    assert out.returncode == 0, out.stderr[-2000:]
    state = json.loads((run_dir(sweep, 0) / "state.json").read_text())
    assert state["status"] == "diverged" and "epoch" in state["message"] and "step" in state["message"]


def test_overfit_batches_reports_a_verdict_and_leaves_the_run_alone(tmp_path):
    sweep = tmp_path / "sweep"
    out = hpctrain("run", str(small_config(tmp_path)), "train.epochs=300", "optim.lr=0.03", "model.dropout=0.0",
                   "--overfit-batches", "2", "--sweep-dir", str(sweep))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "passed, the model and training loop can fit the data" in out.stdout
    run = run_dir(sweep, 0)
    assert not (run / "metrics.csv").exists() and not (run / "checkpoints" / "last.pt").exists()
    assert (sweep / "overfit" / run.name / "metrics.csv").exists()


def test_a_failed_overfit_check_exits_1_and_leaves_the_run_alone(tmp_path):
    sweep = tmp_path / "sweep"
    out = hpctrain("run", str(small_config(tmp_path)), "--index", "0", "--overfit-batches", "2",
                   "train.epochs=2", "optim.lr=1e-6", "model.dropout=0.0", "--sweep-dir", str(sweep))
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "FAILED to reach accuracy" in out.stdout
    run = run_dir(sweep, 0)
    state = json.loads((sweep / "overfit" / run.name / "state.json").read_text())
    assert state["status"] == "failed" and "FAILED" in state["message"]
    assert not (run / "state.json").exists() or json.loads((run / "state.json").read_text())["status"] == "pending"
