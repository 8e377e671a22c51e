"""YAML config -> typed, validated config.

The schema is a tree of dataclasses. Each field's constraints (choices, range,
pattern) live in its metadata, so one generic validator walks the tree and every
error names the dotted key path, the bad value and what was expected.

Nothing here touches the file system beyond reading the YAML file: validation
runs before anything is submitted or written.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


from .errors import ConfigError  # noqa: E402  (re-exported: hpctrain.config.ConfigError)


# --------------------------------------------------------------------------- schema

TASKS = ("binary", "multiclass", "regression")
ACTIVATIONS = ("relu", "leaky_relu", "elu", "selu", "gelu", "silu", "swish", "tanh", "sigmoid", "linear")
INITS = ("auto", "he", "glorot", "lecun", "lsuv")
OPTIMIZERS = ("sgd", "adam", "adamw", "nadam", "rmsprop", "adagrad")
SCHEDULES = ("none", "step", "power", "exponential", "cosine", "onecycle", "plateau")
# Schedules whose learning rate at a step depends on the planned number of steps (train.epochs):
# a run of these cannot be continued to more epochs and stay the run it was.
LENGTH_DEPENDENT_SCHEDULES = ("cosine", "onecycle")
# Top-level sections that describe the sweep's points, not one run.
SWEEP_SECTIONS = ("grid", "search")
LOSSES = ("auto", "mse", "mae", "huber", "bce", "ce")
BACKENDS = ("auto", "none", "horovod", "torch", "mpi")
# Patterns are matched against the whole value (full_match), never with re.match: `$` also
# matches before a final newline, so "debug\n" would pass and break an #SBATCH line.
SLURM_WORD = r"^[A-Za-z0-9_.,:+@%=-]+$"  # partition/account/qos names: no spaces, no shell metacharacters
SLURM_CONSTRAINT = r"^[A-Za-z0-9_.,:+@%=&|()\[\]*-]+$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # newlines and other control characters; tab is fine


def full_match(pattern: str, value: str) -> bool:
    """True when ``pattern`` matches all of ``value`` (a trailing newline included)."""
    return re.fullmatch(pattern, value) is not None


def spec(default: Any = dataclasses.MISSING, *, choices=None, ge=None, gt=None, le=None, lt=None,
         pattern=None, length=None, single_line=False, help: str = "",
         default_factory: Any = dataclasses.MISSING):
    """A dataclass field with validation metadata."""
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "pattern": pattern,
            "length": length, "single_line": single_line, "help": help}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SynthConfig:
    """Make a synthetic dataset at data.path when it does not exist yet (demo, tests)."""
    rows: int = spec(20000, ge=10)
    features: int = spec(16, ge=1)
    classes: int = spec(2, ge=2, help="class count for multiclass (binary uses 2)")
    targets: int = spec(1, ge=1, help="target columns for regression")
    shards: int = spec(4, ge=1)
    noise: float = spec(0.1, ge=0.0)
    seed: int = spec(0, ge=0)


@dataclass
class DataConfig:
    path: str = spec("data/demo", help="dataset folder with meta.json and train/val/test shards")
    task: str = spec("binary", choices=TASKS)
    batch_size: int = spec(1024, ge=1, help="per-rank batch size")
    global_batch_size: Optional[int] = spec(None, ge=1, help="batch of all ranks together; when set, each "
                                            "rank takes global_batch_size / world size and batch_size is unused")
    streams: int = spec(8, ge=1, help="streams the train epoch's order is defined over; world sizes must divide it")
    standardize: bool = spec(True, help="apply train-split mean/std from meta.json on the fly")
    block_rows: int = spec(4096, ge=1, help="contiguous rows read in one HDF5 slice when shuffling")
    buffer_blocks: int = spec(8, ge=1, help="blocks mixed in one shuffle buffer")
    remainder: str = spec("drop", choices=("drop", "pad"),
                          help="rows left over after an equal split across ranks and batches")
    prefetch: int = spec(4, ge=0, help="batches read ahead in background threads, in whole rounds (0: none)")
    loader_threads: int = spec(0, ge=0, help="threads that read and gather a batch's rows side by side; "
                               "0: automatic (1 on the CPU, up to 4 when training on a GPU)")
    limit_rows: Optional[int] = spec(None, ge=1, help="use only the first N rows of each split")
    synth: Optional[SynthConfig] = spec(None)


@dataclass
class ModelConfig:
    hidden: list[int] = spec(default_factory=lambda: [64, 64], ge=1)
    activation: str = spec("relu", choices=ACTIVATIONS)
    leaky_slope: float = spec(0.01, ge=0.0, lt=1.0)
    norm: str = spec("none", choices=("none", "batch"))
    dropout: float = spec(0.0, ge=0.0, lt=1.0)
    init: str = spec("auto", choices=INITS)
    output: str = spec("none", choices=("none", "positive", "bounded"),
                       help="regression output activation: none, positive (softplus), bounded (sigmoid)")
    output_bounds: list[float] = spec(default_factory=lambda: [0.0, 1.0], length=2)
    target: Optional[str] = spec(None, pattern=r"^[^:\s]+:[A-Za-z_][A-Za-z0-9_]*$",
                                 help="your own model: \"package.module:build\" or \"file.py:build\", called as "
                                      "build(feature_shape=..., n_outputs=..., task=..., **model.options)")
    options: dict = spec(default_factory=dict, help="keyword arguments of model.target's function")


@dataclass
class OptimConfig:
    name: str = spec("adam", choices=OPTIMIZERS)
    lr: float = spec(1e-3, gt=0.0)
    weight_decay: float = spec(0.0, ge=0.0)
    momentum: float = spec(0.9, ge=0.0, lt=1.0)
    nesterov: bool = spec(False)
    betas: list[float] = spec(default_factory=lambda: [0.9, 0.999], length=2, ge=0.0, lt=1.0)
    eps: float = spec(1e-8, gt=0.0)
    l1: float = spec(0.0, ge=0.0, help="L1 penalty on weights, added to the loss")
    l2: float = spec(0.0, ge=0.0, help="L2 penalty on weights, added to the loss")
    max_norm: Optional[float] = spec(None, gt=0.0, help="max-norm constraint on each unit's incoming weights")
    grad_clip: Optional[float] = spec(None, gt=0.0, help="clip the global gradient norm")
    lr_scaling: str = spec("none", choices=("none", "linear"), help="scale lr by the world size")


@dataclass
class ScheduleConfig:
    name: str = spec("none", choices=SCHEDULES)
    warmup_steps: int = spec(0, ge=0)
    milestones: list[int] = spec(default_factory=list, ge=1, help="step schedule: epochs where lr *= gamma")
    gamma: float = spec(0.1, gt=0.0)
    decay_steps: int = spec(1000, ge=1, help="power/exponential: steps of one decay unit")
    decay_rate: float = spec(0.1, gt=0.0, help="exponential: lr * decay_rate ** (step / decay_steps)")
    power: float = spec(1.0, gt=0.0, help="power: lr / (1 + step / decay_steps) ** power")
    min_lr: float = spec(0.0, ge=0.0)
    max_lr: Optional[float] = spec(None, gt=0.0, help="onecycle peak (default 10 x optim.lr)")
    patience: int = spec(3, ge=0, help="plateau: epochs without improvement before lr *= factor")
    factor: float = spec(0.5, gt=0.0, lt=1.0)
    threshold: float = spec(1e-4, ge=0.0)


@dataclass
class LossConfig:
    name: str = spec("auto", choices=LOSSES)
    huber_delta: float = spec(1.0, gt=0.0)
    weighted: bool = spec(False, help="use the per-sample weights w of the shards")


@dataclass
class EarlyStoppingConfig:
    patience: Optional[int] = spec(None, ge=1, help="epochs without improvement before stopping (null: off)")
    min_delta: float = spec(0.0, ge=0.0)


@dataclass
class TrainConfig:
    epochs: int = spec(10, ge=1)
    monitor: str = spec("val_loss", pattern=r"^(train|val)_[a-z0-9_]+$",
                        help="metric for best checkpoint and early stopping")
    mode: str = spec("auto", choices=("auto", "min", "max"))
    early_stopping: EarlyStoppingConfig = spec(default_factory=EarlyStoppingConfig)
    checkpoint_every_s: float = spec(300.0, gt=0.0)
    checkpoint_every_epochs: int = spec(1, ge=1)
    checkpoint_every_steps: Optional[int] = spec(None, ge=1)
    checkpoint_min_interval_s: float = spec(2.0, ge=0.0,
                                            help="write checkpoints at an epoch's end at most every N seconds; "
                                                 "a best epoch in between is held in memory until the next write")
    max_steps: Optional[int] = spec(None, ge=1, help="stop after this many optimizer steps in total")
    precision: str = spec("fp32", choices=("fp32", "bf16", "fp16"))
    device: str = spec("auto", choices=("auto", "cpu", "cuda"))
    threads: Optional[int] = spec(None, ge=1, help="torch intra-op threads per rank")
    evaluate_test: bool = spec(True, help="evaluate the best checkpoint on the test split at the end")
    metrics: list[str] = spec(default_factory=list,
                              help="more metrics: f1_macro, confusion, or \"package.module:function\" "
                                   "(train/extra_metrics.py)")
    tensorboard: bool = spec(True, help="write TensorBoard events to <run_dir>/tb/ after every epoch")
    state_every_s: float = spec(10.0, ge=0.0, help="rewrite state.json after an epoch at most every N seconds "
                                                  "(transitions and the final state always)")


@dataclass
class DistConfig:
    backend: str = spec("auto", choices=BACKENDS)
    timeout_s: float = spec(300.0, gt=0.0, help="collective timeout before a run is failed")
    fp16_compression: bool = spec(False)
    backward_passes_per_step: int = spec(1, ge=1)
    sync_every_steps: int = spec(8, ge=1, help="ranks agree on stop, checkpoint and divergence every N steps")


@dataclass
class SlurmConfig:
    partition: Optional[str] = spec(None, pattern=SLURM_WORD)
    account: Optional[str] = spec(None, pattern=SLURM_WORD)
    qos: Optional[str] = spec(None, pattern=SLURM_WORD)
    constraint: Optional[str] = spec(None, pattern=SLURM_CONSTRAINT)
    nodes: int = spec(1, ge=1)
    tasks_per_node: int = spec(1, ge=1)
    gpus_per_node: int = spec(0, ge=0)
    cpus_per_task: int = spec(1, ge=1)
    mem_gb: Optional[float] = spec(None, gt=0.0)
    time_min: int = spec(60, ge=1)
    array_parallelism: int = spec(16, ge=1)
    signal_delay_s: int = spec(90, ge=0, help="seconds before the time limit the job is signalled")
    preempt_signal: str = spec("USR2", choices=("USR1", "USR2"),
                               help="signal that asks a job to checkpoint and requeue (NCCL may own USR1)")
    max_requeues: int = spec(3, ge=0)
    setup: list[str] = spec(default_factory=list, single_line=True,
                            help="shell lines run before the job (module load ...)")
    srun_args: list[str] = spec(default_factory=list, single_line=True)
    sbatch_extra: dict = spec(default_factory=dict,
                              help="more #SBATCH options, e.g. {mail-type: END, qos: long, exclusive: true}; "
                                   "checked by hpctrain.launch.spec")


@dataclass
class PruneConfig:
    kind: str = spec("none", choices=("none", "asha"),
                     help="asha: successive halving across the sweep's elements (prune.py)")
    metric: Optional[str] = spec(None, pattern=r"^(train|val)_[a-z0-9_]+$", help="default train.monitor")
    mode: str = spec("auto", choices=("auto", "min", "max"))
    min_epochs: int = spec(1, ge=1, help="the first rung: epochs every run trains")
    reduction: int = spec(3, ge=2, help="eta: a run goes on past a rung only in the top 1/eta recorded there")
    max_epochs: Optional[int] = spec(None, ge=1, help="the last rung is at most this (default train.epochs)")


@dataclass
class Config:
    name: str = spec("sweep", pattern=NAME_PATTERN)
    seed: int = spec(0, ge=0)
    data: DataConfig = spec(default_factory=DataConfig)
    model: ModelConfig = spec(default_factory=ModelConfig)
    optim: OptimConfig = spec(default_factory=OptimConfig)
    schedule: ScheduleConfig = spec(default_factory=ScheduleConfig)
    loss: LossConfig = spec(default_factory=LossConfig)
    train: TrainConfig = spec(default_factory=TrainConfig)
    dist: DistConfig = spec(default_factory=DistConfig)
    slurm: SlurmConfig = spec(default_factory=SlurmConfig)
    prune: PruneConfig = spec(default_factory=PruneConfig)
    grid: dict = spec(default_factory=dict)
    search: dict = spec(default_factory=dict, help="sampled points (search.py): kind, samples, seed and "
                                                   "a distribution per dotted key")

    def to_dict(self, *, with_grid: bool = True) -> dict:
        """``with_grid=False``: a run's own config, without the sweep's grid and search."""
        d = dataclasses.asdict(self)
        if not with_grid:
            d.pop("grid")
            d.pop("search")
        return d


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-3 as a float (YAML 1.1 wants 1.0e-3)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin is list:
        item = typing.get_args(tp)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(item, _type_name(item))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a mapping"}.get(tp, str(tp))


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _check_scalar(path: str, value: Any, tp: Any, meta: dict) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_show(value)}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_show(value)}")
        value = float(value)
        if not math.isfinite(value):
            # inf passes every bound (lr > 0) and NaN fails none: both would reach the trainer.
            raise ConfigError(f"{path}: expected a finite number, got {'NaN' if value != value else _show(value)}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_show(value)}")
    _check_constraints(path, value, meta)
    return value


def _check_constraints(path: str, value: Any, meta: dict) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{path}: {_show(value)} is not allowed; expected one of: "
                          f"{', '.join(choices)}{extra}")
    bounds = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
              ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
    for key, sym, ok in bounds:
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{path}: {_show(value)} is out of range; expected a value {sym} {bound}")
    pattern = meta.get("pattern")
    if pattern is not None and not full_match(pattern, value):
        raise ConfigError(f"{path}: {_show(value)} is not a valid value; expected text matching {pattern}")
    if meta.get("single_line") and CONTROL_CHARS.search(value):
        raise ConfigError(f"{path}: {_show(value)} contains a newline or control character; "
                          "expected a single line per list item")


def _build(path: str, value: Any, tp: Any, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return None if value is None else _build(path, value, inner, meta)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(path, value, tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_show(value)}")
        length = meta.get("length")
        if length is not None and len(value) != length:
            raise ConfigError(f"{path}: expected a list of {length} values, got {len(value)}: {_show(value)}")
        item_meta = {k: v for k, v in meta.items() if k != "length"}
        item_tp = typing.get_args(tp)[0]
        return [_build(f"{path}[{i}]", v, item_tp, item_meta) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_show(value)}")
        return copy.deepcopy(value)
    if value is None:
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got null")
    return _check_scalar(path, value, tp, meta)


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    # Resolving the string annotations is the slow part of validation; a class's never change.
    return typing.get_type_hints(cls)


@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _build_dataclass(path: str, raw: Any, cls: type) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        where = path or "the config"
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {_show(raw)}")
    types = _field_types(cls)
    fields = _fields(cls)
    for key in raw:
        if key not in fields:
            full = f"{path}.{key}" if path else str(key)
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            extra = f" Did you mean {(path + '.' if path else '') + hint[0]!r}?" if hint else ""
            raise ConfigError(f"{full}: unknown key. Expected one of: {', '.join(fields)}.{extra}")
    kwargs = {}
    for name, f in fields.items():
        full = f"{path}.{name}" if path else name
        if name in raw:
            kwargs[name] = _build(full, raw[name], types[name], f.metadata)
    return cls(**kwargs)


# Every key _check_cross_fields reads: a grid that sweeps none of them (nor a section holding
# one) cannot change the outcome of these rules, so they need checking once, on the base point.
CROSS_FIELD_KEYS = ("model.output_bounds", "model.output", "data.task", "loss.name", "schedule.milestones",
                    "data.synth")


def _check_cross_fields(cfg: Config) -> None:
    """Rules that involve more than one key (keep CROSS_FIELD_KEYS in step)."""
    if cfg.model.output_bounds[0] >= cfg.model.output_bounds[1]:
        raise ConfigError(f"model.output_bounds: {cfg.model.output_bounds} must be [low, high] with low < high")
    if cfg.model.output != "none" and cfg.data.task != "regression":
        raise ConfigError(f"model.output: {cfg.model.output!r} applies only to data.task: regression "
                          f"(data.task is {cfg.data.task!r}); expected 'none'")
    task_losses = {"binary": ("auto", "bce"), "multiclass": ("auto", "ce"),
                   "regression": ("auto", "mse", "mae", "huber")}
    if cfg.loss.name not in task_losses[cfg.data.task]:
        raise ConfigError(f"loss.name: {cfg.loss.name!r} does not fit data.task {cfg.data.task!r}; "
                          f"expected one of: {', '.join(task_losses[cfg.data.task])}")
    if cfg.schedule.milestones != sorted(set(cfg.schedule.milestones)):
        raise ConfigError(f"schedule.milestones: {cfg.schedule.milestones} must be strictly increasing epochs")
    if cfg.data.synth is not None and cfg.data.task == "multiclass" and cfg.data.synth.classes < 3:
        raise ConfigError("data.synth.classes: multiclass needs at least 3 classes, "
                          f"got {cfg.data.synth.classes}")


def build_config(raw: Any, source: str = "<config>") -> Config:
    """Validate a raw mapping (grid included) and return a Config for its base point."""
    try:
        cfg = _build_dataclass("", raw, Config)
        _check_cross_fields(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def build_value(dotted: str, value: Any) -> Any:
    """Validate one value of a dotted key on its own; return it as a Config holds it.

    The error names the key, the value and what was expected, without the file (the caller
    says where the value came from).
    """
    tp, meta = leaf_spec(dotted)
    return _build(dotted, value, tp, meta)


def section_defaults(dotted: str) -> dict:
    """The resolved mapping of a section key left unset (``data.synth`` -> SynthConfig's defaults)."""
    tp, _meta = leaf_spec(dotted)
    if typing.get_origin(tp) is typing.Union:
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    if not dataclasses.is_dataclass(tp):
        raise ConfigError(f"{dotted}: has no sub-keys")
    return dataclasses.asdict(tp())


# --------------------------------------------------------------------------- dotted keys


def leaf_spec(dotted: str) -> tuple[Any, dict]:
    """Type and metadata of a dotted config key; ConfigError when there is no such key."""
    cls: Any = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not (dataclasses.is_dataclass(cls)):
            raise ConfigError(f"{dotted}: {'.'.join(parts[:i])} has no sub-keys")
        fields = _fields(cls)
        if part not in fields or part in SWEEP_SECTIONS:
            prefix = ".".join(parts[:i])
            choices = [n for n in fields if n not in SWEEP_SECTIONS]
            hint = difflib.get_close_matches(part, choices, n=1)
            extra = f" Did you mean {(prefix + '.' if prefix else '') + hint[0]!r}?" if hint else ""
            raise ConfigError(f"{dotted}: no such config key. "
                              f"{'Keys of ' + prefix if prefix else 'Top-level keys'}: {', '.join(choices)}.{extra}")
        tp = _field_types(cls)[part]
        meta = dict(fields[part].metadata)
        if i == len(parts) - 1:
            return tp, meta
        origin = typing.get_origin(tp)
        if origin is typing.Union:
            tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        cls = tp
    raise AssertionError("unreachable")


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a raw nested mapping, creating sections as needed."""
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is {_show(child)}, not a mapping")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def get_dotted(raw: dict, dotted: str, default: Any = None) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", YAML-typed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. optim.lr=0.01")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: the key before '=' is empty")
    return key, parse_yaml(value, source=f"override {text!r}") if value.strip() else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides to a raw config mapping (a new mapping is returned).

    ``grid.optim.lr=[...]`` sets a grid axis. Overriding a key that the grid sweeps fixes
    it: the axis is dropped from the grid, so ``hpctrain run x.yaml optim.lr=0.1`` trains
    with lr 0.1 whatever the grid says.
    """
    raw = copy.deepcopy(raw) if raw else {}
    for text in overrides:
        key, value = parse_override(text)
        section = key.split(".")[0]
        if section in SWEEP_SECTIONS and "." in key:
            raw.setdefault(section, {})
            if not isinstance(raw[section], dict):
                raise ConfigError(f"override {text!r}: {section} is not a mapping")
            raw[section][key[len(section) + 1:]] = value
            continue
        leaf_spec(key)
        set_dotted(raw, key, value)
        _drop_grid_axis(raw, key)
    return raw


def _drop_grid_axis(raw: dict, key: str) -> None:
    grid = raw.get("grid")
    if not isinstance(grid, dict):
        return
    grid.pop(key, None)
    groups = grid.get("zip")
    if isinstance(groups, dict):
        groups = [groups]
    if isinstance(groups, list):
        for group in groups:
            if isinstance(group, dict):
                group.pop(key, None)


# --------------------------------------------------------------------------- loading


EMPTY_HINT = ("a config must at least name its data: data.path, a folder made by `hpctrain data convert` "
              "or `hpctrain data synth` (with meta.json), or a data.synth section that makes it, "
              "e.g. `data: {path: data/mine, task: binary}`; see configs/demo.yaml")


def read_raw(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    raw = parse_yaml(_decode(data, path), source=str(path))
    if raw is None or raw == {}:
        # Not "all defaults": an empty file is far more often a mistake than a wish.
        raise ConfigError(f"{path}: the config is empty (no keys); {EMPTY_HINT}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level, got {_show(raw)}")
    return raw


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text: byte {e.start} (line {line}) is 0x{data[e.start]:02x}; "
                          "expected a UTF-8 encoded YAML file (save it as UTF-8)") from None


def load_raw(path: str | Path, overrides: list[str] = ()) -> dict:
    """Read a YAML config and apply overrides; the result is still unvalidated."""
    return apply_overrides(read_raw(path), list(overrides))


def config_from_dict(raw: dict, source: str = "<config>") -> Config:
    return build_config(raw, source)


def base_dict(cfg: Config) -> dict:
    """A run's resolved config as a plain mapping without its grid."""
    return cfg.to_dict(with_grid=False)
