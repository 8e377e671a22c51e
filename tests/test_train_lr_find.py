"""LR range test on a problem whose critical learning rate is known."""
from __future__ import annotations

import torch

from hpctrain.config import LossConfig, OptimConfig
from hpctrain.data.memory import TensorLoader
from hpctrain.dist.backends import NoneBackend
from hpctrain.train.losses import build_loss
from hpctrain.train.lr_find import lr_range_test


def test_suggestion_on_linear_regression(tmp_path):
    # MSE on standardised independent features: the Hessian is about 2 I, so plain SGD
    # diverges above lr ~ 1. The suggestion must lie below that, and still learn.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 8, generator=g)
    y = (x @ torch.randn(8, generator=g)).unsqueeze(1) + 0.1 * torch.randn(4096, 1, generator=g)
    loader = TensorLoader(x, y, batch_size=256, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = build_loss(LossConfig(name="mse"), "regression")
    result = lr_range_test(model, loss_fn, loader, NoneBackend(device_preference="cpu"),
                           OptimConfig(name="sgd", momentum=0.0), start_lr=1e-4, end_lr=100.0, steps=120,
                           smoothing=0.9)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)   # a copy was trained
    assert result.blowup_lr is not None and 0.8 < result.blowup_lr < 10
    assert result.suggestion == result.blowup_lr / 10
    assert 0.05 < result.suggestion < 1.0
    assert len(result.lrs) < 120 and result.lrs == sorted(result.lrs)
    assert "suggested learning rate" in result.summary() and "smoothed" in result.table()
    result.plot(tmp_path / "lr.png")
    result.write_csv(tmp_path / "lr.csv")
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
