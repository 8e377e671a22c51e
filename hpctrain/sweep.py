"""Grid expansion, stable run ids, the sweep folder and per-run state.

A sweep folder looks like::

    sweeps/<name>/
      sweep.yaml            the config as given (grid included), after overrides
      grid.jsonl            one line per grid point: index, run_id, params
      runs/<run_id>/        made when the run is submitted or first starts; until then the
                            grid point is pending (status and collect say so)
        config.yaml         the resolved config of this point (no grid)
        state.json          status, epoch, best metric, message (runstate.RunRecorder)
        metrics.csv         one row per epoch (written by the trainer)
        checkpoints/        last.pt, best.pt

Expanding a grid validates the base config once and each grid value once, on its own;
a point's own config is built only when something asks for it. Grids of 100,000 points
are expanded in seconds, and the run ids are the ones a full build of each point gives.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import operator
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .config import (CROSS_FIELD_KEYS, SWEEP_SECTIONS, Config, ConfigError, base_dict, build_config, build_value,
                     dump_yaml, leaf_spec, load_raw, section_defaults, set_dotted)
from .fsutil import atomic_write_text
from .runstate import RunRecorder, RunState, read_state
from .search import search_axes

Axis = list[tuple[str, list]]  # keys that advance together, each with its list of values


# --------------------------------------------------------------------------- grid


class RunSpec:
    """One grid point: its index in the sweep, its stable id, its params and config.

    The config is built the first time it is asked for (``build(params)``): a large sweep
    needs every point's id, but seldom more than a few points' configs.
    """
    __slots__ = ("index", "run_id", "params", "_config", "_build")

    def __init__(self, index: int, run_id: str, params: dict[str, Any], config: Optional[Config] = None,
                 build: Optional[Callable[[dict], Config]] = None):
        if config is None and build is None:
            raise ValueError("a RunSpec needs its config or a way to build it")
        self.index, self.run_id, self.params = index, run_id, params
        self._config, self._build = config, build

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = self._build(self.params)
        return self._config

    def record(self) -> dict:
        return {"index": self.index, "run_id": self.run_id, "params": self.params}

    def __repr__(self) -> str:
        return f"RunSpec(index={self.index}, run_id={self.run_id!r}, params={self.params!r})"


def _grid_axes(grid: dict, source: str) -> list[Axis]:
    """Grid mapping -> list of axes; an axis is a group of (key, values) that advance together."""
    if not isinstance(grid, dict):
        raise ConfigError(f"{source}: grid: expected a mapping of dotted keys to lists of values")
    axes: list[Axis] = []
    for key, values in grid.items():
        if key == "zip":
            groups = values if isinstance(values, list) else [values]
            for gi, group in enumerate(groups):
                axes.append(_zip_group(group, f"grid.zip[{gi}]", source))
            continue
        axes.append([_grid_values(key, values, f"grid.{key}", source)])
    repeated = _repeated_key(axes)
    if repeated:
        raise ConfigError(f"{source}: grid: {repeated} appears more than once")
    return axes


def _repeated_key(axes: list[Axis]) -> Optional[str]:
    seen: set[str] = set()
    for axis in axes:
        for key, _ in axis:
            if key in seen:
                return key
            seen.add(key)
    return None


def _zip_group(group: Any, where: str, source: str) -> Axis:
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


def _combos(axes: list[Axis]) -> Iterator[tuple[int, ...]]:
    """Value indices of every grid point, in grid order (the last axis varies fastest)."""
    return itertools.product(*[range(len(axis[0][1])) for axis in axes])


def _strides(axes: list[Axis]) -> list[int]:
    """How far apart in grid order two points are whose only difference is one step of an axis."""
    strides, step = [], 1
    for axis in reversed(axes):
        strides.append(step)
        step *= len(axis[0][1])
    return strides[::-1]


def _params(axes: list[Axis], combo: tuple[int, ...]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for axis, i in zip(axes, combo):
        for key, values in axis:
            value = values[i]
            params[key] = _own(value) if isinstance(value, (list, dict)) else value
    return params


def _own(value: Any) -> Any:
    """A point's own copy of a grid value: a change to one point's list must not reach another's.
    (YAML values are plain lists, mappings and scalars; copy.deepcopy is several times slower.)"""
    if isinstance(value, list):
        return [_own(v) for v in value]
    if isinstance(value, dict):
        return {k: _own(v) for k, v in value.items()}
    return value


def _combo_at(axes: list[Axis], index: int) -> tuple[int, ...]:
    return tuple((index // stride) % len(axis[0][1]) for axis, stride in zip(axes, _strides(axes)))


def _axes(raw: dict, source: str) -> list[Axis]:
    """The grid's axes, then the search's (search.py); a key may be in only one of them."""
    axes = _grid_axes(raw.get("grid") or {}, source) + search_axes(raw.get("search"), source)
    repeated = _repeated_key(axes)
    if repeated:
        raise ConfigError(f"{source}: {repeated} is both in grid and in search; keep it in one of them")
    return axes


def expand_grid(raw: dict, source: str = "<config>") -> list[dict[str, Any]]:
    """Cartesian product over the axes, in the order the grid lists them (last varies fastest)."""
    axes = _axes(raw, source)
    return [_params(axes, combo) for combo in _combos(axes)]


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "x".join(_format_value(v) for v in value) or "none"
    return str(value)


_NOT_IN_ID = re.compile(r"[^A-Za-z0-9.+=-]+")
# Labels whose only characters not allowed in an id are single "_" between allowed ones
# ("weight_decay0.1"): in them, and between them, the substitution only turns "_" into "-".
_PLAIN_LABEL = re.compile(r"[A-Za-z0-9.+=-]+(?:_[A-Za-z0-9.+=-]+)*")


def _label(key: str, value: Any) -> str:
    return f"{key.split('.')[-1]}{_format_value(value)}"


def _run_id(labels: list[str], resolved_json: str, plain: bool = False) -> str:
    """``plain``: the labels are already what the substitution makes of them (see _PLAIN_LABEL)."""
    digest = hashlib.sha256(resolved_json.encode()).hexdigest()[:8]
    joined = "-".join(labels) if plain else _NOT_IN_ID.sub("-", "_".join(labels))
    readable = joined.strip("-")[:60]
    return f"{readable}_{digest}" if readable else digest


def run_id_for(params: dict[str, Any], resolved: dict) -> str:
    """Readable part from the grid params + 8 hex digits of the resolved config's hash."""
    return _run_id([_label(key, v) for key, v in params.items()], json.dumps(resolved, sort_keys=True))


# Keys added after run ids were first issued, with their defaults: at its default such a key
# is left out of a run's identity, so the ids of existing sweeps stay what they were.
_LATER_KEYS = {"model": {"target": None, "options": {}},
               "data": {"global_batch_size": None, "streams": 8},
               "train": {"tensorboard": True, "metrics": [], "state_every_s": 10.0, "checkpoint_min_interval_s": 2.0}}


def _identity(cfg: Config) -> dict:
    """The part of a resolved config that defines a run (not where or how it is scheduled)."""
    d = base_dict(cfg)
    for key in ("name", "slurm", "prune"):  # how a run is scheduled or cut short, not what it trains
        d.pop(key)
    d["dist"] = {"backend": d["dist"]["backend"]}
    d["data"].pop("loader_threads", None)  # how fast rows are read, not which rows
    for top in _LATER_KEYS:
        d[top] = _without_later_defaults(top, d[top])
    return d


def _without_later_defaults(top: str, section: Any) -> Any:
    later = _LATER_KEYS.get(top)
    if not later or not isinstance(section, dict):
        return section
    return {k: v for k, v in section.items() if k not in later or v != later[k]}


def lineage_key(spec: RunSpec) -> str:
    """What a run is apart from its length: two grid points with the same key are one run
    trained for a different number of epochs (plan.py continues the shorter one)."""
    identity = _identity(spec.config)
    identity["train"] = {k: v for k, v in identity["train"].items() if k != "epochs"}
    params = {k: v for k, v in spec.params.items() if k != "train.epochs"}
    return json.dumps([params, identity], sort_keys=True, default=str)


class _PointBuilder:
    """A grid point's Config built the plain way: the base raw config with its params set, all validated."""

    def __init__(self, raw: dict, source: str):
        self.base = copy.deepcopy({k: v for k, v in raw.items() if k not in SWEEP_SECTIONS})
        self.source = source

    def __call__(self, params: dict[str, Any]) -> Config:
        point = copy.deepcopy(self.base)
        for key, value in params.items():
            set_dotted(point, key, value)
        return build_config(point, self.source)

    def checked(self, index: int, params: dict[str, Any]) -> Config:
        """The point's Config; its errors say which grid point they come from."""
        try:
            return self(params)
        except ConfigError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise ConfigError(f"{e} (in grid point {index}: {shown})") from None


def expand(raw: dict, source: str = "<config>") -> list[RunSpec]:
    """Validate a raw config and every grid point of it; return the RunSpecs in grid order."""
    base = build_config(raw, source)  # the base point, so errors outside the grid are named plainly
    axes = _axes(raw, source)
    build = _PointBuilder(raw, source)
    keys = [key for axis in axes for key, _ in axis]
    if any(_touches(a, b) for a, b in itertools.combinations(keys, 2)):
        specs = _expand_whole(axes, build)  # a key inside a swept section: each point in full
    else:
        specs = _expand_by_key(axes, base, build)
    ids = {s.run_id for s in specs}
    if len(ids) != len(specs):
        raise ConfigError(f"{source}: grid: two grid points resolve to the same config; remove the duplicate values")
    return specs


def _touches(key: str, other: str) -> bool:
    """True when one key is the other or a section holding it."""
    return key == other or key.startswith(other + ".") or other.startswith(key + ".")


def _expand_whole(axes: list[Axis], build: _PointBuilder) -> list[RunSpec]:
    specs = []
    for index, combo in enumerate(_combos(axes)):
        params = _params(axes, combo)
        cfg = build.checked(index, params)
        specs.append(RunSpec(index, run_id_for(params, _identity(cfg)), params, cfg))
    return specs


def _expand_by_key(axes: list[Axis], base: Config, build: _PointBuilder) -> list[RunSpec]:
    """Swept keys that are independent of each other: a point is the base with its values set.

    Sound because a key's value is valid or not on its own, except for the cross-field rules,
    which are checked once per combination of the values they can see.
    """
    values = _checked_values(axes, build)
    _check_cross_fields(axes, build)
    ids = _RunIds(axes, values, _identity(base))
    return [RunSpec(index, ids.run_id(combo), _params(axes, combo), build=build)
            for index, combo in enumerate(_combos(axes))]


def _checked_values(axes: list[Axis], build: _PointBuilder) -> list[dict[str, list]]:
    """Each grid value validated once, as a Config would hold it (plain data, sections as mappings).

    A bad value is reported for the first grid point holding it, with the message a full build
    of that point gives.
    """
    strides = _strides(axes)
    first_bad: Optional[int] = None
    resolved: list[dict[str, list]] = []
    for a, axis in enumerate(axes):
        columns: dict[str, list] = {}
        for key, values in axis:
            column = []
            for i, value in enumerate(values):
                try:
                    column.append(_plain(build_value(key, value)))
                except ConfigError:
                    first_bad = i * strides[a] if first_bad is None else min(first_bad, i * strides[a])
                    column.append(None)
            columns[key] = column
        resolved.append(columns)
    if first_bad is not None:
        _fail_at(axes, build, first_bad)
    return resolved


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _fail_at(axes: list[Axis], build: _PointBuilder, index: int) -> None:
    build.checked(index, _params(axes, _combo_at(axes, index)))
    raise AssertionError(f"grid point {index} was found invalid, yet it builds")


def _check_cross_fields(axes: list[Axis], build: _PointBuilder) -> None:
    """The rules that read several keys, once per combination of the axes they can see."""
    seen = [a for a, axis in enumerate(axes)
            if any(_touches(key, cross) for key, _ in axis for cross in CROSS_FIELD_KEYS)]
    if not seen:
        return  # the base point passed them, and no point changes what they read
    strides = _strides(axes)
    # In this order the representative points (other axes at their first value) come in grid order.
    for sub in itertools.product(*[range(len(axes[a][0][1])) for a in seen]):
        index = sum(i * strides[a] for a, i in zip(seen, sub))
        build.checked(index, _params(axes, _combo_at(axes, index)))


class _RunIds:
    """Run ids of grid points, without serializing each point's whole config.

    A point's identity is the base identity with the swept keys set. Its JSON, as run_id_for
    hashes it (sorted keys), is put together from a template: the base's text for top-level
    keys no axis sets anything under, and a slot for each other key, filled with one text per
    combination of the values of the axes that set something there, made once and kept.
    """

    def __init__(self, axes: list[Axis], values: list[dict[str, list]], base_identity: dict):
        self.values, self.base = values, base_identity
        setters: dict[str, list[int]] = {}
        for a, axis in enumerate(axes):
            for top in sorted({key.split(".")[0] for key, _ in axis}):
                setters.setdefault(top, []).append(a)
        self.template: list[str] = []
        self.slots: list[tuple[int, str, list[int], Callable, dict]] = []  # (template index, key, its axes,
        #                                                                     their value indices, cache)
        text = "{"
        for n, top in enumerate(sorted(base_identity)):
            text += (", " if n else "") + json.dumps(top) + ": "
            if top not in setters:
                text += json.dumps(base_identity[top], sort_keys=True)
                continue
            self.template.append(text)
            self.slots.append((len(self.template), top, setters[top], operator.itemgetter(*setters[top]), {}))
            self.template.append("")
            text = ""
        self.template.append(text + "}")
        # One label per swept key, joined per value of an axis (a zip group's keys go together).
        labels = [[[_label(key, column[i]) for key, column in axis] for i in range(len(axis[0][1]))]
                  for axis in axes]
        self.plain = all(_PLAIN_LABEL.fullmatch(label) for axis in labels for point in axis for label in point)
        self.labels = [["-".join(point).replace("_", "-") if self.plain else "_".join(point) for point in axis]
                       for axis in labels]

    def run_id(self, combo: tuple[int, ...]) -> str:
        parts = self.template.copy()
        for slot, top, setters, indices, cache in self.slots:
            key = indices(combo)
            text = cache.get(key)
            if text is None:
                text = cache[key] = json.dumps(self._section(top, setters, combo), sort_keys=True)
            parts[slot] = text
        return _run_id([self.labels[a][i] for a, i in enumerate(combo)], "".join(parts), self.plain)

    def _section(self, top: str, setters: list[int], combo: tuple[int, ...]) -> Any:
        section = self.base[top]
        for a in setters:
            for dotted, column in self.values[a].items():
                path = dotted.split(".")
                if path[0] == top:
                    section = _with_value(section, top, path[1:], column[combo[a]])
        return _without_later_defaults(top, section)


def _with_value(node: Any, prefix: str, path: list[str], value: Any) -> Any:
    """A copy of ``node`` with ``value`` at ``path``; only the mappings on the way are copied.

    A section unset in the base (``data.synth: null``) becomes its defaults first, as a full
    build of the point makes it.
    """
    if not path:
        return value
    node = dict(node) if node is not None else section_defaults(prefix)
    node[path[0]] = _with_value(node.get(path[0]), f"{prefix}.{path[0]}", path[1:], value)
    return node


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

    def write(self, raw: dict, specs: list[RunSpec], *, replace: bool = False) -> None:
        """Write sweep.yaml and grid.jsonl; never touches run results.

        Run folders are not made here but by :meth:`prepare_run`, when a run is submitted or
        starts: a state.json is written durably (fsync), which for every point of a large grid
        would take minutes. Until then a grid point is pending (:func:`iter_runs`).
        A folder that already holds a different sweep is refused rather than overwritten:
        its grid.jsonl indexes runs that would otherwise disappear from status and collect.
        ``replace`` overwrites it anyway (a scratch sweep of debug runs).
        """
        text = dump_yaml(raw)
        if not replace and self.config_path.exists() and self.config_path.read_text(encoding="utf-8") != text:
            raise ConfigError(
                f"{self.root} already holds a different sweep (its sweep.yaml differs from this config "
                "and its overrides); choose another folder with --sweep-dir or another name with name=...")
        atomic_write_text(self.config_path, text)
        atomic_write_text(self.grid_path, "".join(json.dumps(s.record(), sort_keys=True) + "\n" for s in specs))

    def prepare_run(self, spec: RunSpec) -> Path:
        """The run's folder, its config.yaml and its pending state, unless they exist already."""
        run_dir = self.run_dir(spec.run_id)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        config_path = run_dir / "config.yaml"
        if not config_path.exists():
            # The run id is a hash of this config, so an existing file already holds it.
            atomic_write_text(config_path, dump_yaml(base_dict(spec.config)), durable=False)
        self.recorder(spec).pending(spec.config.train.epochs, spec.config.train.monitor)
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

    def run_ids_on_disk(self) -> set[str]:
        """Ids of the runs that have a folder (one listing, rather than a look per grid point)."""
        try:
            return set(os.listdir(self.root / "runs"))
        except FileNotFoundError:
            return set()


# --------------------------------------------------------------------------- runs


def iter_runs(sweep: SweepDir) -> Iterator[tuple[dict, Optional[RunState]]]:
    """Each grid record with its state: pending when the run has no folder yet, None when its
    folder has no readable state.json."""
    on_disk = sweep.run_ids_on_disk()
    for rec in sweep.records():
        if rec["run_id"] not in on_disk:
            yield rec, RunState(status="pending", index=rec["index"], run_id=rec["run_id"],
                                params=rec.get("params", {}))
            continue
        yield rec, read_state(sweep.run_dir(rec["run_id"]))
