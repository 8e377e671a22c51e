"""Synthetic datasets with learnable structure, for the demo, tests and benchmarks.

Features are gaussian, then shifted and scaled per feature (so standardisation matters).
Targets come from a fixed random teacher: a linear part plus a small tanh network of the
latent gaussians, calibrated to unit scale, with gaussian noise of size ``noise`` added
before thresholding (binary), the argmax (multiclass) or as is (regression).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import DataError
from .shards import META_FILE, SPLITS, DatasetExists, DatasetWriter, Meta, TASKS

CHUNK_ROWS = 65536


class Teacher:
    """y = tanh(z W1 + b1) W2 + z V: nonlinear but learnable by a small MLP."""

    def __init__(self, rng: np.random.Generator, features: int, outputs: int, hidden: int = 32):
        self.w1 = rng.standard_normal((features, hidden)) * (2.0 / math.sqrt(features))
        self.b1 = rng.standard_normal(hidden) * 0.5
        self.w2 = rng.standard_normal((hidden, outputs)) / math.sqrt(hidden)
        self.v = rng.standard_normal((features, outputs)) * (0.5 / math.sqrt(features))
        sample = self.raw(rng.standard_normal((8192, features)))
        self.center = np.median(sample, axis=0)
        self.scale = sample.std(axis=0) + 1e-12

    def raw(self, z: np.ndarray) -> np.ndarray:
        return np.tanh(z @ self.w1 + self.b1) @ self.w2 + z @ self.v

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return (self.raw(z) - self.center) / self.scale


def split_counts(total: int, fractions: Sequence[float]) -> dict[str, int]:
    """Rows per split for fractions of ``total`` (largest remainders get the leftover rows)."""
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise DataError(f"split {tuple(fractions)}: expected three fractions train,val,test >= 0 that sum to 1")
    exact = [total * f for f in fractions]
    counts = [int(math.floor(e)) for e in exact]
    order = sorted(range(len(counts)), key=lambda i: counts[i] - exact[i])
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return dict(zip(SPLITS, counts))


def make_synthetic(out: str | os.PathLike, rows: int, features: int, task: str, classes: int = 2,
                   targets: int = 1, shards: int = 4, noise: float = 0.1, seed: int = 0,
                   split: Sequence[float] = (0.8, 0.1, 0.1), weights: bool = False,
                   overwrite: bool = False) -> Path:
    """Write a synthetic dataset folder at ``out`` and return its path."""
    if task not in TASKS:
        raise DataError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    if rows < 1 or features < 1 or shards < 1:
        raise DataError(f"rows, features and shards must be >= 1; got {rows}, {features}, {shards}")
    if task == "multiclass" and classes < 3:
        raise DataError(f"classes: multiclass needs at least 3 classes, got {classes}")
    n_classes = {"binary": 2, "multiclass": classes, "regression": 0}[task]
    n_targets = targets if task == "regression" else 1
    counts = split_counts(rows, split)
    outputs = {"binary": 1, "multiclass": classes, "regression": targets}[task]
    rng = np.random.default_rng([seed, 0])
    teacher = Teacher(rng, features, outputs)
    offset = rng.normal(0.0, 2.0, features)
    scale = np.exp(rng.normal(0.0, 0.7, features))
    params = {"rows": rows, "features": features, "task": task, "classes": n_classes, "targets": n_targets,
              "shards": shards, "noise": noise, "seed": seed, "split": list(split), "weights": weights}
    meta = Meta(task=task, n_features=features, n_classes=n_classes, n_targets=n_targets,
                feature_names=[f"f{i}" for i in range(features)], mean=[], std=[], rows=counts,
                has_weights=weights, target_names=[f"y{i}" for i in range(n_targets)] if task == "regression" else ["y"],
                class_names=[str(c) for c in range(n_classes)], source={"kind": "synthetic", "params": params})
    with DatasetWriter(out, meta, shards=shards, overwrite=overwrite) as writer:
        for s, split_name in enumerate(SPLITS):
            for c, start in enumerate(range(0, counts[split_name], CHUNK_ROWS)):
                n = min(CHUNK_ROWS, counts[split_name] - start)
                chunk_rng = np.random.default_rng([seed, 1, s, c])
                z = chunk_rng.standard_normal((n, features))
                x = (z * scale + offset).astype(np.float32)
                y = _targets(task, teacher(z) + noise * chunk_rng.standard_normal((n, outputs)))
                w = chunk_rng.uniform(0.5, 1.5, n).astype(np.float32) if weights else None
                writer.append(split_name, x, y, w)
        return writer.finish()


def _targets(task: str, score: np.ndarray) -> np.ndarray:
    if task == "binary":
        return (score[:, 0] > 0).astype(np.int64)
    if task == "multiclass":
        return score.argmax(axis=1).astype(np.int64)
    return score.astype(np.float32)


def ensure_synthetic(data_cfg: Any) -> Optional[Path]:
    """Create the synthetic dataset ``data_cfg.synth`` at ``data_cfg.path`` unless it exists.

    Safe when several processes race: each builds in a temporary folder beside the target
    and renames it into place; a loser removes its copy and uses the winner's.
    """
    path = Path(data_cfg.path)
    synth = data_cfg.synth
    if synth is None:
        return None
    task = data_cfg.task
    if not (path / META_FILE).exists():
        try:
            make_synthetic(path, rows=synth.rows, features=synth.features, task=task,
                           classes=synth.classes if task == "multiclass" else 2, targets=synth.targets,
                           shards=synth.shards, noise=synth.noise, seed=synth.seed)
        except DatasetExists:
            if not (path / META_FILE).exists():
                raise DataError(f"{path}: exists but holds no {META_FILE}; data.synth makes a dataset only "
                                f"in a new or empty folder (delete it or change data.path)") from None
    _check_same_synth(path, task, synth)
    return path


def _check_same_synth(path: Path, task: str, synth: Any) -> None:
    """A synthetic dataset made earlier with other settings would silently train on the wrong data."""
    from .shards import open_dataset

    source = open_dataset(path, check=False).meta.source
    made = source.get("params") if source.get("kind") == "synthetic" else None
    if made is None:
        return
    wanted = {"rows": synth.rows, "features": synth.features, "task": task,
              "targets": synth.targets if task == "regression" else 1,
              "shards": synth.shards, "noise": synth.noise, "seed": synth.seed}
    if task == "multiclass":
        wanted["classes"] = synth.classes
    differ = {k: (made.get(k), v) for k, v in wanted.items() if made.get(k) != v}
    if differ:
        detail = ", ".join(f"{k}: {a!r} there, {b!r} asked" for k, (a, b) in differ.items())
        raise DataError(f"{path / META_FILE}: this synthetic dataset was made with other settings ({detail}); "
                        f"delete the folder or point data.path elsewhere")
