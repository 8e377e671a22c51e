"""Losses (plain and weighted) and metrics against values computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from hpctrain.config import LossConfig
from hpctrain.dist.backends import NoneBackend
from hpctrain.errors import ConfigError, DataError
from hpctrain.monitor import better_mode as monitor_mode
from hpctrain.train import losses as losses_module
from hpctrain.train.losses import MetricSums, build_loss, check_monitor, roc_auc

BACKEND = NoneBackend(device_preference="cpu")


def loss(name, task, weighted=False, delta=1.0):
    return build_loss(LossConfig(name=name, weighted=weighted, huber_delta=delta), task)


def test_auto_picks_by_task():
    assert loss("auto", "binary").name == "bce"
    assert loss("auto", "multiclass").name == "ce"
    assert loss("auto", "regression").name == "mse"


def test_regression_losses_by_hand():
    out = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    y = torch.tensor([[0.0, 4.0], [0.5, -3.0]])
    # per-sample means over the two targets
    mse = [(1 + 4) / 2, (0.25 + 9) / 2]
    mae = [(1 + 2) / 2, (0.5 + 3) / 2]
    huber = [(0.5 + 1.5) / 2, (0.125 + 2.5) / 2]          # delta 1: 0.5 e^2 if |e|<=1 else |e| - 0.5
    for name, per in (("mse", mse), ("mae", mae), ("huber", huber)):
        value, den = loss(name, "regression")(out, y)
        assert value.item() == pytest.approx(sum(per) / 2) and den == 2
    w = torch.tensor([3.0, 1.0])
    value, den = loss("mse", "regression", weighted=True)(out, y, w)
    assert value.item() == pytest.approx((3 * mse[0] + mse[1]) / 4) and den.item() == 4.0
    value, _ = loss("huber", "regression", delta=2.0)(out, y)
    assert value.item() == pytest.approx(((0.5 + 2.0) / 2 + (0.125 + 4.0) / 2) / 2)   # |e|>2: 2|e| - 2


def test_bce_and_ce_by_hand():
    logits = torch.tensor([0.0, 2.0, -1.0])
    y = torch.tensor([1, 0, 0])
    per = [math.log(2), math.log(1 + math.e ** 2), math.log(1 + math.e ** -1)]
    value, _ = loss("bce", "binary")(logits, y)
    assert value.item() == pytest.approx(sum(per) / 3, rel=1e-6)
    w = torch.tensor([1.0, 0.0, 2.0])
    value, _ = loss("bce", "binary", weighted=True)(logits, y, w)
    assert value.item() == pytest.approx((per[0] + 2 * per[2]) / 3, rel=1e-6)
    out = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    ce = [-math.log(math.e / (math.e + 2)), math.log(3)]
    value, _ = loss("ce", "multiclass")(out, y)
    assert value.item() == pytest.approx(sum(ce) / 2, rel=1e-6)
    value, _ = loss("ce", "multiclass", weighted=True)(out, y, torch.tensor([0.5, 1.5]))
    assert value.item() == pytest.approx((0.5 * ce[0] + 1.5 * ce[1]) / 2, rel=1e-6)


def test_weighted_loss_without_weights_names_the_setting():
    with pytest.raises(DataError, match="loss.weighted"):
        loss("bce", "binary", weighted=True)(torch.zeros(2), torch.zeros(2, dtype=torch.int64))


def test_roc_auc_by_hand_with_ties():
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    # one tie between a positive and a negative counts one half: pairs (p,n): 2x2 = 4, wins 3.5
    assert roc_auc(torch.tensor([0.2, 0.5, 0.5, 0.9]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.875)
    assert math.isnan(roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))


@pytest.mark.parametrize("rows", [2, 7, 341, 20_000])
def test_rank_sums_of_numpy_on_the_cpu_equal_those_of_torch_on_a_device_exactly(rows):
    # roc_auc sums ranks with numpy for CPU scores and with torch ops elsewhere (a GPU's
    # epoch); rounded scores make many ties, where average ranks matter.
    g = torch.Generator().manual_seed(rows)
    scores = torch.randn(rows, generator=g, dtype=torch.float64).round(decimals=1)
    positive = torch.rand(rows, generator=g) > 0.3
    assert losses_module._positive_rank_sum_host(scores, positive) == losses_module._positive_rank_sum(scores, positive)
    assert losses_module._positive_rank_sum_host(scores, positive) > 0 or not positive.any()


def test_metric_sums_binary_over_batches():
    sums = MetricSums("binary")
    lf = loss("bce", "binary")
    batches = [(torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1, 1, 0])),
               (torch.tensor([-3.0, 1.0]), torch.tensor([0, 1]))]
    for out, y in batches:
        value, den = lf(out, y)
        sums.add(out, y, value, den)
    m = sums.compute(BACKEND, "val")
    all_out = torch.cat([b[0] for b in batches])
    all_y = torch.cat([b[1] for b in batches])
    assert m["val_loss"] == pytest.approx(lf(all_out, all_y)[0].item(), rel=1e-6)
    assert m["val_accuracy"] == pytest.approx(3 / 5)            # 2>0 y1 ok, -1 y1 no, .5 y0 no, -3 ok, 1 ok
    assert m["val_auc"] == pytest.approx(roc_auc(all_out, all_y))
    # positives 2.0, -1.0, 1.0; negatives 0.5, -3.0: wins 2+1+... = (2:2) (-1:1) (1:2) = 5 of 6
    assert m["val_auc"] == pytest.approx(5 / 6)


def test_metric_sums_multiclass_and_regression():
    sums = MetricSums("multiclass")
    out, y = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([0, 1, 2])
    sums.add(out, y, *loss("ce", "multiclass")(out, y))
    assert sums.compute(BACKEND, "train")["train_accuracy"] == pytest.approx(2 / 3)
    sums = MetricSums("regression")
    out, y = torch.tensor([[1.0, 2.0], [3.0, 3.0]]), torch.tensor([[0.0, 2.0], [1.0, 4.0]])
    sums.add(out, y, *loss("mse", "regression")(out, y))
    m = sums.compute(BACKEND, "test")
    assert m["test_rmse"] == pytest.approx(math.sqrt((1 + 0 + 4 + 1) / 4))
    assert m["test_mae"] == pytest.approx((1 + 0 + 2 + 1) / 4)
    assert m["test_loss"] == pytest.approx(6 / 4)


def test_metric_sums_state_round_trip():
    a, b = MetricSums("binary"), MetricSums("binary")
    out, y = torch.tensor([0.3, -0.2, 1.0]), torch.tensor([1, 0, 0])
    a.add(out, y, *loss("bce", "binary")(out, y))
    b.load_state_dict(a.state_dict())
    assert a.compute(BACKEND, "x") == b.compute(BACKEND, "x")


def test_monitor_mode_and_checks():
    assert monitor_mode("val_auc") == "max" and monitor_mode("val_rmse") == "min"
    assert monitor_mode("val_loss", "max") == "max"
    with pytest.raises(ConfigError, match="train.monitor: 'val_auc' is not a metric of task 'regression'"):
        check_monitor("val_auc", "regression", has_val=True)
    with pytest.raises(ConfigError, match="needs a validation split"):
        check_monitor("val_loss", "binary", has_val=False)
