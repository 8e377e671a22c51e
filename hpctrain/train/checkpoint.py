"""Checkpoints: atomic save, safe load, corrupt-file detection and fallback; the trainer's
``CheckpointManager`` (when a checkpoint is due, background writes, resume and best weights)
and the RNG states a checkpoint carries.

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
checkpoint at its next save). Reading the old file back costs more than writing the new one,
so a file this process wrote itself (fsynced; same inode, size and mtime since) is retired
without it: only a file another process left, or one changed since, is read back.
"""
from __future__ import annotations

import hashlib
import io
import os
import queue
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..errors import HpctrainError
from ..fsutil import atomic_write_bytes
from ..tempfiles import remove_stale_temp_files

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


_SCALARS = (int, float, str, bool, type(None))


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
        if all(type(item) in _SCALARS for item in obj):
            # The bytes the loop below would feed, in one call (a call per item is the cost).
            h.update("".join(f"V{type(item).__name__}:{item!r}" for item in obj).encode())
            return
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
    _written[str(path.resolve())] = _identity(path)


# Files this process wrote: resolved path -> (inode, size, mtime_ns) right after the write.
_written: dict[str, tuple[int, int, int]] = {}


def _identity(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _retire(path: Path, log: Callable[[str], None]) -> None:
    """Move the current file out of the way: to previous.pt when it verifies, else aside."""
    try:
        if _written.pop(str(path.resolve()), None) != _identity(path):
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


# ---------------------------------------------------------------------- the trainer's checkpoints


class CheckpointManager:
    """A run's checkpoint folder seen from the trainer: when ``last.pt`` is due, saving
    (rank 0 writes; building the payload is the caller's collective), and loading for a
    resume or for the best weights (rank 0 reads, every rank receives). Without a run folder
    nothing is written or read.

    The payload is built and serialised at once (training then changes the state), but the
    bytes are written, fsynced and renamed into place by a background thread while training
    goes on: the fsyncs cost more than an epoch of a small model, and they wait on the disk,
    not the CPU. One thread writes them in order, with at most one more queued (``save``
    blocks beyond that, so memory stays bounded when the disk is slower than the epochs);
    it lives as long as the manager, as starting a thread per save made the training thread
    wait for the new thread to be scheduled. ``wait`` blocks until every queued write is on
    disk and raises the first error; the trainer calls it before it reports how the run
    ended and before it reads a checkpoint back, and ``close`` at the end of ``fit``. A
    process that dies mid-write loses that checkpoint only: the one before it is in place.
    """

    def __init__(self, run_dir: Optional[Path], backend, train_cfg, log: Callable[[str], None] = print):
        self.folder = run_dir / "checkpoints" if run_dir is not None else None
        self.backend, self.log = backend, log
        self.every_s, self.every_epochs = train_cfg.checkpoint_every_s, train_cfg.checkpoint_every_epochs
        self.every_steps = train_cfg.checkpoint_every_steps
        self.min_interval_s = train_cfg.checkpoint_min_interval_s
        self.last_time = self.written_time = time.monotonic()
        self._held_best: Optional[dict] = None  # rank 0: a best epoch's payload not written yet
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._writer: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def due_at_step(self, step: int) -> bool:
        return ((self.every_steps is not None and step % self.every_steps == 0)
                or time.monotonic() - self.last_time >= self.every_s)

    def save_epoch_end(self, payload: Callable[[], dict], epoch: int, final: bool, improved: bool) -> None:
        """The checkpoints of an epoch's end, on every rank: ``last.pt`` when due, ``best.pt``
        when the epoch improved the monitored metric.

        Both wait until ``train.checkpoint_min_interval_s`` has passed since the last write
        (the final epoch's never waits): serialising and writing cost more than a whole epoch
        of a small model. A best epoch that waits is held in memory, a copy of its payload,
        and written with the next checkpoint, or by ``wait``. A process killed meanwhile
        resumes from the last written checkpoint and trains those epochs again.
        """
        now = time.monotonic()
        due = final or now - self.last_time >= self.every_s or epoch % self.every_epochs == 0
        waits = not final and now - self.written_time < self.min_interval_s
        due, waits = self.backend.any_rank(due, waits)  # a save gathers from every rank: all take one path
        if waits:
            if improved and self.folder is not None:
                content = payload()
                if self.backend.is_root:
                    self._held_best = _copy_tensors(content)
            return
        self.save(payload, last=due, best=improved)

    def save(self, payload: Callable[[], dict], last: bool = False, best: bool = False) -> None:
        """``last.pt`` and/or ``best.pt`` of ``payload()``, called on every rank (it gathers).
        A held best epoch goes to best.pt with it, unless this save is a newer best."""
        if last:
            self.last_time = time.monotonic()
        if not (last or best) or self.folder is None:
            return
        self.written_time = time.monotonic()
        content = payload()
        if not self.backend.is_root:
            return
        if best:
            self._held_best = None
        else:
            self._write_held_best()
        self._enqueue(serialize(content), last, best)

    def _write_held_best(self) -> None:
        held, self._held_best = self._held_best, None
        if held is not None:
            self._enqueue(serialize(held), False, True)

    def _enqueue(self, data: bytes, last: bool, best: bool) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_queued, name="hpctrain-checkpoint", daemon=True)
            self._writer.start()
        self._queue.put((data, last, best))

    def _write_queued(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                data, last, best = job
                if self._error is None:  # after a failed write, none that could replace a good file
                    if best:
                        write_checkpoint(self.folder / BEST, data)
                    if last:
                        write_checkpoint(self.folder / LAST, data, keep_previous=True, log=self.log)
            except BaseException as e:  # raised in the trainer's thread by wait()
                self._error = e
            finally:
                self._queue.task_done()

    def wait(self) -> None:
        """Block until every queued checkpoint, and a held best epoch, is on disk; raise the
        error of a failed write."""
        self._write_held_best()
        if self._writer is not None:
            self._queue.join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Write a held best epoch, wait for the writes, then end the writer thread (the error
        of a write is raised)."""
        self._write_held_best()
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        self.wait()

    def resume(self) -> tuple[Optional[str], Optional[dict]]:
        """(file name, payload) of the newest good checkpoint, on every rank; (None, None) if none."""
        name, payload = None, None
        if self.folder is not None:
            if self.backend.is_root:
                self.folder.mkdir(parents=True, exist_ok=True)
                remove_stale_temp_files(self.folder, log=self.log)  # left by a writer killed mid-save
                name, payload, _ = load_latest(self.folder, log=self.log)
            if self.backend.size > 1:
                name, payload = self.backend.broadcast_object((name, payload))
        return name, payload

    def best_weights(self) -> Optional[dict]:
        """The model state of ``best.pt`` on every rank, or None."""
        if self.folder is None:
            return None
        payload = None
        if self.backend.is_root:
            self.wait()
            _, payload, _ = load_latest(self.folder, names=(BEST,), log=self.log)
        if self.backend.size > 1:
            payload = self.backend.broadcast_object(payload)
        return payload["model"] if payload is not None else None


_NESTED = (torch.Tensor, dict, list, tuple)


def _copy_tensors(obj: Any) -> Any:
    """``obj`` with every tensor in it copied (on its device) and its containers rebuilt: a
    payload that training can no longer change. Scalars and strings, most of a payload's
    leaves, are taken as they are without a call each."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copy_tensors(v) if isinstance(v, _NESTED) else v for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_tensors(v) if isinstance(v, _NESTED) else v for v in obj)
    return obj


# ---------------------------------------------------------------------- RNG and gathering


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, NumPy, torch and CUDA generator states as plain types and tensors."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        # A tensor, not a list of 625 ints: a list costs a Python call per item to save and load.
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    state_ints = py["state"].tolist() if isinstance(py["state"], torch.Tensor) else py["state"]  # older checkpoints: a list
    random.setstate((py["version"], tuple(state_ints), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def gather_objects(backend, obj: Any) -> list:
    """Every rank's ``obj`` (plain types and tensors), in rank order, on every rank.

    Built on ``allreduce_sum`` alone: each rank serialises its object and writes the bytes
    into its own slice of a zero vector; the sum is every rank's bytes side by side.
    """
    if backend.size == 1:
        return [obj]
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    sizes = torch.zeros(backend.size, dtype=torch.float64)
    sizes[backend.rank] = len(data)
    sizes = backend.allreduce_sum(sizes).to(torch.int64).tolist()
    offsets = [sum(sizes[:r]) for r in range(backend.size)]
    full = torch.zeros(sum(sizes), dtype=torch.float64)
    full[offsets[backend.rank]:offsets[backend.rank] + len(data)] = data.to(torch.float64)
    full = backend.allreduce_sum(full).to(torch.uint8)
    return [torch.load(io.BytesIO(full[o:o + s].numpy().tobytes()), weights_only=True)
            for o, s in zip(offsets, sizes)]


def restore_rng(saved: list, rank: int, seed: int, step: int) -> None:
    """Rank r takes up rank r's RNG states of a checkpoint; a rank the checkpoint did not
    have seeds its own from the step, so that resuming twice from one checkpoint agrees."""
    if rank < len(saved):
        set_rng_state(saved[rank])
    else:
        seed_all(seed + 1000 * (rank + 1) + step)
