"""The MLP builder: layers, activations, initialisation, heads."""
import math

import pytest
import torch
from torch import nn

from hpctrain.config import ModelConfig
from hpctrain.model import BoundedOutput, build_model, count_parameters, resolve_init


def mc(**kw):
    return ModelConfig(**kw)


def test_shapes_per_task():
    x = torch.randn(8, 5)
    assert build_model(mc(hidden=[16]), "binary", 5)(x).shape == (8,)
    assert build_model(mc(hidden=[16]), "multiclass", 5, n_classes=4)(x).shape == (8, 4)
    assert build_model(mc(hidden=[16]), "regression", 5, n_targets=3)(x).shape == (8, 3)


def test_layer_structure_and_biases_everywhere():
    m = build_model(mc(hidden=[32, 16], norm="batch", dropout=0.2), "binary", 10)
    kinds = [type(l).__name__ for l in m.body]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear", "BatchNorm1d", "ReLU", "Dropout"]
    assert all(l.bias is not None for l in m.linear_layers())
    assert count_parameters(m) == (10 * 32 + 32) + 2 * 32 + (32 * 16 + 16) + 2 * 16 + (16 + 1)


def test_selu_uses_alpha_dropout_and_lecun():
    m = build_model(mc(hidden=[64], activation="selu", dropout=0.1), "binary", 8)
    assert any(isinstance(l, nn.AlphaDropout) for l in m.body)
    assert m.init_scheme == "lecun"


@pytest.mark.parametrize("activation, expected", [
    ("relu", "he"), ("leaky_relu", "he"), ("elu", "he"), ("gelu", "he"), ("silu", "he"), ("swish", "he"),
    ("selu", "lecun"), ("tanh", "glorot"), ("sigmoid", "glorot"), ("linear", "glorot")])
def test_auto_init_by_activation(activation, expected):
    assert resolve_init("auto", activation) == expected
    assert resolve_init("glorot", activation) == "glorot"


@pytest.mark.parametrize("init, fan_var", [
    ("he", lambda fin, fout: 2.0 / fin),
    ("lecun", lambda fin, fout: 1.0 / fin),
    ("glorot", lambda fin, fout: 2.0 / (fin + fout)),
])
def test_init_weight_variance(init, fan_var):
    torch.manual_seed(0)
    m = build_model(mc(hidden=[512, 512], init=init), "binary", 512)
    w = m.body[2].weight.detach()  # second hidden layer, 512 -> 512
    assert float(w.var()) == pytest.approx(fan_var(512, 512), rel=0.1)
    assert torch.all(m.body[2].bias == 0)


def test_lsuv_gives_unit_variance_and_needs_a_batch():
    torch.manual_seed(0)
    batch = torch.randn(512, 20)
    with pytest.raises(ValueError, match="lsuv needs a first batch"):
        build_model(mc(hidden=[64, 64], init="lsuv", activation="tanh"), "binary", 20)
    m = build_model(mc(hidden=[64, 64], init="lsuv", activation="tanh"), "binary", 20, lsuv_batch=batch)
    captured = []
    hooks = [l.register_forward_hook(lambda _m, _i, o: captured.append(float(o.detach().var()))) for l in m.body
             if isinstance(l, nn.Linear)]
    m(batch)
    for h in hooks:
        h.remove()
    assert all(abs(v - 1.0) < 0.06 for v in captured)


def test_regression_output_activations():
    x = torch.randn(64, 4) * 3
    pos = build_model(mc(hidden=[8], output="positive"), "regression", 4)
    assert torch.all(pos(x) > 0)
    bounded = build_model(mc(hidden=[8], output="bounded", output_bounds=[-2.0, 3.0]), "regression", 4)
    y = bounded(x)
    assert torch.all(y > -2.0) and torch.all(y < 3.0)
    assert isinstance(bounded.output, BoundedOutput)
    # classification heads stay raw logits whatever model.output says
    assert isinstance(build_model(mc(hidden=[8]), "binary", 4).output, nn.Identity)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu", "selu", "gelu", "silu", "swish",
                                        "tanh", "sigmoid", "linear"])
def test_every_activation_trains_one_step(activation):
    torch.manual_seed(0)
    m = build_model(mc(hidden=[16], activation=activation), "binary", 4)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,)).float()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = nn.functional.binary_cross_entropy_with_logits(m(x), y)
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(m(x), y)
        loss.backward()
        opt.step()
    assert math.isfinite(loss.item()) and loss.item() < before.item()
