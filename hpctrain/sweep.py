"""Grid expansion, stable run ids, the sweep folder and per-run state.

A sweep folder looks like::

    sweeps/<name>/
      sweep.yaml            the config as given (grid included), after overrides
      grid.jsonl            one line per grid point: index, run_id, params
      runs/<run_id>/
        config.yaml         the resolved config of this point (no grid)
        state.json          status, epoch, best metric, message (runstate.RunRecorder)
        metrics.csv         one row per epoch (written by the trainer)
        checkpoints/        last.pt, best.pt
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from .config import (Config, ConfigError, build_config, dump_yaml, leaf_spec, load_raw,
                     base_dict, set_dotted)
from .fsutil import atomic_write_text
from .runstate import RunRecorder, RunState, read_state


# --------------------------------------------------------------------------- grid


@dataclass
class RunSpec:
    """One grid point: its index in the sweep, its stable id, its params and config."""
    index: int
    run_id: str
    params: dict[str, Any]
    config: Config

    def record(self) -> dict:
        return {"index": self.index, "run_id": self.run_id, "params": self.params}


def _grid_axes(grid: dict, source: str) -> list[list[tuple[str, list]]]:
    """Grid mapping -> list of axes; an axis is a group of (key, values) that advance together."""
    if not isinstance(grid, dict):
        raise ConfigError(f"{source}: grid: expected a mapping of dotted keys to lists of values")
    axes: list[list[tuple[str, list]]] = []
    for key, values in grid.items():
        if key == "zip":
            groups = values if isinstance(values, list) else [values]
            for gi, group in enumerate(groups):
                axes.append(_zip_group(group, f"grid.zip[{gi}]", source))
            continue
        axes.append([_grid_values(key, values, f"grid.{key}", source)])
    return axes


def _zip_group(group: Any, where: str, source: str) -> list[tuple[str, list]]:
    if not isinstance(group, dict) or not group:
        raise ConfigError(f"{source}: {where}: expected a mapping of dotted keys to lists "
                          "of equal length (the lists advance together)")
    members = [_grid_values(k, v, f"{where}.{k}", source) for k, v in group.items()]
    lengths = {k: len(v) for k, v in members}
    if len(set(lengths.values())) != 1:
        raise ConfigError(f"{source}: {where}: the lists of a zip group must have equal lengths, got "
                          + ", ".join(f"{k}: {n}" for k, n in lengths.items()))
    return members


def _grid_values(key: Any, values: Any, where: str, source: str) -> tuple[str, list]:
    if not isinstance(key, str):
        raise ConfigError(f"{source}: {where}: grid keys must be dotted config keys such as optim.lr")
    try:
        leaf_spec(key)
    except ConfigError as e:
        raise ConfigError(f"{source}: grid: {e}") from None
    if key.split(".")[0] in ("name", "slurm", "dist"):
        raise ConfigError(f"{source}: {where}: {key} cannot be swept; one sweep shares its name and resources")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{source}: {where}: expected a non-empty list of values, got {values!r}")
    return key, values


def expand_grid(raw: dict, source: str = "<config>") -> list[dict[str, Any]]:
    """Cartesian product over the axes, in the order the grid lists them (last varies fastest)."""
    axes = _grid_axes(raw.get("grid") or {}, source)
    seen: set[str] = set()
    for axis in axes:
        for key, _ in axis:
            if key in seen:
                raise ConfigError(f"{source}: grid: {key} appears more than once")
            seen.add(key)
    points = []
    for combo in itertools.product(*[range(len(axis[0][1])) for axis in axes]):
        params: dict[str, Any] = {}
        for axis, i in zip(axes, combo):
            for key, values in axis:
                params[key] = copy.deepcopy(values[i])
        points.append(params)
    return points


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "x".join(_format_value(v) for v in value) or "none"
    return str(value)


def run_id_for(params: dict[str, Any], resolved: dict) -> str:
    """Readable part from the grid params + 8 hex digits of the resolved config's hash."""
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:8]
    parts = [f"{key.split('.')[-1]}{_format_value(v)}" for key, v in params.items()]
    readable = re.sub(r"[^A-Za-z0-9.+=-]+", "-", "_".join(parts)).strip("-")[:60]
    return f"{readable}_{digest}" if readable else digest


def _identity(cfg: Config) -> dict:
    """The part of a resolved config that defines a run (not where or how it is scheduled)."""
    d = base_dict(cfg)
    for key in ("name", "slurm"):
        d.pop(key)
    d["dist"] = {"backend": d["dist"]["backend"]}
    return d


def expand(raw: dict, source: str = "<config>") -> list[RunSpec]:
    """Validate a raw config and every grid point of it; return the RunSpecs in grid order."""
    build_config(raw, source)  # the base point, so errors outside the grid are named plainly
    base = {k: v for k, v in raw.items() if k != "grid"}
    specs: list[RunSpec] = []
    for index, params in enumerate(expand_grid(raw, source)):
        point = copy.deepcopy(base)
        for key, value in params.items():
            set_dotted(point, key, value)
        try:
            cfg = build_config(point, source)
        except ConfigError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise ConfigError(f"{e} (in grid point {index}: {shown})") from None
        specs.append(RunSpec(index, run_id_for(params, _identity(cfg)), params, cfg))
    ids = [s.run_id for s in specs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{source}: grid: two grid points resolve to the same config; remove the duplicate values")
    return specs


def load_sweep(path: str | Path, overrides: list[str] = ()) -> tuple[dict, list[RunSpec]]:
    """Read, override and validate a config file; return (raw config, run specs)."""
    raw = load_raw(path, overrides)
    return raw, expand(raw, str(path))


# --------------------------------------------------------------------------- sweep folder


def default_sweep_dir(cfg: Config) -> Path:
    return Path("sweeps") / cfg.name


class SweepDir:
    """Paths and records of one sweep folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "sweep.yaml"

    @property
    def grid_path(self) -> Path:
        return self.root / "grid.jsonl"

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def write(self, raw: dict, specs: list[RunSpec]) -> None:
        """Write sweep.yaml, grid.jsonl and each run's config.yaml; never touches run results.

        A folder that already holds a different sweep is refused rather than overwritten:
        its grid.jsonl indexes runs that would otherwise disappear from status and collect.
        """
        text = dump_yaml(raw)
        if self.config_path.exists() and self.config_path.read_text(encoding="utf-8") != text:
            raise ConfigError(
                f"{self.root} already holds a different sweep (its sweep.yaml differs from this config "
                "and its overrides); choose another folder with --sweep-dir or another name with name=...")
        atomic_write_text(self.config_path, text)
        atomic_write_text(self.grid_path, "".join(json.dumps(s.record(), sort_keys=True) + "\n" for s in specs))
        for s in specs:
            self.prepare_run(s)

    def prepare_run(self, spec: RunSpec) -> Path:
        run_dir = self.run_dir(spec.run_id)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        config_path = run_dir / "config.yaml"
        if not config_path.exists():
            # The run id is a hash of this config, so an existing file already holds it.
            atomic_write_text(config_path, dump_yaml(base_dict(spec.config)), durable=False)
        self.recorder(spec).pending(spec.config.train.epochs)
        return run_dir

    def recorder(self, spec: RunSpec) -> RunRecorder:
        """The writer of this run's state.json."""
        return RunRecorder(self.run_dir(spec.run_id), index=spec.index, run_id=spec.run_id, params=spec.params)

    def records(self) -> list[dict]:
        """The grid.jsonl records, in index order."""
        try:
            lines = self.grid_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise ConfigError(f"{self.grid_path}: not found; is {self.root} a sweep folder?") from None
        return [json.loads(line) for line in lines if line.strip()]


# --------------------------------------------------------------------------- runs


def iter_runs(sweep: SweepDir) -> Iterator[tuple[dict, Optional[RunState]]]:
    for rec in sweep.records():
        yield rec, read_state(sweep.run_dir(rec["run_id"]))
