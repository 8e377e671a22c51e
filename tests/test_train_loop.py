"""The Trainer end to end on small in-memory data: files, exact resume, early stopping,
divergence, stop flags, overfit check, max_steps, checkpoints and weights_only loading."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from hpctrain.config import build_config
from hpctrain.data.memory import TensorLoader
from hpctrain.dist.backends import NoneBackend
from hpctrain.model import build_model
from hpctrain.train.checkpoint import load_checkpoint
from hpctrain.runstate import RunRecorder, RunState, read_state
from state_files import put_state
from hpctrain.train.loop import Trainer
from hpctrain.train.overfit import OverfitCheck
from hpctrain.train.run_log import parse_metrics_csv
from hpctrain.train.signals import StopFlag


def make_cfg(task="binary", **sections):
    raw = {"seed": 3, "data": {"task": task, "batch_size": 32},
           "model": {"hidden": [16, 16], "dropout": 0.2}, "train": {"epochs": 3}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return build_config(raw)


def make_data(task="binary", n=300, f=6, seed=0, weights=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g)
    if task == "binary":
        y = (x[:, 0] - 0.5 * x[:, 1] + 0.3 * torch.randn(n, generator=g) > 0).long()
    elif task == "multiclass":
        y = torch.stack([x[:, 0], x[:, 1], -x[:, 0] - x[:, 1]], 1).argmax(1)
    else:
        y = torch.stack([x[:, 0] * 2 + x[:, 1], x[:, 2] - x[:, 3]], 1)
    w = torch.rand(n, generator=g) + 0.5 if weights else None
    return x, y, w


def make_trainer(cfg, run_dir=None, stop_flag=None, n=300, weights=False, log=None, model_seed=0):
    x, y, w = make_data(cfg.data.task, n=n, weights=weights)
    a, b = int(n * 0.6), int(n * 0.8)
    bs = cfg.data.batch_size
    part = (lambda t, lo, hi: None if t is None else t[lo:hi])
    train = TensorLoader(x[:a], y[:a], part(w, 0, a), batch_size=bs, seed=cfg.seed)
    val = TensorLoader(x[a:b], y[a:b], part(w, a, b), batch_size=bs, split="val")
    test = TensorLoader(x[b:], y[b:], part(w, b, n), batch_size=bs, split="test")
    torch.manual_seed(model_seed)
    n_classes = 3 if cfg.data.task == "multiclass" else 2
    n_targets = 2 if cfg.data.task == "regression" else 1
    model = build_model(cfg.model, cfg.data.task, x.shape[1], n_classes=n_classes, n_targets=n_targets)
    meta = {"task": cfg.data.task, "n_features": x.shape[1], "n_classes": n_classes, "n_targets": n_targets,
            "standardize": False, "mean": [0.0] * x.shape[1], "std": [1.0] * x.shape[1]}
    logs = [] if log is None else log
    trainer = Trainer(cfg, model, train, val, NoneBackend(device_preference="cpu"), run_dir=run_dir,
                      test_loader=test, stop_flag=stop_flag, log=logs.append, model_meta=meta, on_progress=RunRecorder(run_dir).report if run_dir is not None else None)
    return trainer, logs


class StopAfterSteps:
    """A stop flag that reads as requested once the trainer has taken ``n`` steps."""

    def __init__(self, n):
        self.n, self.trainer, self.signal_name = n, None, "test-stop"

    @property
    def requested(self):
        return self.trainer.step >= self.n


def run_interrupted(cfg, run_dir, stop_steps, **kw):
    """Run with stops after each of ``stop_steps``, resuming with a fresh Trainer each time."""
    for i, n in enumerate(stop_steps):
        flag = StopAfterSteps(n)
        # a resumed run builds its model afresh (other weights): the checkpoint must replace them
        trainer, _ = make_trainer(cfg, run_dir, stop_flag=flag, model_seed=0 if i == 0 else 99 + i, **kw)
        flag.trainer = trainer
        result = trainer.fit()
        assert result.status == "preempted", result
        assert result.step == n
    trainer, logs = make_trainer(cfg, run_dir, model_seed=123, **kw)
    return trainer, trainer.fit(), logs


def params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- a plain run


def test_fit_writes_metrics_state_checkpoints(tmp_path):
    put_state(tmp_path, RunState(status="running", index=4, run_id="abc", params={"optim.lr": 0.01}))
    cfg = make_cfg()
    trainer, logs = make_trainer(cfg, tmp_path)
    result = trainer.fit()
    assert result.status == "done" and result.epoch == 3 and result.step == 3 * 6
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "epoch,step,lr,train_loss,train_accuracy,train_auc,val_loss,val_accuracy,val_auc"
    assert [ln.split(",")[:2] for ln in lines[1:]] == [["1", "6"], ["2", "12"], ["3", "18"]]
    timing = (tmp_path / "timing.csv").read_text().splitlines()
    assert timing[0] == "epoch,epoch_time_s,samples_per_s,elapsed_s" and len(timing) == 4
    state = read_state(tmp_path)
    assert (state.status, state.epoch, state.total_epochs, state.step) == ("done", 3, 3, 18)
    assert (state.index, state.run_id, state.params) == (4, "abc", {"optim.lr": 0.01})
    assert state.monitor == "val_loss" and state.best_epoch == result.best_epoch
    assert set(state.test) == {"test_loss", "test_accuracy", "test_auc"} == set(result.test_metrics)
    assert state.backend == "none" and state.world_size == 1 and state.samples_per_s > 0
    assert (tmp_path / "checkpoints" / "last.pt").exists() and (tmp_path / "checkpoints" / "best.pt").exists()
    epoch_lines = [m for m in logs if m.startswith("epoch ")]
    assert len(epoch_lines) == 3 and "val_auc" in epoch_lines[0] and "samples/s" in epoch_lines[0]


def test_checkpoint_loads_with_weights_only_and_holds_model_meta(tmp_path):
    cfg = make_cfg()
    trainer, _ = make_trainer(cfg, tmp_path)
    trainer.fit()
    payload = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    for key in ("format", "model", "optimizer", "scheduler", "early_stopping", "epoch", "step", "loader",
                "rng", "metrics", "config", "model_meta"):
        assert key in payload, key
    assert payload["model_meta"]["task"] == "binary" and payload["model_meta"]["n_features"] == 6
    assert payload["config"]["model"]["hidden"] == [16, 16]
    model = build_model(cfg.model, "binary", 6)
    model.load_state_dict(payload["model"])      # a best model loads without its dataset


def test_test_split_is_evaluated_with_the_best_weights(tmp_path):
    cfg = make_cfg(optim={"lr": 0.05}, train={"epochs": 4, "monitor": "val_auc"})
    trainer, _ = make_trainer(cfg, tmp_path)
    result = trainer.fit()
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == result.best_epoch
    assert result.best_metric == max(r["val_auc"] for r in parse_metrics_csv(best["metrics"]))
    model = build_model(cfg.model, "binary", 6)
    model.load_state_dict(best["model"])
    model.eval()
    x, y, _ = make_data("binary")
    with torch.no_grad():
        acc = ((model(x[240:]) > 0) == y[240:].bool()).double().mean().item()
    assert result.test_metrics["test_accuracy"] == pytest.approx(acc)


@pytest.mark.parametrize("task, columns", [
    ("multiclass", "train_loss,train_accuracy,val_loss,val_accuracy"),
    ("regression", "train_loss,train_rmse,train_mae,val_loss,val_rmse,val_mae"),
])
def test_columns_by_task(tmp_path, task, columns):
    trainer, _ = make_trainer(make_cfg(task, train={"epochs": 2}), tmp_path)
    result = trainer.fit()
    assert result.status == "done"
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header == "epoch,step,lr," + columns


def test_weighted_loss_runs_and_needs_weights(tmp_path):
    cfg = make_cfg("regression", loss={"name": "huber", "weighted": True}, train={"epochs": 1})
    trainer, _ = make_trainer(cfg, tmp_path, weights=True)
    assert trainer.fit().status == "done"
    from hpctrain.errors import DataError
    trainer, _ = make_trainer(cfg, None, weights=False)
    with pytest.raises(DataError, match="loss.weighted"):
        trainer.fit()


@pytest.mark.parametrize("weighted", [False, True])
def test_micro_batches_step_on_the_whole_batch_mean(weighted):
    # 3 backward passes over unequal micro-batches (11, 11, 10 rows) must give the gradient of the
    # batch's (weighted) mean: each pass weighs its mean by its share of the batch's denominator.
    from hpctrain.train.losses import build_loss
    from hpctrain.train.optim import build_optimizer
    from hpctrain.train.step import TrainStep

    x, y, w = make_data("binary", n=32, weights=True)
    w = w * torch.linspace(0.1, 3.0, 32) if weighted else None  # weights far from uniform
    finals = []
    for passes in (1, 3):
        cfg = make_cfg(loss={"weighted": weighted}, optim={"name": "sgd", "lr": 0.5, "l2": 0.01},
                       dist={"backward_passes_per_step": passes}, model={"dropout": 0.0})
        backend = NoneBackend(cfg.dist, device_preference="cpu")
        torch.manual_seed(0)
        model = build_model(cfg.model, "binary", x.shape[1])
        optimizer = build_optimizer(cfg.optim, model.parameters())
        step = TrainStep(cfg, model, model, optimizer, build_loss(cfg.loss, "binary"), backend, torch.device("cpu"))
        result = step(x, y, w)
        finals.append((params(model), result.loss.item()))
    (one, loss_one), (three, loss_three) = finals
    assert loss_three == pytest.approx(loss_one, rel=1e-6)
    assert all(torch.allclose(one[k], three[k], rtol=1e-5, atol=1e-7) for k in one)


def test_no_progress_bar_without_a_terminal(capsys):
    trainer, _ = make_trainer(make_cfg(train={"epochs": 1}))
    trainer.fit()
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("task, stops", [
    ("binary", [7]),            # mid-epoch (6 batches an epoch: epoch 2, batch 1)
    ("binary", [4, 6, 15]),     # several stops, one on an epoch's last batch
    ("regression", [10]),
    ("multiclass", [13]),
])
def test_exact_resume_matches_an_uninterrupted_run(tmp_path, task, stops):
    cfg = make_cfg(task, schedule={"name": "plateau", "patience": 0, "factor": 0.5},
                   optim={"lr": 0.01}, train={"epochs": 4})
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref, _ = make_trainer(cfg, ref_dir)
    ref_result = ref.fit()
    trainer, result, logs = run_interrupted(cfg, cut_dir, stops)
    assert result.status == "done" and result.resumed_from == "last.pt"
    assert any(m.startswith("resumed from last.pt") for m in logs)
    assert (cut_dir / "metrics.csv").read_bytes() == (ref_dir / "metrics.csv").read_bytes()
    a, b = params(ref.raw_model), params(trainer.raw_model)
    # the trainer loads the best weights for the test split at the end: compare last.pt
    last_ref = torch.load(ref_dir / "checkpoints" / "last.pt", weights_only=True)
    last_cut = torch.load(cut_dir / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(last_ref["model"][k], last_cut["model"][k]) for k in last_ref["model"])
    assert all(torch.equal(a[k], b[k]) for k in a)   # the best weights, too
    assert result.test_metrics == ref_result.test_metrics
    assert (result.best_metric, result.best_epoch) == (ref_result.best_metric, ref_result.best_epoch)


def test_resume_truncates_rows_written_after_the_checkpoint(tmp_path):
    cfg = make_cfg(train={"epochs": 3, "checkpoint_every_epochs": 2})
    ref, _ = make_trainer(cfg, tmp_path / "ref")
    ref.fit()
    cut = tmp_path / "cut"
    flag = StopAfterSteps(8)
    trainer, _ = make_trainer(cfg, cut, stop_flag=flag)
    flag.trainer = trainer
    trainer.fit()
    # a crash after a metrics row was written but before its checkpoint: an extra row
    with open(cut / "metrics.csv", "a") as f:
        f.write("2,12,0.001,9,9,9,9,9,9\n3,18,0.001,9,9,9,9,9,9\n")
    trainer, _ = make_trainer(cfg, cut)
    assert trainer.fit().status == "done"
    assert (cut / "metrics.csv").read_bytes() == (tmp_path / "ref" / "metrics.csv").read_bytes()
    assert [ln.split(",")[0] for ln in (cut / "timing.csv").read_text().splitlines()[1:]] == ["1", "2", "3"]


def test_corrupt_last_checkpoint_falls_back_and_is_named(tmp_path):
    cfg = make_cfg(train={"epochs": 3, "checkpoint_min_interval_s": 0})  # last.pt at every epoch's end
    flag = StopAfterSteps(14)
    trainer, _ = make_trainer(cfg, tmp_path, stop_flag=flag)
    flag.trainer = trainer
    trainer.fit()
    last = tmp_path / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: len(last.read_bytes()) // 2])
    trainer, logs = make_trainer(cfg, tmp_path)
    result = trainer.fit()
    assert result.status == "done" and result.resumed_from == "previous.pt"
    assert any("last.pt" in m and "truncated or corrupt" in m for m in logs)


def test_checkpoint_every_steps_saves_mid_epoch(tmp_path):
    cfg = make_cfg(train={"epochs": 1, "checkpoint_every_steps": 4, "checkpoint_every_epochs": 5})
    flag = StopAfterSteps(5)
    trainer, _ = make_trainer(cfg, tmp_path)
    saved = []
    original = trainer._save
    trainer._save = lambda last=False, best=False: (saved.append((trainer.step, last, best)),
                                                    original(last=last, best=best))
    trainer.fit()
    assert (4, True, False) in saved
    payload = torch.load(tmp_path / "checkpoints" / "previous.pt", weights_only=True)
    assert (payload["step"], payload["batch_in_epoch"], payload["loader"]["batches_done"]) == (4, 4, 4)
    assert flag.n == 5


# ---------------------------------------------------------------------------- stopping


def test_stop_flag_from_a_real_signal(tmp_path):
    flag = StopFlag().install([signal.SIGUSR1])
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.requested and flag.signal_name == "SIGUSR1"
        trainer, _ = make_trainer(make_cfg(), tmp_path, stop_flag=flag)
        result = trainer.fit()
    finally:
        flag.uninstall()
    assert result.status == "preempted" and result.step == 1
    assert "SIGUSR1" in result.message and "epoch 1, step 1" in result.message
    state = read_state(tmp_path)
    assert state.status == "preempted"
    payload = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert payload["step"] == 1 and payload["batch_in_epoch"] == 1


def test_max_steps_ends_the_run(tmp_path):
    trainer, _ = make_trainer(make_cfg(train={"epochs": 5, "max_steps": 8}), tmp_path)
    result = trainer.fit()
    assert (result.status, result.step, result.epoch) == ("done", 8, 2)
    assert "max_steps" in result.message
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 3


def test_early_stopping_and_its_resume(tmp_path):
    # min_delta so large that no epoch counts as an improvement after the first
    cfg = make_cfg(train={"epochs": 8, "early_stopping": {"patience": 2, "min_delta": 100.0}})
    ref, _ = make_trainer(cfg, tmp_path / "ref")
    result = ref.fit()
    assert (result.status, result.epoch) == ("done", 3)
    assert "early stopping at epoch 3" in result.message
    # stopped in epoch 3 (after two epochs of waiting): the wait count must survive
    _, resumed, _ = run_interrupted(cfg, tmp_path / "cut", [14])
    assert (resumed.status, resumed.epoch) == ("done", 3)
    assert (tmp_path / "cut" / "metrics.csv").read_bytes() == (tmp_path / "ref" / "metrics.csv").read_bytes()


def test_divergence_stops_with_state_diverged(tmp_path):
    cfg = make_cfg("regression", optim={"name": "sgd", "lr": 1e6, "momentum": 0.0})
    trainer, _ = make_trainer(cfg, tmp_path)
    result = trainer.fit()
    assert result.status == "diverged"
    assert "epoch 1, step" in result.message and "optim.lr" in result.message
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["status"] == "diverged" and state["message"] == result.message
    assert not (tmp_path / "checkpoints" / "last.pt").exists()   # no NaN weights saved


# ---------------------------------------------------------------------------- overfit check


def overfit_check(cfg, n_batches):
    """An overfit check of ``n_batches`` batches wired to a Trainer as the runner wires it."""
    check = OverfitCheck(n_batches, cfg.data.task)
    trainer, logs = make_trainer(cfg)
    checked, train, val = check.setup(cfg, trainer.train_loader)
    model = trainer.raw_model
    trainer = Trainer(checked, model, train, val, NoneBackend(device_preference="cpu"), log=logs.append,
                      model_meta=trainer.model_meta, on_epoch_end=check.on_epoch_end)
    check.start(trainer.evaluate)
    return check, trainer, logs


def test_overfit_batches_passes_on_a_learnable_problem():
    cfg = make_cfg(model={"hidden": [64, 64], "dropout": 0.0}, optim={"lr": 0.01}, train={"epochs": 300})
    check, trainer, logs = overfit_check(cfg, 2)
    result = check.judge(trainer.fit(), trainer.rows)
    assert result.status == "done" and result.overfit_passed is True
    assert "passed" in result.message and "2 fixed batches (64 rows)" in result.message
    assert result.epoch < 300 and result.test_metrics == {}
    assert trainer.rows[-1]["val_accuracy"] >= 0.99 and len(trainer.rows) == result.epoch


def test_overfit_batches_trains_on_the_same_batches_each_epoch_with_them_as_validation():
    cfg = make_cfg(model={"hidden": [64, 64], "dropout": 0.0}, optim={"lr": 0.01},
                   train={"epochs": 3, "early_stopping": {"patience": 1}})
    check, trainer, _ = overfit_check(cfg, 3)
    assert trainer.monitor == "val_loss" and trainer.early.patience is None and trainer.test_loader is None
    first = [b.x.clone() for b in trainer.train_loader]
    trainer.fit()
    assert len(trainer.train_loader) == 3 and all(torch.equal(a, b.x) for a, b in zip(first, trainer.train_loader))
    assert trainer.val_loader.batches is trainer.train_loader.batches


def test_overfit_batches_reports_failure():
    cfg = make_cfg(model={"hidden": [2], "dropout": 0.0}, optim={"lr": 1e-5}, train={"epochs": 2})
    check, trainer, _ = overfit_check(cfg, 2)
    result = check.judge(trainer.fit(), trainer.rows)
    assert result.overfit_passed is False and "FAILED to reach accuracy >= 0.99" in result.message
    assert result.epoch == 2


def test_overfit_batches_of_a_regression_judge_the_loss_against_its_start():
    cfg = make_cfg("regression", model={"hidden": [64, 64], "dropout": 0.0}, optim={"lr": 0.01},
                   train={"epochs": 2})
    check, trainer, _ = overfit_check(cfg, 2)
    result = check.judge(trainer.fit(), trainer.rows)
    assert check.start_loss > 0 and result.overfit_passed is (trainer.rows[-1]["val_loss"] <= 0.01 * check.start_loss)
    assert f"(from {check.start_loss:.4g})" in result.message


def test_checkpoints_held_back_by_the_minimum_interval_hold_the_same_content(tmp_path):
    # Epochs far shorter than checkpoint_min_interval_s: nothing is written until the end,
    # the best epoch is held in memory meanwhile. The files must be those of a run that
    # wrote at every epoch's end.
    files = {}
    for interval in (0, 3600):
        cfg = make_cfg(train={"epochs": 10, "checkpoint_min_interval_s": interval}, optim={"lr": 0.05})
        run_dir = tmp_path / f"every-{interval}"
        trainer, _ = make_trainer(cfg, run_dir)
        result = trainer.fit()
        assert result.status == "done"
        folder = run_dir / "checkpoints"
        files[interval] = {name: load_checkpoint(folder / name) for name in ("last.pt", "best.pt")}
        files[interval]["previous.pt exists"] = (folder / "previous.pt").exists()
        files[interval]["best epoch"] = result.best_epoch
    every, held = files[0], files[3600]
    assert every["previous.pt exists"] and not held["previous.pt exists"]  # one write, not ten
    assert held["best epoch"] == every["best epoch"] < 10  # a best epoch that was held, not the last one
    for name in ("last.pt", "best.pt"):
        a, b = every[name], held[name]
        assert a["epoch"] == b["epoch"] and a["metrics"] == b["metrics"], name
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), (name, key)
    assert held["best.pt"]["epoch"] == held["best epoch"]
