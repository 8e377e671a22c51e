"""A checkpoint back into a model that takes raw (unstandardised) inputs."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..config import build_config
from ..errors import HpctrainError
from ..model import build_model


class StandardizedModel(nn.Module):
    """The trained MLP behind the input standardisation it was trained with.

    ``forward(x)`` takes raw features [n, F] (a tensor or anything ``torch.as_tensor``
    takes), standardises them with the training split's mean/std when the run did
    (``model_meta.standardize``), and returns what the MLP returns: logits [n] for
    binary, logits [n, C] for multiclass, predictions [n, K] for regression.
    ``predict_proba`` and ``predict`` turn logits into probabilities and labels.
    """

    def __init__(self, model: nn.Module, task: str, mean: Any, std: Any, standardize: bool = True,
                 info: Optional[dict] = None):
        super().__init__()
        self.model = model
        self.task = task
        self.standardize = bool(standardize)
        n = len(mean) if mean is not None else len(std) if std is not None else 0
        mean64 = np.zeros(n) if mean is None else np.asarray(mean, dtype=np.float64).reshape(-1)
        std64 = np.ones(n) if std is None else np.asarray(std, dtype=np.float64).reshape(-1)
        # The loader's arithmetic exactly (data/shards.standardization, data/loader.py):
        # a zero or non-finite std counts as 1; x * (1/std) + (-mean/std) in float32.
        std64 = np.where((std64 > 0) & np.isfinite(std64), std64, 1.0)
        mean32, factor = mean64.astype(np.float32), (1.0 / std64).astype(np.float32)
        self.register_buffer("mean", torch.from_numpy(mean32))
        self.register_buffer("factor", torch.from_numpy(factor))
        self.register_buffer("shift", torch.from_numpy(-mean32 * factor))
        self.info = dict(info or {})

    def forward(self, x: Any) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32, device=self.mean.device)
        x = x.reshape(x.shape[0], -1)  # rows in any shape (images too): flat as the shards hold them
        if self.standardize:
            x = torch.addcmul(self.shift, x, self.factor)
        return self.model(x)

    @torch.no_grad()
    def predict_proba(self, x: Any) -> torch.Tensor:
        """Binary: P(class 1) [n]; multiclass: class probabilities [n, C]."""
        out = self(x)
        if self.task == "binary":
            return torch.sigmoid(out)
        if self.task == "multiclass":
            return torch.softmax(out, dim=-1)
        raise HpctrainError("predict_proba: a regression model has no class probabilities; call predict")

    @torch.no_grad()
    def predict(self, x: Any) -> torch.Tensor:
        """Binary: 0/1 labels [n]; multiclass: class indices [n]; regression: predictions."""
        out = self(x)
        if self.task == "binary":
            return (out > 0).long()
        if self.task == "multiclass":
            return out.argmax(dim=-1)
        return out


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu",
                          info: Optional[dict] = None) -> StandardizedModel:
    """Build the model a checkpoint describes, load its weights, return it in eval mode."""
    from ..train.checkpoint import load_checkpoint  # checks the format and the content digest

    path = Path(path)
    ckpt = load_checkpoint(path, map_location=device)
    for key in ("model", "config", "model_meta"):
        if not isinstance(ckpt, dict) or key not in ckpt:
            raise HpctrainError(f"{path}: checkpoint has no {key!r} entry; expected a checkpoint "
                                "written by the hpctrain trainer")
    cfg = build_config(ckpt["config"], source=f"{path} (config)")
    meta = ckpt["model_meta"]
    try:
        task = meta["task"]
        mlp = build_model(cfg.model, task, int(meta["n_features"]), int(meta.get("n_classes") or 2),
                          int(meta.get("n_targets") or 1), feature_shape=meta.get("feature_shape"))
        mlp.load_state_dict(ckpt["model"])  # weights come from the checkpoint
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise HpctrainError(f"{path}: model_meta/model do not fit the config ({str(e).splitlines()[0][:200]})") from None
    model = StandardizedModel(mlp, task, meta.get("mean"), meta.get("std"),
                              bool(meta.get("standardize", True)), info)
    return model.to(device).eval()
