"""Which metric ranks a sweep's runs, and which direction of it is better.

One answer for every reader: the trainer (best checkpoint, early stopping), ``collect``
(summary, leaderboard, best/), the collector job, ``load_best`` and ``status``. The metric
is the sweep's ``train.monitor`` with its ``train.mode``, unless a command is told another;
so the run that best/ names and the epoch best.pt holds are the ones the trainer kept.

No torch here: ``status`` and ``collect`` import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import ConfigError

# Words that say which direction is better, matched against the metric name's parts
# (val_loss: min, val_f1_macro: max, test_rmse: min).
LOWER_IS_BETTER = ("loss", "rmse", "mae", "mse", "error", "err", "perplexity")
HIGHER_IS_BETTER = ("accuracy", "acc", "auc", "f1", "r2", "precision", "recall")


def better_mode(metric: str, mode: str = "auto") -> str:
    """``min`` or ``max``; ``auto`` reads it from the metric's name."""
    if mode in ("min", "max"):
        return mode
    if mode != "auto":
        raise ConfigError(f"mode {mode!r} for {metric} is not allowed; expected min, max or auto")
    words = metric.lower().split("_")
    if any(w in LOWER_IS_BETTER for w in words):
        return "min"
    if any(w in HIGHER_IS_BETTER for w in words):
        return "max"
    raise ConfigError(f"metric {metric}: cannot tell whether lower or higher is better; "
                      "give its mode (train.mode or --mode) as min or max")


@dataclass(frozen=True)
class Monitor:
    metric: str
    mode: str

    def __str__(self) -> str:
        return f"{self.metric} ({self.mode})"


DEFAULT = Monitor("val_loss", "min")


def sweep_monitor(sweep_root: str | Path) -> Optional[Monitor]:
    """The ``train.monitor`` and mode of the sweep in ``sweep_root`` (its sweep.yaml), or None
    when the folder holds no readable sweep.yaml (a collect ``--out`` folder, an old sweep)."""
    from .config import build_config, read_raw

    path = Path(sweep_root) / "sweep.yaml"
    if not path.is_file():
        return None
    try:
        train = build_config(read_raw(path), str(path)).train
    except (ConfigError, OSError, ValueError):
        return None
    return Monitor(train.monitor, better_mode(train.monitor, train.mode))


def choose(sweep_root: str | Path, metric: Optional[str] = None, mode: str = "auto") -> Monitor:
    """The metric a command ranks by: the one asked for, else the sweep's monitor."""
    if metric:
        return Monitor(metric, better_mode(metric, mode))
    found = sweep_monitor(sweep_root) or DEFAULT
    return found if mode == "auto" else Monitor(found.metric, better_mode(found.metric, mode))
