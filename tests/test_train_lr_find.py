"""LR range test: the suggestion on a problem whose critical LR is known, the trainer's step
(clipping, penalties, max-norm, precision, accumulation, Horovod's optimizer API), and
``hpctrain lr-find`` on 2 ranks against one process with the doubled batch."""
from __future__ import annotations

import contextlib
import csv
import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from hpctrain.config import build_config
from hpctrain.data.memory import TensorLoader
from hpctrain.dist.backends import NoneBackend
from hpctrain.train.losses import build_loss
from hpctrain.train.lr_find import BatchShares, lr_range_test, steepest_descent_lr, tenth_of_divergence_lr
from hpctrain.train.step import TrainStep
from mpi_scripts.launch import MPIRUN_ARGS, PYTHON, REPO, clean_env, mpirun_available
from conftest import require

BATCH = 32  # per rank on 2 ranks; the single process gets twice as many


def regression_config(**optim):
    return build_config({"data": {"task": "regression", "batch_size": 256}, "loss": {"name": "mse"},
                         "optim": {"name": "sgd", "momentum": 0.0, **optim}})


def regression_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 8, generator=g)
    y = (x @ torch.randn(8, generator=g)).unsqueeze(1) + 0.1 * torch.randn(4096, 1, generator=g)
    return x, y


def test_suggestion_on_linear_regression(tmp_path):
    # MSE on standardised independent features: the Hessian is about 2 I, so plain SGD
    # diverges above lr ~ 1. The suggestion must lie below that, and still learn.
    x, y = regression_data()
    loader = TensorLoader(x, y, batch_size=256, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = build_loss(regression_config().loss, "regression")
    result = lr_range_test(regression_config(), model, loader, NoneBackend(device_preference="cpu"),
                           start_lr=1e-4, end_lr=100.0, steps=120, smoothing=0.9)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)   # a copy was trained
    assert result.blowup_lr is not None and 0.8 < result.blowup_lr < 10
    assert result.suggestion == result.tenth_lr == result.blowup_lr / 10
    assert 0.05 < result.suggestion < 1.0
    assert result.steepest_lr is not None and result.lrs[0] < result.steepest_lr <= result.min_loss_lr
    assert len(result.lrs) < 120 and result.lrs == sorted(result.lrs)
    assert "steepest descent" in result.summary() and "tenth of divergence" in result.summary()
    assert "smoothed" in result.table()
    result.plot(tmp_path / "lr.png")
    result.write_csv(tmp_path / "lr.csv")
    result.write_json(tmp_path / "lr.json")
    saved = json.loads((tmp_path / "lr.json").read_text())
    assert saved["steepest_lr"] == result.steepest_lr and saved["tenth_lr"] == result.tenth_lr
    assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "lr.csv").read_text().splitlines()[0] == "step,lr,loss,smoothed"
    # the suggested rate trains the model well
    opt = torch.optim.SGD(model.parameters(), lr=result.suggestion)
    for _ in range(3):
        for batch in loader:
            opt.zero_grad()
            loss_fn(model(batch.x), batch.y)[0].backward()
            opt.step()
    with torch.no_grad():
        assert loss_fn(model(x), y)[0].item() < 0.05


def synthetic_curve(n: int = 121):
    """A smoothed loss against LR 1e-6..1e0: flat at 1, a sigmoid drop to 0.1 centred on 1e-3
    (steepest there), flat again, then a rise that passes 4 x the minimum just past 0.1."""
    lrs = [10 ** (-6 + 6 * i / (n - 1)) for i in range(n)]
    loss = [0.1 + 0.9 / (1 + math.exp(4 * (math.log10(lr) + 3))) + 30 * max(0.0, math.log10(lr) + 1) ** 2
            for lr in lrs]
    return lrs, loss


def test_suggestions_on_a_known_curve():
    lrs, loss = synthetic_curve()
    best = min(range(len(loss)), key=loss.__getitem__)
    blowup = next(lr for lr, v in zip(lrs[best:], loss[best:]) if v > 4 * loss[best])
    steepest = steepest_descent_lr(lrs, loss)
    tenth = tenth_of_divergence_lr(blowup, lrs[best])
    assert steepest == pytest.approx(1e-3, rel=0.15)
    assert tenth == pytest.approx(blowup / 10) and 0.1 < blowup < 0.2
    assert steepest < lrs[best] and steepest < tenth < blowup


def test_suggestions_without_a_descent_or_a_blowup():
    lrs = [1e-5, 1e-4, 1e-3, 1e-2]
    assert steepest_descent_lr(lrs, [1.0, 1.1, 1.2, 1.3]) is None     # never falls: the minimum is first
    assert steepest_descent_lr(lrs[:2], [1.0, 0.5]) is None           # too few points
    assert steepest_descent_lr(lrs, [1.0, 0.9, float("nan"), 0.2]) == pytest.approx(1e-2)
    assert tenth_of_divergence_lr(None, 1e-2) == pytest.approx(1e-3)
    assert tenth_of_divergence_lr(None, None) is None


# ---------------------------------------------------------------------- the trainer's step


class HorovodStyleOptimizer:
    """Horovod's DistributedOptimizer API on one process: ``zero_grad()`` takes no arguments,
    ``step()`` synchronises unless inside ``skip_synchronize()``."""

    def __init__(self, optimizer):
        self.optimizer, self.param_groups = optimizer, optimizer.param_groups
        self.synchronized = self.skipped = 0
        self._skip = False

    def zero_grad(self):
        self.optimizer.zero_grad()

    def synchronize(self):
        self.synchronized += 1

    @contextlib.contextmanager
    def skip_synchronize(self):
        self.skipped += 1
        self._skip = True
        try:
            yield
        finally:
            self._skip = False

    def step(self):
        if not self._skip:
            self.synchronize()
        self.optimizer.step()

    def state_dict(self):
        return self.optimizer.state_dict()


class RecordingBackend(NoneBackend):
    def __init__(self, passes: int):
        super().__init__(device_preference="cpu")
        self.backward_passes_per_step = passes
        self.micro_steps: list[bool] = []

    def wrap(self, model, optimizer):
        self.optimizer = HorovodStyleOptimizer(optimizer)
        return model, self.optimizer

    def accumulation_context(self, model, is_last_micro_step):
        self.micro_steps.append(is_last_micro_step)
        return contextlib.nullcontext()


def test_steps_take_horovods_optimizer_api_and_accumulate():
    x, y = regression_data()
    backend = RecordingBackend(passes=2)
    result = lr_range_test(regression_config(grad_clip=1.0), torch.nn.Linear(8, 1), TensorLoader(x, y, batch_size=64),
                           backend, start_lr=1e-3, end_lr=1e-1, steps=5)
    assert len(result.lrs) == 5
    assert backend.micro_steps == [False, True] * 5   # two backward passes a step, the second reduces
    assert backend.optimizer.synchronized == backend.optimizer.skipped == 5  # clip after averaging, once


class GradNormAtSync(HorovodStyleOptimizer):
    def synchronize(self):
        super().synchronize()
        self.norm_at_sync = torch.cat([p.grad.reshape(-1) for p in self.optimizer.param_groups[0]["params"]]).norm()


@pytest.mark.parametrize("clip", [None, 100.0])
def test_loss_scaling_unscales_the_averaged_gradients(clip):
    # fp16 on CUDA with Horovod: the gradients must be averaged before they are unscaled,
    # or the step would use the averaged *scaled* gradients. A CPU GradScaler stands in.
    x, y = regression_data()
    cfg = regression_config(grad_clip=clip)
    weights, norms = {}, {}
    for scale in (None, 1024.0):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 1)
        optimizer = GradNormAtSync(torch.optim.SGD(model.parameters(), lr=0.1))
        step = TrainStep(cfg, model, model, optimizer, build_loss(cfg.loss, "regression"),
                         NoneBackend(device_preference="cpu"), torch.device("cpu"))
        if scale is not None:
            step.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        step(x[:256], y[:256], None)
        assert optimizer.synchronized == 1   # the gradients are averaged once
        weights[scale] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        norms[scale] = float(optimizer.norm_at_sync)
    assert norms[1024.0] == pytest.approx(1024.0 * norms[None], rel=1e-4)   # averaged while still scaled
    assert torch.allclose(weights[1024.0], weights[None], rtol=1e-5, atol=1e-6)   # the step itself is unscaled


def curve(precision="fp32", passes=1, **optim):
    x, y = regression_data()
    cfg = regression_config(**optim)
    cfg.train.precision = precision
    backend = NoneBackend(device_preference="cpu")
    backend.backward_passes_per_step = passes
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return lr_range_test(cfg, model, TensorLoader(x, y, batch_size=256, seed=0), backend,
                         start_lr=1e-3, end_lr=1.0, steps=12).losses


@pytest.mark.parametrize("setting", [{"grad_clip": 0.05}, {"l1": 0.05}, {"l2": 0.05}, {"max_norm": 0.2},
                                     {"precision": "bf16"}])
def test_step_settings_act_on_the_curve(setting):
    plain = curve()
    changed = curve(**setting)
    assert len(changed) == len(plain) == 12
    assert changed[0] == pytest.approx(plain[0], rel=1e-2)  # the same start (the loss is measured before the step)
    assert max(abs(a - b) for a, b in zip(changed[1:], plain[1:])) > 1e-4


def test_accumulation_gives_the_full_batch_gradient():
    assert curve(passes=4) == pytest.approx(curve(), rel=1e-5)


def test_batch_shares_make_up_the_global_batch():
    x, y = regression_data()
    x, y = x[:200], y[:200]
    one = TensorLoader(x, y, batch_size=64, seed=3)
    shares = [BatchShares(TensorLoader(x, y, batch_size=64, seed=3), rank, 2) for rank in range(2)]
    for epoch in range(2):
        one.set_epoch(epoch)
        for s in shares:
            s.set_epoch(epoch)
        expected = [b.x for b in one][:3]              # 200 rows: 3 full batches, the short one is skipped
        got = [torch.cat(parts) for parts in zip(*(list(b.x for b in s) for s in shares))]
        assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(expected, got))
        assert all(len(b.x) == 32 for b in shares[1])
    with pytest.raises(ValueError, match="multiple"):
        BatchShares(one, 0, 3)


# ---------------------------------------------------------------------- hpctrain lr-find on 2 ranks


def write_config(folder: Path) -> Path:
    """Clipping, both penalties, max-norm and 2 backward passes a step, all of which the
    2-rank run must apply exactly as the single process does."""
    cfg = {"name": "lrfind", "seed": 0,
           "data": {"path": str(folder / "data"), "task": "binary", "batch_size": BATCH,
                    "synth": {"rows": 3000, "features": 8, "shards": 2, "seed": 0}},
           "model": {"hidden": [16]},
           "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "grad_clip": 2.0, "l1": 1e-4, "l2": 1e-3,
                     "max_norm": 10.0},
           "train": {"threads": 1}, "dist": {"backend": "none", "backward_passes_per_step": 2, "timeout_s": 60}}
    path = folder / "lrfind.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def hpctrain_command() -> list[str]:
    script = Path(PYTHON).parent / "hpctrain"
    return [str(script)] if script.exists() else [PYTHON, "-m", "hpctrain"]


SUGGESTION = r"suggested learning rate \({}\): (\S+)"


def lr_find(config: Path, out: Path, *overrides: str, ranks: int = 1) -> tuple[list[list[float]], str]:
    """Run ``hpctrain lr-find``; the (lr, loss) rows of lr_find.csv and the tenth-of-divergence
    suggestion printed (the steepest-descent one is checked against lr_find.json here)."""
    args = [*hpctrain_command(), "lr-find", str(config), *overrides, "--steps", "50", "--start-lr", "1e-3",
            "--end-lr", "1000", "--out", str(out)]
    if ranks > 1:
        args = ["mpirun", "-np", str(ranks), *MPIRUN_ARGS, *args]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240, env=clean_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.search(SUGGESTION.format("tenth of divergence"), proc.stdout)
    steepest = re.search(SUGGESTION.format("steepest descent"), proc.stdout)
    assert found and steepest, proc.stdout[-3000:]
    saved = json.loads((out / "lr_find.json").read_text())
    assert float(found.group(1)) == pytest.approx(saved["tenth_lr"], rel=1e-2)
    assert float(steepest.group(1)) == pytest.approx(saved["steepest_lr"], rel=1e-2)
    assert (out / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "lr_find.csv", newline="") as f:
        rows = [[float(r["lr"]), float(r["loss"])] for r in csv.DictReader(f)]
    return rows, found.group(1)


def horovod_imports() -> bool:
    # In a child process: importing horovod.torch here would load its MPI into pytest.
    return subprocess.run([PYTHON, "-c", "import horovod.torch"], capture_output=True, env=clean_env()).returncode == 0


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lrfind")
    config = write_config(folder)
    rows, suggestion = lr_find(config, folder / "one", f"data.batch_size={2 * BATCH}")
    return config, rows, suggestion


def test_command_prints_and_saves_both_suggestions(single_process):
    # lr_find() asserts that both lines are printed and agree with lr_find.json
    _, rows, suggestion = single_process
    assert len(rows) < 50 and float(suggestion) > 0


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["horovod", "torch", "mpi"])
def test_two_ranks_match_one_process_with_double_batch(single_process, tmp_path, backend):
    require(mpirun_available(), "mpirun is not installed")
    if backend == "horovod":
        require(horovod_imports(), "horovod.torch does not import (scripts/install-horovod.sh)")
    config, one_rows, one_suggestion = single_process
    rows, suggestion = lr_find(config, tmp_path / backend, f"dist.backend={backend}", ranks=2)
    assert len(one_rows) < 50, "the loss never blew up: the comparison would not reach the unstable end"
    assert len(rows) == len(one_rows)
    assert [r[0] for r in rows] == [r[0] for r in one_rows]
    assert [r[1] for r in rows] == pytest.approx([r[1] for r in one_rows], rel=1e-4)
    assert float(suggestion) == pytest.approx(float(one_suggestion), rel=1e-4)
