"""Checkpoints: atomic save, safe load, corrupt-file detection and fallback.

A checkpoint is a dict of plain types and tensors written with ``torch.save`` and read
with ``torch.load(weights_only=True)``, so loading never runs pickled code. It carries a
``digest``: a SHA-256 over every value of the payload (tensor bytes included), computed
before saving and checked after loading. A truncated file fails to unpickle; a file whose
bytes were altered fails the digest. Either way the loader names the file and moves on to
the next candidate (``last.pt`` -> ``previous.pt`` -> ``best.pt``).

Writes go through :mod:`hpctrain.fsutil` (temp file, fsync, rename). Before a new
``last.pt`` replaces the old one, the old one is verified and renamed to ``previous.pt``, so
one good checkpoint survives a crash at any moment. A ``last.pt`` that fails verification is
moved to ``last.pt.corrupt`` instead: it must never replace a good ``previous.pt`` (a run that
resumed from ``previous.pt`` past a truncated ``last.pt`` would otherwise lose its only good
checkpoint at its next save).
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import HpctrainError
from ..fsutil import atomic_write_bytes

FORMAT = "hpctrain-checkpoint-1"
LAST, PREVIOUS, BEST = "last.pt", "previous.pt", "best.pt"
RESUME_ORDER = (LAST, PREVIOUS, BEST)
CORRUPT_SUFFIX = ".corrupt"  # a last.pt that failed verification, kept for a look, never resumed from


class CheckpointError(HpctrainError):
    """A checkpoint file that cannot be read, or whose content does not match its digest."""


def content_digest(obj: Any) -> str:
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r}".encode())


def serialize(payload: dict) -> bytes:
    """The bytes of a checkpoint file for ``payload`` (a digest and the format are added)."""
    body = {k: v for k, v in payload.items() if k != "digest"}
    body["format"] = FORMAT
    body["digest"] = content_digest(body)
    buf = io.BytesIO()
    torch.save(body, buf)
    return buf.getvalue()


def write_checkpoint(path: str | os.PathLike, data: bytes, keep_previous: bool = False,
                     log: Callable[[str], None] = print) -> None:
    """Atomically write checkpoint bytes; with ``keep_previous`` the old file, if it verifies,
    becomes previous.pt."""
    path = Path(path)
    if keep_previous and path.exists():
        _retire(path, log)
    atomic_write_bytes(path, data)


def _retire(path: Path, log: Callable[[str], None]) -> None:
    """Move the current file out of the way: to previous.pt when it verifies, else aside."""
    try:
        load_checkpoint(path)
    except CheckpointError as e:
        aside = path.with_name(path.name + CORRUPT_SUFFIX)
        os.replace(path, aside)
        log(f"warning: {e}; moved it to {aside.name} and kept {PREVIOUS}")
        return
    os.replace(path, path.with_name(PREVIOUS))


def save_checkpoint(path: str | os.PathLike, payload: dict, keep_previous: bool = False,
                    log: Callable[[str], None] = print) -> None:
    write_checkpoint(path, serialize(payload), keep_previous, log)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read and verify one checkpoint; CheckpointError names the file and what is wrong."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except Exception as e:  # noqa: BLE001  torch reports damaged archives with many exception types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt): {reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not an hpctrain checkpoint (format {found!r}, expected {FORMAT!r})")
    stored = payload.get("digest")
    actual = content_digest({k: v for k, v in payload.items() if k != "digest"})
    if stored != actual:
        raise CheckpointError(f"{path}: checkpoint content does not match its digest (corrupt file)")
    return payload


def load_latest(folder: str | os.PathLike, names: tuple[str, ...] = RESUME_ORDER,
                log: Callable[[str], None] = print, map_location: str | torch.device = "cpu"
                ) -> tuple[Optional[str], Optional[dict], list[str]]:
    """The first good checkpoint among ``names`` in ``folder``: (name, payload, problems).

    Missing files are skipped silently; unreadable ones are reported through ``log`` and in
    ``problems``. (None, None, problems) when there is no good checkpoint.
    """
    folder = Path(folder)
    problems: list[str] = []
    for name in names:
        path = folder / name
        if not path.exists():
            continue
        try:
            return name, load_checkpoint(path, map_location), problems
        except CheckpointError as e:
            problems.append(str(e))
            log(f"warning: {e}; trying the next checkpoint")
    return None, None, problems
