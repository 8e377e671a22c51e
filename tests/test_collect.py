"""hpctrain collect on real sweep folders with done, running, failed, diverged, pending and corrupt runs."""
from __future__ import annotations

import argparse
import csv
import hashlib
import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpctrain import cli, load_best
from hpctrain import collect as collect_command
from hpctrain.collect import collect
from hpctrain.errors import HpctrainError
from hpctrain.config import base_dict
from hpctrain.model import build_model
from hpctrain.report import plots, tensorboard
from hpctrain.monitor import better_mode as resolve_mode
from hpctrain.report.runs import parse_metrics
from hpctrain.runstate import RunState
from hpctrain.sweep import SweepDir, expand
from state_files import put_state
from hpctrain.train.checkpoint import save_checkpoint as write_trainer_checkpoint

REPO = Path(__file__).resolve().parents[1]
N_FEATURES = 4
HEADER = "epoch,step,lr,train_loss,train_accuracy,train_auc,val_loss,val_accuracy,val_auc"
MEAN = [0.5, -1.0, 2.0, 0.0]
STD = [2.0, 0.5, 1.0, 3.0]

# index -> (state, epochs written, val_loss floor, final val_accuracy)
PLAN = {
    0: ("done", 10, 0.30, 0.95),      # best val_accuracy
    1: ("done", 10, 0.20, 0.90),      # best val_loss among readable curves
    2: ("running", 4, 0.25, 0.80),    # partial curve: NaN padded after epoch 4
    3: ("failed", 2, 0.60, 0.60),
    4: ("diverged", 3, 0.50, 0.70),   # last epoch NaN
    5: ("pending", 0, None, None),    # never started
    6: ("garbage", 6, 0.40, 0.85),    # state.json garbage, metrics.csv half-written last line
    7: ("done", 10, 0.10, 0.99),      # metrics.csv corrupt mid-file, best.pt truncated
}


def raw_config(name: str) -> dict:
    return {"name": name, "data": {"path": "data/none", "task": "binary"},
            "train": {"epochs": 10},
            "grid": {"optim.lr": [0.1, 0.01, 0.001, 0.0001], "model.hidden": [[8], [16, 16]]}}


def val_loss(floor: float, epoch: int) -> float:
    return floor + 1.0 / epoch


def metrics_text(index: int, epochs: int, floor: float, acc: float) -> str:
    lines = [HEADER]
    for e in range(1, epochs + 1):
        vl = val_loss(floor, e)
        va = acc - 0.01 * (epochs - e)
        if PLAN[index][0] == "diverged" and e == epochs:
            vl = va = math.nan
        lines.append(",".join(repr(v) for v in (e, 10 * e, 0.001, vl + 0.05, va - 0.02, va, vl, va, va)))
    return "\n".join(lines) + "\n"


def save_checkpoint(path: Path, spec, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(spec.config.model, "binary", N_FEATURES)
    ckpt = {"model": model.state_dict(), "config": base_dict(spec.config),
            "model_meta": {"task": "binary", "n_features": N_FEATURES, "n_classes": 2, "n_targets": 1,
                           "standardize": True, "mean": MEAN, "std": STD},
            "epoch": 5, "metrics": {"val_loss": 0.3}}
    write_trainer_checkpoint(path, ckpt)  # the trainer's writer: format and content digest included
    return model


def make_sweep(root: Path, name: str = "demo") -> tuple[Path, dict]:
    """A sweep folder as the trainer leaves it mid-way; returns (folder, index -> saved model)."""
    raw = raw_config(name)
    specs = expand(raw, "test")
    sweep = SweepDir(root / name)
    sweep.write(raw, specs)
    models = {}
    for spec in specs:
        status, epochs, floor, acc = PLAN[spec.index]
        run_dir = sweep.prepare_run(spec)  # as submitting the run does
        if status == "pending":
            continue
        text = metrics_text(spec.index, epochs, floor, acc)
        if spec.index == 6:
            text += "7,70,0.001,0.4"  # the writer stopped mid-line
        if spec.index == 7:
            lines = text.split("\n")
            lines[3] = "3,30,0.0@1,zz"
            text = "\n".join(lines)
        (run_dir / "metrics.csv").write_text(text)
        best = min(range(1, epochs + 1), key=lambda e: val_loss(floor, e))
        state = RunState(status=status if status != "garbage" else "running", epoch=epochs, total_epochs=10,
                         step=10 * epochs, best_metric=val_loss(floor, best), best_epoch=best,
                         index=spec.index, run_id=spec.run_id, params=spec.params,
                         slurm_job_id=f"4242_{spec.index}", wall_time_s=10.0 * epochs, samples_per_s=1000.0 + spec.index,
                         message="CUDA out of memory" if status == "failed" else "")
        if status == "done":
            state.test = {"test_loss": floor + 0.15, "test_accuracy": acc - 0.05}
        put_state(run_dir, state)
        if spec.index == 6:
            (run_dir / "state.json").write_text('{"status": "runn')
        models[spec.index] = save_checkpoint(run_dir / "checkpoints" / "best.pt", spec, seed=spec.index)
        if spec.index == 7:
            data = (run_dir / "checkpoints" / "best.pt").read_bytes()
            (run_dir / "checkpoints" / "best.pt").write_bytes(data[: len(data) // 2])
    return sweep.root, models


@pytest.fixture
def sweep_dir(tmp_path):
    return make_sweep(tmp_path)


def read_summary(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ids_by_index(root: Path) -> dict[int, str]:
    return {r["index"]: r["run_id"] for r in SweepDir(root).records()}


# --------------------------------------------------------------------------- summary.csv


def test_summary_has_one_row_per_run_with_state_and_metrics(sweep_dir):
    root, _ = sweep_dir
    result = collect(root, plots=False)
    rows = read_summary(root / "summary.csv")
    assert [int(r["index"]) for r in rows] == list(range(8))
    cols = list(rows[0])
    assert cols[:4] == ["index", "run_id", "optim.lr", "model.hidden"]
    for col in ("state", "epochs", "best_epoch", "best_val_loss", "final_train_loss", "final_val_loss",
                "final_val_accuracy", "final_val_auc", "test_loss", "test_accuracy", "wall_time_s",
                "samples_per_s", "slurm_job_id", "message"):
        assert col in cols, col
    assert [r["state"] for r in rows] == ["done", "done", "running", "failed", "diverged", "pending",
                                          "unknown", "done"]
    assert [r["epochs"] for r in rows] == ["10", "10", "4", "2", "3", "0", "6", "10"]
    assert float(rows[1]["best_val_loss"]) == pytest.approx(val_loss(0.20, 10))
    assert rows[1]["best_epoch"] == "10"
    assert float(rows[2]["final_val_loss"]) == pytest.approx(val_loss(0.25, 4))
    assert rows[4]["final_val_loss"] == "nan" and float(rows[4]["best_val_loss"]) == pytest.approx(val_loss(0.5, 2))
    assert rows[5]["best_val_loss"] == "" and rows[5]["final_val_loss"] == ""
    # metrics.csv of run 7 is corrupt: its best comes from state.json, its final metrics are empty
    assert float(rows[7]["best_val_loss"]) == pytest.approx(val_loss(0.10, 10)) and rows[7]["final_val_loss"] == ""
    assert rows[0]["model.hidden"] == "[8]" and float(rows[0]["optim.lr"]) == 0.1
    assert rows[3]["message"] == "CUDA out of memory" and rows[3]["slurm_job_id"] == "4242_3"
    assert float(rows[0]["test_loss"]) == pytest.approx(0.45) and rows[2]["test_loss"] == ""
    assert len(result.data.runs) == 8


def test_corrupt_files_reported_once_each_and_half_line_dropped(sweep_dir):
    root, _ = sweep_dir
    ids = ids_by_index(root)
    result = collect(root, plots=False)
    problems = result.problems
    named = lambda i, f: [p for p in problems if f"{ids[i]}/{f}" in p]
    assert len(named(6, "state.json")) == 1
    assert len(named(6, "metrics.csv")) == 1 and "incomplete" in named(6, "metrics.csv")[0]
    assert len(named(7, "metrics.csv")) == 1 and ":4:" in named(7, "metrics.csv")[0]
    assert len(named(7, "checkpoints/best.pt")) == 1
    assert all("\n" not in p for p in problems)
    run6 = result.data.runs[6]
    assert run6.curves.epochs.tolist() == [1, 2, 3, 4, 5, 6]


def test_parse_metrics_rules():
    problems = []
    c = parse_metrics(HEADER + "\n1,10,0.1,1,2,3,4,5,6\n2,20,0.1,,2,3,4,5,6\n", Path("m.csv"), problems)
    assert problems == [] and c.epochs.tolist() == [1, 2] and math.isnan(c.get("train_loss")[1])
    assert parse_metrics("garbage\n1,2\n", Path("m.csv"), problems) is None and "header" in problems[-1]
    assert parse_metrics("", Path("m.csv"), problems) is None and len(problems) == 1  # empty: silent
    c = parse_metrics(HEADER + "\n1,10,0.1,1,2,3,4,5,6\n2,20", Path("m.csv"), problems)
    assert c.epochs.tolist() == [1] and "incomplete" in problems[-1]
    assert parse_metrics(HEADER + "\n1,10,0.1,1,2,3\n", Path("m.csv"), problems) is None


# --------------------------------------------------------------------------- curves.h5


def test_curves_h5_aligned_and_nan_padded(sweep_dir):
    root, _ = sweep_dir
    collect(root, plots=False)
    ids = ids_by_index(root)
    with h5py.File(root / "curves.h5", "r") as f:
        assert f["epoch"][:].tolist() == list(range(1, 11))
        assert f["index"][:].tolist() == list(range(8))
        assert [s.decode() for s in f["run_id"][:]] == [ids[i] for i in range(8)]
        val = f["curves/val_loss"][:]
        assert val.shape == (8, 10)
        assert np.allclose(val[2, :4], [val_loss(0.25, e) for e in range(1, 5)])
        assert np.isnan(val[2, 4:]).all() and np.isnan(val[5]).all() and np.isnan(val[7]).all()
        assert np.isnan(val[4, 2]) and np.isfinite(val[4, :2]).all()
        assert np.isfinite(val[6, :6]).all() and np.isnan(val[6, 6:]).all()
        assert f["params/optim.lr"][:].tolist() == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001]
        assert f["params/model.hidden"][1].decode() == "[16, 16]"
        assert [s.decode() for s in f["state"][:]][5:7] == ["pending", "unknown"]
        assert f.attrs["metric"] == "val_loss" and f.attrs["mode"] == "min"
        assert f["best_epoch"][5] == -1 and np.isnan(f["best_value"][5])


# --------------------------------------------------------------------------- ranking and best/


def leaderboard_ids(path: Path) -> list[str]:
    rows = [line for line in path.read_text().splitlines() if line.startswith("| ") and line[2:3].isdigit()]
    return [line.split(" | ")[1] for line in rows]


def test_best_run_for_min_and_max_metrics(sweep_dir, tmp_path):
    root, _ = sweep_dir
    ids = ids_by_index(root)
    low = collect(root, plots=False)
    # run 7's state.json says 0.2 at epoch 10 but its best.pt is truncated: best/ passes it over
    assert [r.index for r in low.ranked] == [7, 1, 0, 2, 6, 4, 3]
    assert leaderboard_ids(root / "leaderboard.md") == [ids[i] for i in (7, 1, 0, 2, 6, 4, 3)]
    best = low.best
    assert best["run_id"] == ids[1] and best["value"] == pytest.approx(val_loss(0.2, 10))
    assert (root / "best" / "config.yaml").read_bytes() == (root / "runs" / ids[1] / "config.yaml").read_bytes()
    assert (root / "best" / "best.pt").read_bytes() == (root / "runs" / ids[1] / "checkpoints" / "best.pt").read_bytes()
    high = collect(root, metric="val_accuracy", out=tmp_path / "acc", plots=False)
    assert high.mode == "max" and high.best["run_id"] == ids[0]
    assert high.ranked[0].index == 0 and high.ranked[0].best_value == pytest.approx(0.95)
    values = [r.best_value for r in high.ranked]
    assert values == sorted(values, reverse=True)
    assert high.best["params"] == {"optim.lr": 0.1, "model.hidden": [8]}


def test_mode_auto():
    assert resolve_mode("val_loss") == "min" and resolve_mode("val_rmse") == "min"
    assert resolve_mode("val_mae") == "min" and resolve_mode("test_loss") == "min"
    assert resolve_mode("val_accuracy") == "max" and resolve_mode("val_auc") == "max"
    assert resolve_mode("val_thing", "max") == "max"
    with pytest.raises(Exception, match="--mode"):
        resolve_mode("val_thing")


def test_load_best_reproduces_saved_model_on_standardised_input(sweep_dir):
    root, models = sweep_dir
    collect(root, plots=False)
    model = load_best(root)
    assert not model.training and model.info["index"] == 1
    x = torch.randn(32, N_FEATURES) * 3 + 1
    expected = models[1].eval()((x - torch.tensor(MEAN)) / torch.tensor(STD))
    assert torch.allclose(model(x), expected, atol=1e-6)
    assert torch.equal(model.predict(x), (expected > 0).long())
    assert torch.allclose(model.predict_proba(x.numpy()), torch.sigmoid(expected), atol=1e-6)
    # without best/ (a sweep never collected) the ranking is done on the fly
    fresh = load_best(root, metric="val_accuracy")
    assert fresh.info["index"] == 0
    assert torch.allclose(fresh(x), models[0].eval()((x - torch.tensor(MEAN)) / torch.tensor(STD)), atol=1e-6)


# --------------------------------------------------------------------------- plots


def test_plots_are_pngs_with_one_line_per_run(sweep_dir):
    root, _ = sweep_dir
    result = collect(root, top=3)
    names = sorted(p.name for p in (root / "plots").iterdir())
    assert names == ["by_model.hidden.png", "by_optim.lr.png", "heatmap.png", "loss.png"]
    for path in (root / "plots").iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = plots.curves_figure(result.data.runs, "loss", result.ranked[:3])
    with_curves = [r for r in result.data.runs if r.curves is not None and len(r.curves.epochs)]
    assert len(with_curves) == 6
    assert len(plots.run_lines(fig, "val")) == 6 and len(plots.run_lines(fig, "train")) == 6
    # the best 3 that have curves are separate lines (run 7 is ranked but has no readable curve)
    assert sorted(g for g in plots.run_lines(fig, "val") if g != "val:segment") == \
        sorted(f"val:{r.run_id}" for r in result.ranked[1:3])
    strip = plots.strip_figure(result.data.runs, "optim.lr", result.metric, result.mode)
    assert strip.axes[0].get_xscale() == "log" and len(strip.axes[0].get_xticks()) == 4
    points = sum(len(c.get_offsets()) for c in strip.axes[0].collections if (c.get_gid() or "").startswith("runs:"))
    assert points == len([r for r in result.data.runs if r.best_value is not None])


# --------------------------------------------------------------------------- idempotence, CLI


def digests(root: Path) -> dict[str, str]:
    files = ["summary.csv", "leaderboard.md", "curves.h5", "best/best.json", "best/best.pt"]
    files += [f"plots/{p.name}" for p in sorted((root / "plots").iterdir())]
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in files}


def test_collecting_twice_gives_identical_files(sweep_dir):
    root, _ = sweep_dir
    collect(root)
    first = digests(root)
    collect(root)
    assert digests(root) == first
    assert not list(root.rglob(".*.tmp"))


def run_command(argv: list[str]) -> int:
    """The collect subcommand as cli.main runs it: its own parser, user errors -> exit 2."""
    parser = argparse.ArgumentParser(prog="hpctrain collect")
    collect_command.configure(parser)
    try:
        return collect_command.main(parser.parse_args(argv))
    except HpctrainError as e:
        print(f"hpctrain collect: error: {e}", file=sys.stderr)
        return 2


def test_command_prints_table_and_warnings(sweep_dir, capsys):
    root, _ = sweep_dir
    ids = ids_by_index(root)
    assert "collect" in cli.COMMANDS and cli.COMMANDS["collect"][0] == "hpctrain.collect"
    assert run_command([str(root), "--top", "2", "--no-plots"]) == 0
    out, err = capsys.readouterr()
    assert "8 runs" in out and f"best: {ids[1]}" in out
    table = out.splitlines()
    assert any(line.lstrip().startswith("1  " + ids[7]) for line in table)
    assert any(line.lstrip().startswith("2  " + ids[1]) for line in table)
    assert not any(ids[0] in line for line in table)  # --top 2
    assert len([l for l in err.splitlines() if "warning" in l]) == 4 and "state.json: unreadable" in err
    assert run_command([str(root), "--metric", "val_nothing", "--mode", "min"]) == 2
    assert "val_nothing" in capsys.readouterr().err
    assert run_command([str(root / "runs")]) == 2
    assert "grid.jsonl" in capsys.readouterr().err


# --------------------------------------------------------------------------- tensorboard, aggregate


def test_tensorboard_event_files_parse_back(sweep_dir, tmp_path):
    from tensorboard.backend.event_processing import event_accumulator as loader
    from tensorboard.plugins.hparams import metadata

    root, _ = sweep_dir
    tb = tmp_path / "tb"
    result = collect(root, plots=False, tensorboard=tb)
    folders = sorted(p.name for p in tb.iterdir())
    assert len(folders) == 6 and "lr=0.01,hidden=8" in folders

    def load(name):
        acc = loader.EventAccumulator(str(tb / name))
        acc.Reload()
        return acc

    acc = load("lr=0.01,hidden=8")
    assert [s.step for s in acc.Scalars("val/loss")] == [1, 2, 3, 4]
    assert np.allclose([s.value for s in acc.Scalars("val/loss")], [val_loss(0.25, e) for e in range(1, 5)],
                       rtol=1e-6)
    assert set(acc.Tags()["scalars"]) == {"lr", "train/loss", "train/accuracy", "train/auc",
                                          "val/loss", "val/accuracy", "val/auc"}
    hparams = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(hparams[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["optim.lr"].number_value == 0.01 and start.hparams["model.hidden"].string_value == "8"
    experiment = metadata.parse_experiment_plugin_data(hparams[metadata.EXPERIMENT_TAG])
    assert [m.name.tag for m in experiment.metric_infos] == [tensorboard.tag_for(result.metric)]
    assert [s.step for s in load("lr=0.001,hidden=8").Scalars("val/loss")] == [1, 2]   # NaN epoch 3 left out


def test_tensorboard_files_are_identical_on_every_collect(sweep_dir, tmp_path):
    root, _ = sweep_dir
    collect(root, plots=False, tensorboard=tmp_path / "tb")
    first = {p: p.read_bytes() for p in (tmp_path / "tb").rglob("events.*")}
    collect(root, plots=False, tensorboard=tmp_path / "tb")
    assert len(first) == 6 and {p: p.read_bytes() for p in (tmp_path / "tb").rglob("events.*")} == first


def test_aggregate_merges_two_sweeps(tmp_path):
    a, _ = make_sweep(tmp_path, "first")
    b, _ = make_sweep(tmp_path, "second")
    out = tmp_path / "all.csv"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "aggregate.py"), str(a), str(b),
                           "--out", str(out), "--sort"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = read_summary(out)
    assert len(rows) == 16 and list(rows[0])[:3] == ["sweep", "index", "run_id"]
    assert {r["sweep"] for r in rows} == {"first", "second"}
    assert [r["sweep"] for r in rows[:2]] == ["first", "second"] and rows[0]["index"] == "7"
    assert "state.json: unreadable" in proc.stderr
