"""Sampled sweep points: the ``search:`` section beside ``grid:``.

    search:
      kind: random          # grid (default): each `choice` list is one more grid axis
      samples: 27           # random: points drawn, crossed with the grid's axes
      seed: 0
      optim.lr: {loguniform: [1e-5, 1e-1]}
      model.dropout: {uniform: [0.0, 0.5]}
      model.hidden: {choice: [[64], [128, 128]]}
      optim.weight_decay: {choice: [0.0, 1e-4]}
      train.epochs: {int: [5, 20]}

Points are drawn when the config is read, from ``seed`` alone, so the same config gives the
same points, in the same order, on every submit, resubmit, dry run and element: run ids
stay stable. A random search is one zip axis of ``samples`` points (the keys advance
together), so it mixes with grid keys like any grid axis. Floats keep 6 significant digits,
so a run's label shows its value exactly.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import ConfigError

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
SETTINGS = ("kind", "samples", "seed")
KINDS = ("grid", "random")


def search_axes(search: Any, source: str) -> list[list[tuple[str, list]]]:
    """The axes the search adds to the grid's (sweep.py's Axis: a group of (key, values))."""
    if not search:
        return []
    if not isinstance(search, dict):
        raise ConfigError(f"{source}: search: expected a mapping (kind, samples, seed and dotted keys)")
    kind = search.get("kind", "grid")
    if kind not in KINDS:
        raise ConfigError(f"{source}: search.kind: {kind!r} is not allowed; expected one of {', '.join(KINDS)}")
    space = {k: _distribution(k, v, source) for k, v in search.items() if k not in SETTINGS}
    if not space:
        raise ConfigError(f"{source}: search: no keys to search; add e.g. optim.lr: {{loguniform: [1e-5, 1e-1]}}")
    if kind == "grid":
        return [[(key, _grid_choices(key, dist, source))] for key, dist in space.items()]
    samples = _count(search.get("samples"), "search.samples", source)
    seed = _count(search.get("seed", 0), "search.seed", source, minimum=0)
    rng = np.random.default_rng(seed)
    columns: dict[str, list] = {key: [] for key in space}
    for _ in range(samples):
        for key, (name, arg) in space.items():
            columns[key].append(_draw(rng, name, arg))
    return [[(key, values) for key, values in columns.items()]]


def keys(search: Any) -> list[str]:
    """The dotted keys a search section samples, in its order."""
    if not isinstance(search, dict):
        return []
    return [k for k in search if k not in SETTINGS and isinstance(k, str)]


def _count(value: Any, where: str, source: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{source}: {where}: {value!r}; expected an integer >= {minimum}")
    return value


def _distribution(key: Any, value: Any, source: str) -> tuple[str, Any]:
    where = f"{source}: search.{key}"
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: {value!r}; expected one distribution: "
                          "{loguniform: [low, high]}, {uniform: [low, high]}, {int: [low, high]} or "
                          "{choice: [a, b, ...]}")
    name, arg = next(iter(value.items()))
    if name == "choice":
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"{where}: choice: expected a non-empty list of values, got {arg!r}")
        return name, arg
    if (not isinstance(arg, list) or len(arg) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arg)):
        raise ConfigError(f"{where}: {name}: expected [low, high], got {arg!r}")
    low, high = arg
    if not low < high:
        raise ConfigError(f"{where}: {name}: low {low} must be below high {high}")
    if name == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform: low {low} must be > 0")
    if name == "int" and not all(isinstance(v, int) for v in arg):
        raise ConfigError(f"{where}: int: expected integer bounds, got {arg!r}")
    return name, (low, high)


def _grid_choices(key: str, dist: tuple[str, Any], source: str) -> list:
    name, arg = dist
    if name != "choice":
        raise ConfigError(f"{source}: search.{key}: a {name} distribution needs search.kind: random "
                          "(kind grid takes choice lists only)")
    return arg


def _draw(rng: np.random.Generator, name: str, arg: Any) -> Any:
    if name == "choice":
        return arg[int(rng.integers(len(arg)))]
    low, high = arg
    if name == "int":
        return int(rng.integers(low, high + 1))
    if name == "loguniform":
        return _significant(math.exp(rng.uniform(math.log(low), math.log(high))))
    return _significant(rng.uniform(low, high))


def _significant(value: float, digits: int = 6) -> float:
    return float(f"{value:.{digits}g}")
