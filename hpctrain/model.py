"""The model of a run: the MLP builder (widths, activation, initialisation, norm, dropout, output
head by task), or the user's own module (user_model.py)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .config import ModelConfig

RELU_FAMILY = ("relu", "leaky_relu", "elu", "gelu", "silu", "swish")


def make_activation(name: str, leaky_slope: float = 0.01) -> nn.Module:
    table = {
        "relu": nn.ReLU, "elu": nn.ELU, "selu": nn.SELU, "gelu": nn.GELU, "silu": nn.SiLU,
        "swish": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "linear": nn.Identity,
    }
    if name == "leaky_relu":
        return nn.LeakyReLU(leaky_slope)
    return table[name]()


def resolve_init(init: str, activation: str) -> str:
    """``auto`` -> He for the ReLU family, LeCun for SELU, Glorot for tanh/sigmoid/linear."""
    if init != "auto":
        return init
    if activation in RELU_FAMILY:
        return "he"
    if activation == "selu":
        return "lecun"
    return "glorot"


class BoundedOutput(nn.Module):
    """Sigmoid scaled into [low, high]: a regression head whose targets live in a known range."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = float(low), float(high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low + (self.high - self.low) * torch.sigmoid(x)


class MLP(nn.Module):
    """Hidden blocks (Linear -> [BatchNorm] -> activation -> [dropout]) and a linear head."""

    def __init__(self, n_features: int, n_outputs: int, cfg: ModelConfig, task: str):
        super().__init__()
        self.task = task
        self.init_scheme = resolve_init(cfg.init, cfg.activation)
        layers: list[nn.Module] = []
        width = n_features
        for hidden in cfg.hidden:
            layers.append(nn.Linear(width, hidden, bias=True))
            if cfg.norm == "batch":
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(make_activation(cfg.activation, cfg.leaky_slope))
            if cfg.dropout > 0:
                # Plain dropout breaks SELU's self-normalisation; alpha-dropout keeps it.
                layers.append(nn.AlphaDropout(cfg.dropout) if cfg.activation == "selu" else nn.Dropout(cfg.dropout))
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_outputs, bias=True)
        self.output = self._output_activation(cfg, task)
        init_weights(self, self.init_scheme, cfg.activation, cfg.leaky_slope)

    @staticmethod
    def _output_activation(cfg: ModelConfig, task: str) -> nn.Module:
        if task != "regression" or cfg.output == "none":
            return nn.Identity()
        if cfg.output == "positive":
            return nn.Softplus()
        return BoundedOutput(*cfg.output_bounds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.body(x))
        if not isinstance(self.output, nn.Identity):  # a module call costs microseconds a step
            out = self.output(out)
        return out.squeeze(-1) if self.task == "binary" else out

    def linear_layers(self) -> list[nn.Linear]:
        return [m for m in self.modules() if isinstance(m, nn.Linear)]


def output_size(task: str, n_classes: int = 2, n_targets: int = 1) -> int:
    if task == "binary":
        return 1
    if task == "multiclass":
        return n_classes
    return n_targets


def init_weights(model: MLP, scheme: str, activation: str, leaky_slope: float = 0.01) -> None:
    """He / Glorot / LeCun for the weights, zeros for the biases. LSUV starts from Glorot-orthogonal
    and is finished by :func:`lsuv_init` once a batch of data is at hand."""
    hidden_layers = [m for m in model.body if isinstance(m, nn.Linear)]
    for layer in hidden_layers + [model.head]:
        is_head = layer is model.head
        w = layer.weight
        if scheme == "he":
            nonlin = "leaky_relu" if activation == "leaky_relu" else "relu"
            if is_head:
                nn.init.xavier_uniform_(w)
            else:
                nn.init.kaiming_normal_(w, a=leaky_slope if activation == "leaky_relu" else 0.0,
                                        nonlinearity=nonlin)
        elif scheme == "glorot":
            nn.init.xavier_uniform_(w)
        elif scheme == "lecun":
            nn.init.normal_(w, 0.0, 1.0 / math.sqrt(w.shape[1]))
        elif scheme == "lsuv":
            nn.init.orthogonal_(w)
        else:
            raise ValueError(f"unknown init scheme {scheme!r}")
        nn.init.zeros_(layer.bias)


@torch.no_grad()
def lsuv_init(model: MLP, batch: torch.Tensor, tol: float = 0.05, max_iter: int = 10) -> list[float]:
    """Layer-sequential unit-variance init (Mishkin & Matas): rescale each hidden layer's
    weights until its output has unit variance on ``batch``. Returns the final variances."""
    was_training = model.training
    model.eval()
    variances = []
    for layer in [m for m in model.body if isinstance(m, nn.Linear)]:
        captured: dict[str, torch.Tensor] = {}
        hook = layer.register_forward_hook(lambda _m, _i, out: captured.__setitem__("out", out))
        try:
            for _ in range(max_iter):
                model(batch)
                var = float(captured["out"].var())
                if var <= 1e-12 or abs(var - 1.0) < tol:
                    break
                layer.weight.div_(math.sqrt(var))
        finally:
            hook.remove()
        variances.append(var)
    model.train(was_training)
    return variances


def build_model(cfg: ModelConfig, task: str, n_features: int, n_classes: int = 2, n_targets: int = 1,
                lsuv_batch: Optional[torch.Tensor] = None,
                feature_shape: Optional[Sequence[int]] = None) -> nn.Module:
    """The model for a task: the user's ``model.target`` when set (it sees the rows in
    ``feature_shape``), else the MLP; LSUV needs ``lsuv_batch`` (a first batch of standardised inputs)."""
    n_outputs = output_size(task, n_classes, n_targets)
    if cfg.target:
        from .user_model import build_user_model
        return build_user_model(cfg.target, cfg.options, task, feature_shape or (n_features,), n_outputs)
    model = MLP(n_features, n_outputs, cfg, task)
    if model.init_scheme == "lsuv":
        if lsuv_batch is None:
            raise ValueError("model.init: lsuv needs a first batch of data to rescale the layers")
        lsuv_init(model, lsuv_batch)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
