"""A model of the user's own on image-shaped rows: convert keeps the shape, the CNN trains on
2 ranks, and load_best rebuilds it."""
import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mpi_scripts.launch import MPIRUN_ARGS, clean_env
from slurm_helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent


def digits_like(path: Path, rows: int = 1500, seed: int = 0) -> Path:
    """8x8 one-channel images of 4 classes: a bright bar whose position is the class, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, rows)
    x = rng.normal(0.0, 0.6, (rows, 1, 8, 8)).astype(np.float32)
    for i, label in enumerate(y):
        x[i, 0, 2 * label:2 * label + 2, :] += 2.0
    np.savez(path, x=x, y=y)
    return path


def hpctrain(*args, cwd, ranks=0, timeout=300):
    cmd = [sys.executable, "-m", "hpctrain", *map(str, args)]
    if ranks:
        cmd = ["mpirun", "-np", str(ranks), *MPIRUN_ARGS, *cmd]
    env = clean_env()
    env["PYTHONPATH"] = str(ROOT / "tests")  # where the user's package lives
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def config(tmp_path: Path, data: Path, extra: str = "") -> Path:
    path = tmp_path / "cnn.yaml"
    path.write_text(textwrap.dedent(f"""
        name: cnn
        data: {{path: {data}, task: multiclass, batch_size: 64}}
        model: {{target: "user_models.digits_cnn:build", options: {{channels: 6}}}}
        optim: {{name: adam, lr: 3e-3}}
        train: {{epochs: 3, monitor: val_f1_macro, metrics: [f1_macro, confusion]}}
        dist: {{backend: torch}}
        grid:
          optim.lr: [3e-3, 1e-3]
    """) + extra)
    return path


@pytest.fixture(scope="module")
def image_dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("images")
    out = hpctrain("data", "convert", digits_like(tmp / "digits.npz"), tmp / "ds", "--task", "multiclass",
                   "--shards", "2", cwd=tmp)
    assert out.returncode == 0, out.stderr
    return tmp / "ds"


def test_convert_keeps_the_shape_of_image_rows(image_dataset, tmp_path):
    meta = json.loads((image_dataset / "meta.json").read_text())
    assert meta["n_features"] == 64 and meta["feature_shape"] == [1, 8, 8]
    flat = tmp_path / "flat.npz"
    data = np.load(digits_like(tmp_path / "d.npz", rows=200))
    np.savez(flat, x=data["x"].reshape(200, 64), y=data["y"])
    out = hpctrain("data", "convert", flat, tmp_path / "given", "--task", "multiclass", "--feature-shape", "1,8,8",
                   cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "given" / "meta.json").read_text())["feature_shape"] == [1, 8, 8]
    bad = hpctrain("data", "convert", flat, tmp_path / "bad", "--task", "multiclass", "--feature-shape", "1,7,8",
                   cwd=tmp_path)
    assert bad.returncode == 2 and "--feature-shape 1,7,8: holds 56 values" in bad.stderr


@pytest.mark.mpi
def test_a_user_cnn_trains_on_two_ranks_and_load_best_returns_it(image_dataset, tmp_path):
    from hpctrain import load_best

    cfg, sweep = config(tmp_path, image_dataset), tmp_path / "s"
    for index in (0, 1):
        out = hpctrain("run", cfg, "--index", index, "--sweep-dir", sweep, cwd=tmp_path, ranks=2)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    done = hpctrain("collect", sweep, cwd=tmp_path)
    assert done.returncode == 0 and "ranked by val_f1_macro (max)" in done.stdout, done.stderr
    sys.path.insert(0, str(ROOT / "tests"))
    model = load_best(sweep)
    assert isinstance(model.model.module[0], torch.nn.Conv2d)
    test = np.load(digits_like(tmp_path / "t.npz", rows=300, seed=1))
    accuracy = (model.predict(test["x"]).numpy() == test["y"]).mean()
    assert accuracy > 0.9, accuracy
    run = next((sweep / "runs").iterdir())
    state = json.loads((run / "state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch"] == 128
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert all(0.0 <= float(r["val_f1_macro"]) <= 1.0 for r in rows) and "train_f1_macro" in rows[0]
    confusion = json.loads((run / "confusion.json").read_text())
    matrix = np.array(confusion["matrix"])
    best = max(range(len(rows)), key=lambda i: float(rows[i]["val_f1_macro"]))
    assert confusion["epoch"] == best + 1 and matrix.shape == (4, 4)
    assert matrix.sum() == json.loads((image_dataset / "meta.json").read_text())["rows"]["val"]


@pytest.mark.slurm
@pytest.mark.slow
def test_the_user_cnn_trains_over_two_ranks_on_the_slurm_cluster(slurm_cluster, image_dataset, tmp_path):
    from hpctrain import load_best

    cfg = config(tmp_path, image_dataset, "slurm: {tasks_per_node: 2, cpus_per_task: 1, time_min: 10}\n")
    sweep = tmp_path / "s"
    out = hpctrain("submit", cfg, "--executor", "slurm", "--sweep-dir", sweep, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    wait_until(lambda: (sweep / "best" / "best.json").exists(), 600, "the collector job")
    for run in (sweep / "runs").iterdir():
        state = json.loads((run / "state.json").read_text())
        assert (state["status"], state["world_size"], state["slurm_job_id"] is not None) == ("done", 2, True)
    sys.path.insert(0, str(ROOT / "tests"))
    model = load_best(sweep)
    assert isinstance(model.model.module[0], torch.nn.Conv2d)
    test = np.load(digits_like(tmp_path / "t.npz", rows=300, seed=1))
    assert (model.predict(test["x"]).numpy() == test["y"]).mean() > 0.9


def test_a_bad_target_is_named_before_training(image_dataset, tmp_path):
    cfg = config(tmp_path, image_dataset)
    cfg.write_text(cfg.read_text().replace("user_models.digits_cnn:build", "user_models.digits_cnn:nope"))
    out = hpctrain("run", cfg, "--sweep-dir", tmp_path / "s", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "model.target: 'user_models.digits_cnn:nope'" in out.stderr and "no function 'nope'" in out.stderr
