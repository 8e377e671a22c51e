"""Optimizers, LR schedules, penalties, max-norm and gradient clipping."""
from __future__ import annotations

import math

import pytest
import torch

from hpctrain.config import OptimConfig, ScheduleConfig, build_config
from hpctrain.data.memory import TensorLoader
from hpctrain.dist.backends import NoneBackend
from hpctrain.errors import ConfigError
from hpctrain.model import build_model
from hpctrain.train.loop import Trainer
from hpctrain.train.optim import apply_max_norm, build_optimizer, build_schedule, weight_penalty, weight_tensors


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW), ("nadam", torch.optim.NAdam),
                                       ("rmsprop", torch.optim.RMSprop), ("adagrad", torch.optim.Adagrad)])
def test_each_optimizer_is_built_and_descends(name, cls):
    w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    opt = build_optimizer(OptimConfig(name=name, lr=0.05, weight_decay=0.01), [w])
    assert type(opt) is cls
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["weight_decay"] == 0.01
    start = float((w.detach() ** 2).sum())
    for _ in range(20):
        opt.zero_grad()
        (w ** 2).sum().backward()
        opt.step()
    assert float((w.detach() ** 2).sum()) < start


def test_sgd_momentum_and_nesterov():
    opt = build_optimizer(OptimConfig(name="sgd", momentum=0.8, nesterov=True), [torch.nn.Parameter(torch.ones(1))])
    assert opt.param_groups[0]["momentum"] == 0.8 and opt.param_groups[0]["nesterov"] is True
    with pytest.raises(ConfigError, match="optim.nesterov"):
        build_optimizer(OptimConfig(name="sgd", momentum=0.0, nesterov=True), [torch.nn.Parameter(torch.ones(1))])


def lrs(cfg: ScheduleConfig, lr=1.0, steps=10, steps_per_epoch=1, total=10):
    s = build_schedule(cfg, lr, total)
    return [s.lr_at(i, i // steps_per_epoch) for i in range(steps)]


def test_schedules_give_the_expected_lr_sequences():
    assert lrs(ScheduleConfig(name="none"), steps=3) == [1.0, 1.0, 1.0]
    assert lrs(ScheduleConfig(name="step", milestones=[2, 4], gamma=0.1), steps=6) == \
        pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lrs(ScheduleConfig(name="power", decay_steps=2, power=1.0), steps=3) == pytest.approx([1, 1 / 1.5, 0.5])
    assert lrs(ScheduleConfig(name="exponential", decay_steps=2, decay_rate=0.25), steps=3) == \
        pytest.approx([1, 0.5, 0.25])
    assert lrs(ScheduleConfig(name="exponential", decay_steps=1, decay_rate=0.1, min_lr=0.05), steps=3) == \
        pytest.approx([1, 0.1, 0.05])
    cos = lrs(ScheduleConfig(name="cosine", warmup_steps=2, min_lr=0.0), steps=11, total=10)
    assert cos[:2] == pytest.approx([0.5, 1.0])
    assert cos[2] == pytest.approx(1.0) and cos[6] == pytest.approx(0.5) and cos[10] == pytest.approx(0.0, abs=1e-12)
    warm = lrs(ScheduleConfig(name="none", warmup_steps=4), steps=5)
    assert warm == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_onecycle_rises_then_anneals():
    seq = lrs(ScheduleConfig(name="onecycle", max_lr=1.0), lr=0.1, steps=101, total=100)
    assert seq[0] == pytest.approx(1.0 / 25)
    assert max(seq) == pytest.approx(1.0) and seq.index(max(seq)) == 30
    assert seq[100] == pytest.approx(1e-4)
    assert all(a <= b for a, b in zip(seq[:30], seq[1:31])) and all(a >= b for a, b in zip(seq[30:], seq[31:]))


def test_plateau_lowers_lr_after_patience_and_keeps_state():
    s = build_schedule(ScheduleConfig(name="plateau", patience=1, factor=0.5, threshold=0.0, min_lr=0.2), 1.0, 10)
    seen = []
    for value in [1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95]:
        s.epoch_end(value)
        seen.append(s.lr_at(0, 0))
    assert seen == pytest.approx([1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.2])
    t = build_schedule(ScheduleConfig(name="plateau", patience=1, factor=0.5, threshold=0.0, min_lr=0.2), 1.0, 10)
    t.load_state_dict(s.state_dict())
    assert t.lr_at(0, 0) == s.lr_at(0, 0) and t.state_dict() == s.state_dict()


def test_penalties_by_hand():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.0, 3.0]]))
        model[1].weight.copy_(torch.tensor([[-1.0, 1.0]]))
    weights = weight_tensors(model)
    assert len(weights) == 2                                     # biases are not penalised
    assert weight_penalty(weights, 0.0, 0.0) is None
    assert weight_penalty(weights, 0.1, 0.0).item() == pytest.approx(0.1 * 8)
    assert weight_penalty(weights, 0.0, 0.01).item() == pytest.approx(0.01 * 16)


def test_max_norm_caps_each_units_incoming_weights():
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    apply_max_norm([w], 2.0)
    assert w[0].norm().item() == pytest.approx(2.0, rel=1e-5)
    assert torch.allclose(w[1], torch.tensor([0.3, 0.4]))        # under the cap: unchanged


def _train(optim: dict, epochs=3, seed=0):
    cfg = build_config({"data": {"task": "regression", "batch_size": 20}, "model": {"hidden": [8]},
                        "optim": optim, "train": {"epochs": epochs}})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 4, generator=g)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 0.0])).unsqueeze(1) * 5
    torch.manual_seed(seed)
    model = build_model(cfg.model, "regression", 4)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(cfg, model, TensorLoader(x, y, batch_size=20), TensorLoader(x, y, batch_size=50, split="val"),
                      NoneBackend(device_preference="cpu"), log=lambda m: None)
    result = trainer.fit()
    return model, start, result


def test_l1_and_l2_shrink_the_weights():
    plain, _, _ = _train({"name": "sgd", "lr": 0.01, "momentum": 0.0})
    l2, _, _ = _train({"name": "sgd", "lr": 0.01, "momentum": 0.0, "l2": 0.5})
    l1, _, _ = _train({"name": "sgd", "lr": 0.01, "momentum": 0.0, "l1": 1.0})
    sq = lambda m: sum(float((w.detach() ** 2).sum()) for w in weight_tensors(m))
    ab = lambda m: sum(float(w.detach().abs().sum()) for w in weight_tensors(m))
    assert sq(l2) < 0.9 * sq(plain)
    assert ab(l1) < 0.9 * ab(plain)


def test_max_norm_holds_during_training():
    model, _, _ = _train({"name": "adam", "lr": 0.05, "max_norm": 0.5})
    for w in weight_tensors(model):
        assert float(w.detach().norm(dim=1).max()) <= 0.5 + 1e-5


def test_gradient_clipping_bounds_the_step():
    # one SGD step with lr 1: the parameter change is the clipped gradient, of norm <= 0.01
    model, start, result = _train({"name": "sgd", "lr": 1.0, "momentum": 0.0, "grad_clip": 0.01}, epochs=1)
    assert result.status == "done"
    steps = result.step
    change = math.sqrt(sum(float(((model.state_dict()[k] - start[k]) ** 2).sum()) for k in start))
    assert 0 < change <= 0.01 * steps + 1e-6
    _, _, free = _train({"name": "sgd", "lr": 1.0, "momentum": 0.0}, epochs=1)
    assert free.status == "diverged"          # the same steps unclipped blow up
