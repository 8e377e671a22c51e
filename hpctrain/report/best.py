"""best/: the best run's config and checkpoint, copied out of the sweep, with best.json.

A checkpoint is checked before it is copied: torch.save writes a zip archive, so a
truncated or half-copied file fails the zip check (its directory is at the end) without
importing torch. A run whose best.pt is missing or damaged is passed over, with a
problem line, for the next run of the ranking.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Optional

from ..fsutil import atomic_write_bytes, atomic_write_json
from .runs import RunRecord

BEST_JSON = "best.json"
CHECKPOINT = "best.pt"
CONFIG = "config.yaml"


def checkpoint_problem(data: bytes) -> Optional[str]:
    """Why these bytes are not a complete torch checkpoint, or None when they are."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            bad = archive.testzip()
            if bad is not None:
                return f"member {bad} fails its CRC"
            if not any(n.endswith("data.pkl") for n in archive.namelist()):
                return "no data.pkl: not a torch.save file"
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        return f"not a complete torch checkpoint ({e})"
    return None


def _read(path: Path) -> Optional[bytes]:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def pick_checkpoint(ranked: list[RunRecord], problems: list[str]) -> tuple[Optional[RunRecord], Optional[bytes]]:
    """The best ranked run whose checkpoints/best.pt is complete, with the bytes read once."""
    for run in ranked:
        path = run.run_dir / "checkpoints" / CHECKPOINT
        data = _read(path)
        if data is None:
            problems.append(f"{path}: missing; passed over {run.run_id} for best/")
            continue
        why = checkpoint_problem(data)
        if why is not None:
            problems.append(f"{path}: {why}; passed over {run.run_id} for best/")
            continue
        return run, data
    return None, None


def best_record(run: RunRecord, metric: str, mode: str, sweep_root: Path) -> dict:
    """best.json: the run ranked first by ``metric``, and what its best.pt holds.

    best.pt holds the weights of the epoch best by the run's own train.monitor
    (``checkpoint_epoch``); ``best_epoch`` is the epoch best by ``metric``. They are the same
    epoch when the ranking metric is the monitor, which is what collect uses by default.
    """
    s = run.state
    return {"run_id": run.run_id, "index": run.index, "params": run.params, "state": run.status,
            "metric": metric, "mode": mode, "value": run.best_value, "best_epoch": run.best_epoch,
            "checkpoint": CHECKPOINT, "config": CONFIG,
            "checkpoint_monitor": s.monitor if s is not None else None,
            "checkpoint_epoch": s.best_epoch if s is not None else None,
            "world_size": s.world_size if s is not None else None,
            "source": str(run.run_dir.relative_to(sweep_root)) if run.run_dir.is_relative_to(sweep_root)
            else str(run.run_dir)}


def export_best(ranked: list[RunRecord], out_dir: str | Path, metric: str, mode: str, sweep_root: Path,
                problems: list[str]) -> Optional[dict]:
    """Write best/config.yaml, best/best.pt and best/best.json; returns best.json's content, or
    None (with a problem line) when no ranked run has a usable checkpoint."""
    run, checkpoint = pick_checkpoint(ranked, problems)
    if run is None:
        if ranked:
            problems.append(f"{out_dir}: no ranked run has a complete checkpoints/best.pt; best/ not written")
        return None
    out_dir = Path(out_dir)
    record = best_record(run, metric, mode, sweep_root)
    if record["checkpoint_monitor"] not in (None, metric) and record["checkpoint_epoch"] != record["best_epoch"]:
        problems.append(f"{out_dir / CHECKPOINT}: holds epoch {record['checkpoint_epoch']} of {run.run_id}, "
                        f"best by its train.monitor {record['checkpoint_monitor']}, not epoch "
                        f"{record['best_epoch']}, best by {metric}")
    config = _read(run.run_dir / CONFIG)
    if config is None:
        problems.append(f"{run.run_dir / CONFIG}: missing; best/ has the checkpoint only "
                        "(its config is inside best.pt)")
        record["config"] = None
    else:
        atomic_write_bytes(out_dir / CONFIG, config)
    atomic_write_bytes(out_dir / CHECKPOINT, checkpoint)
    atomic_write_json(out_dir / BEST_JSON, record)
    return record
