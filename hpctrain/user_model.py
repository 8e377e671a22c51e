"""A model of the user's own: ``model.target: "package.module:build"`` (or "path/file.py:build").

The function is called as ``build(feature_shape=(C, H, W), n_outputs=K, task=TASK,
**model.options)`` and returns any ``torch.nn.Module``. It sees features in their shape
(meta.json's ``feature_shape``, e.g. 1x8x8 images) although shards store each row flat:
``Shaped`` unflattens the batch in front of it, so the loader, the standardisation and
load_best stay the same for every model. For ``binary`` the module may return [n] or [n, 1]
logits; the trainer gets [n], as from the built-in MLP.

A module path is imported with the working folder on sys.path, as ``python -m`` has it, so
a user's package next to the config (submit and the jobs run from that folder) is found.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from .errors import ConfigError


class Shaped(nn.Module):
    """Flat rows -> ``feature_shape`` -> the user's module; binary logits squeezed to [n]."""

    def __init__(self, module: nn.Module, feature_shape: Sequence[int], task: str):
        super().__init__()
        self.module = module
        self.feature_shape = tuple(int(d) for d in feature_shape)
        self.squeeze = task == "binary"

    def forward(self, x):
        out = self.module(x.reshape(x.shape[0], *self.feature_shape))
        return out.reshape(out.shape[0]) if self.squeeze and out.dim() == 2 and out.shape[1] == 1 else out


def load_target(target: str) -> Callable[..., Any]:
    """The callable ``target`` names ("pkg.mod:fn" or "path/to/file.py:fn")."""
    where, sep, name = target.partition(":")
    if not sep or not where or not name.isidentifier():
        raise ConfigError(f"model.target: {target!r}: expected \"package.module:function\" or "
                          "\"path/to/file.py:function\"")
    module = _import_file(where, target) if where.endswith(".py") else _import_module(where, target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"model.target: {target!r}: {where} has no function {name!r}")
    return fn


def _import_module(dotted: str, target: str):
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(dotted)
    except ImportError as e:
        raise ConfigError(f"model.target: {target!r}: cannot import {dotted} ({e}); the module must be "
                          f"importable from {os.getcwd()} or on PYTHONPATH") from None


def _import_file(path: str, target: str):
    file = Path(path).resolve()
    if not file.is_file():
        raise ConfigError(f"model.target: {target!r}: {file} does not exist")
    spec = importlib.util.spec_from_file_location(f"hpctrain_user_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_user_model(target: str, options: dict, task: str, feature_shape: Sequence[int], n_outputs: int) -> nn.Module:
    fn = load_target(target)
    shape = tuple(int(d) for d in feature_shape)
    kwargs = dict(options or {})
    _check_signature(fn, target, kwargs)
    module = fn(feature_shape=shape, n_outputs=n_outputs, task=task, **kwargs)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model.target: {target!r} returned {type(module).__name__}; expected a torch.nn.Module")
    return Shaped(module, shape, task)


def _check_signature(fn: Callable, target: str, kwargs: dict) -> None:
    try:
        inspect.signature(fn).bind(feature_shape=(), n_outputs=1, task="", **kwargs)
    except TypeError as e:
        raise ConfigError(f"model.target: {target!r} cannot be called as build(feature_shape=..., n_outputs=..., "
                          f"task=..., **model.options): {e}") from None
    except ValueError:
        pass  # no signature to read (a builtin): the call itself will say
