"""Run one grid point: build every part from its config and record the outcome.

This is the one place that knows all the parts: rank environment, distributed
backend, dataset and loaders, model, trainer. The trainer knows nothing of Slurm
and the launcher knows nothing of models; both meet here.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

from .config import Config, ConfigError, read_raw
from .errors import DataError, HpctrainError
from .gcpolicy import settle
from .runstate import RunRecorder, RunState
from .sweep import RunSpec, SweepDir, default_sweep_dir, expand, load_sweep

Log = Callable[[str], None]


# --------------------------------------------------------------------------- sweep preparation


def prepare_sweep(config_path: str | Path, overrides: list[str] = (), sweep_dir: str | Path | None = None,
                  *, write: bool = True) -> tuple[SweepDir, dict, list[RunSpec]]:
    """Validate a config and its whole grid, then (when ``write``) lay out the sweep folder.

    Validation comes first, so a bad key or value fails before any file is written or any
    job submitted. The commands pass ``write=False``, make their own checks (data folders,
    the launch spec, the cluster's limits), and only then call ``sweep.write``. Writing never
    touches a run's results: only sweep.yaml and grid.jsonl (run folders are made when a run
    is submitted or starts).
    """
    raw, specs = load_sweep(config_path, list(overrides))
    sweep = SweepDir(sweep_dir if sweep_dir is not None else default_sweep_dir(specs[0].config))
    if write:
        sweep.write(raw, specs)
    return sweep, raw, specs


# Grid keys that decide where a point's data comes from.
_DATA_KEYS = ("data", "data.path", "data.synth")


def check_data(specs: list[RunSpec], source: str) -> None:
    """Every grid point's data.path holds a dataset (its meta.json), or data.synth makes one.

    Found here, before anything is written or submitted, rather than by every element once it
    runs. Paths are relative to the folder the command runs in, as the runs read them.
    """
    from .data.shards import META_FILE

    for spec in _one_per_data_source(specs):
        data = spec.config.data
        folder = Path(data.path)
        if data.synth is not None or (folder / META_FILE).is_file():
            continue
        found = "has no meta.json" if folder.is_dir() else "is not a folder" if folder.exists() else "does not exist"
        where = _grid_point(spec) if any(_is_data_key(k) for k in spec.params) else ""
        raise ConfigError(f"{source}: data.path: {data.path!r}: the folder {folder.absolute()} {found}; expected "
                          f"a dataset folder with {META_FILE}, made by `hpctrain data convert` or "
                          f"`hpctrain data synth`, or a data.synth section that makes it (relative paths start "
                          f"in the folder the command runs in){where}")


def _is_data_key(key: str) -> bool:
    return key in _DATA_KEYS or key.startswith("data.synth.")


def _one_per_data_source(specs: list[RunSpec]) -> list[RunSpec]:
    """The first grid point of each distinct data.path / data.synth setting (the base's when unswept)."""
    swept = [k for k in specs[0].params if _is_data_key(k)]  # every point sweeps the same keys
    if not swept:
        return specs[:1]
    first: dict[str, RunSpec] = {}
    for spec in specs:
        first.setdefault(json.dumps([spec.params[k] for k in swept], default=str), spec)
    return list(first.values())


def _grid_point(spec: RunSpec) -> str:
    shown = ", ".join(f"{k}={v!r}" for k, v in spec.params.items())
    return f" (in grid point {spec.index}: {shown})"


def load_prepared_sweep(sweep_dir: str | Path) -> tuple[SweepDir, list[RunSpec]]:
    """The run specs of an existing sweep folder, re-expanded from its sweep.yaml."""
    sweep = SweepDir(sweep_dir)
    if not sweep.config_path.exists():
        raise HpctrainError(f"{sweep.config_path}: not found; is {sweep.root} a sweep folder "
                            "(made by hpctrain run/submit/sbatch)?")
    raw = read_raw(sweep.config_path)
    return sweep, expand(raw, str(sweep.config_path))


def pick(specs: list[RunSpec], index: int, source: str = "the grid") -> RunSpec:
    if not 0 <= index < len(specs):
        raise HpctrainError(f"--index {index} is out of range: {source} has {len(specs)} point(s), "
                            f"indices 0..{len(specs) - 1}")
    return specs[index]


# --------------------------------------------------------------------------- building the parts


@dataclass
class Parts:
    """Everything one rank needs to train one grid point."""
    cfg: Config
    backend: Any
    train_loader: Any
    val_loader: Any
    test_loader: Any
    model: Any
    model_meta: dict


def scale_lr(cfg: Config, world_size: int, log: Log) -> Config:
    """Linear scaling rule (Goyal et al.): lr x world size, since the global batch grows with it."""
    if cfg.optim.lr_scaling != "linear" or world_size == 1:
        return cfg
    scaled = copy.deepcopy(cfg)
    scaled.optim.lr = cfg.optim.lr * world_size
    log(f"optim.lr_scaling: linear: lr {cfg.optim.lr:g} x {world_size} ranks = {scaled.optim.lr:g}")
    return scaled


def _set_threads(cfg: Config, local_size: int) -> None:
    import torch

    threads = cfg.train.threads
    if threads is None and local_size > 1:
        # Ranks on one node share its cores; oversubscribed BLAS threads slow every rank down.
        threads = max(1, (os.cpu_count() or 1) // local_size)
    if threads is not None:
        torch.set_num_threads(threads)


def _check_task(cfg: Config, meta: Any) -> None:
    if meta.task != cfg.data.task:
        raise DataError(f"{Path(cfg.data.path) / 'meta.json'}: the dataset's task is {meta.task!r} but "
                        f"data.task is {cfg.data.task!r}; expected them to match")


def make_run_backend(cfg: Config, log: Log = print) -> Any:
    """The distributed backend of ``cfg`` on this rank (only rank 0 logs the choice).

    Callers create it before the other parts and shut it down in a ``finally``: a part that
    fails to build must still leave the group (and abort the MPI job on a lost rank).
    """
    from .dist import discover, make_backend

    quiet = discover().rank != 0
    return make_backend(cfg.dist, device_preference=cfg.train.device, log=_quiet if quiet else log)


def build_parts(cfg: Config, *, log: Log = print, backend: Any = None) -> Parts:
    """Backend, data, loaders and model for ``cfg`` on this rank."""
    import torch

    from .data.integrity import verify_on_root
    from .data.loader import ShardLoader
    from .data.shards import open_dataset
    from .data.synthetic import ensure_synthetic
    from .dist import discover
    from .model import build_model

    env = discover()
    if backend is None:
        backend = make_run_backend(cfg, log)
    _set_threads(cfg, getattr(env, "local_size", 1))
    if cfg.data.synth is not None:
        if backend.is_root:
            ensure_synthetic(cfg.data)
        backend.barrier()
    dataset = open_dataset(cfg.data.path)
    verify_on_root(dataset, backend, log=log if backend.is_root else _quiet)  # sha256s; rank 0 hashes once
    _check_task(cfg, dataset.meta)
    cfg = scale_lr(cfg, backend.size, log if backend.is_root else _quiet)

    def loader(split: str):
        return ShardLoader.from_config(cfg.data, split, rank=backend.rank, world_size=backend.size,
                                       seed=cfg.seed, device=backend.device)

    train_loader, val_loader = loader("train"), loader("val")
    test_loader = loader("test") if cfg.train.evaluate_test and dataset.meta.rows.get("test", 0) > 0 else None
    meta = dataset.meta
    torch.manual_seed(cfg.seed)
    lsuv_batch = _first_batch(train_loader) if cfg.model.init == "lsuv" else None
    model = build_model(cfg.model, meta.task, meta.n_features, meta.n_classes, meta.n_targets, lsuv_batch=lsuv_batch,
                        feature_shape=meta.row_shape)
    model_meta = {"task": meta.task, "n_features": int(meta.n_features), "n_classes": int(meta.n_classes),
                  "n_targets": int(meta.n_targets), "standardize": bool(cfg.data.standardize),
                  "mean": [float(v) for v in meta.mean], "std": [float(v) for v in meta.std],
                  "feature_names": list(getattr(meta, "feature_names", []) or []),
                  "feature_shape": meta.row_shape, "class_names": list(meta.class_names)}
    return Parts(cfg, backend, train_loader, val_loader, test_loader, model, model_meta)


def _first_batch(loader: Any):
    loader.set_epoch(0)
    it = iter(loader)
    try:
        batch = next(it)
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
    return batch.x.cpu()


def _quiet(_msg: str) -> None:
    pass


# --------------------------------------------------------------------------- running


def run_spec(sweep: SweepDir, spec: RunSpec, *, stop_flag: Any = None, log: Log = print,
             overfit_batches: Optional[int] = None, job_id: Optional[str] = None) -> RunState:
    """Train one grid point on this rank and return its final state (the same status on every rank).

    ``job_id`` is the Slurm element running it, as the launch layer names it (None locally).
    """
    from .dist import discover

    is_root = discover().rank == 0
    recorder = _recorder(sweep, spec, overfit_batches, is_root)
    started = time.time()
    backend = None
    try:
        backend = make_run_backend(spec.config, log)
        parts = build_parts(spec.config, log=log, backend=backend)
        if is_root:
            recorder.running(total_epochs=spec.config.train.epochs, world_size=backend.size,
                             backend=backend.name, job_id=job_id,
                             global_batch=parts.train_loader.global_batch)
        # An error from a collective inside a step (DDP's allreduce in backward, Horovod's in
        # step) becomes a CollectiveError naming the rank that failed.
        with backend.collective_errors():
            rungs = _rung_book(sweep, spec, overfit_batches)
            result = _fit(parts, recorder, stop_flag, log, overfit_batches, rungs)
        if result.overfit_passed is not None and is_root:
            log(result.message)
        if result.overfit_passed is False:  # the check's verdict, recorded in its scratch folder
            result.status = "failed"
            if is_root:
                recorder.failed(result.message, result.wall_time_s)
        if is_root:
            log(f"run {spec.run_id}: {result.status}" + (f" ({result.message})" if result.message else ""))
    except Exception as exc:  # a failed run must be recorded, whatever failed
        plain = isinstance(exc, HpctrainError) or (backend is not None and backend.failure is not None)
        message = str(exc) if plain else f"{type(exc).__name__}: {exc}"
        if is_root:
            recorder.failed(message, time.time() - started)
        if not plain:  # an expected failure (bad input, a lost rank) is one line, printed by its owner
            log(traceback.format_exc())
        raise
    finally:
        if backend is not None:
            backend.shutdown()
        settle()  # full collections resume even where the run failed before its parts were built
    if is_root:
        return recorder.read() or RunState(status="failed", message="state.json unreadable after the run")
    return RunState(status=result.status, message=result.message, index=spec.index, run_id=spec.run_id)


def _recorder(sweep: SweepDir, spec: RunSpec, overfit_batches: Optional[int], is_root: bool) -> RunRecorder:
    """The run's own recorder, or one in a scratch folder for an overfit check."""
    if not overfit_batches:
        if is_root:
            sweep.prepare_run(spec)
        return sweep.recorder(spec)
    # A sanity check, not a result: it must neither resume from nor replace the run's files.
    run_dir = sweep.root / "overfit" / spec.run_id
    if is_root:
        shutil.rmtree(run_dir, ignore_errors=True)
    return RunRecorder(run_dir, index=spec.index, run_id=spec.run_id, params=spec.params)


def _rung_book(sweep: SweepDir, spec: RunSpec, overfit_batches: Optional[int]) -> Any:
    """The sweep's rung records for this run when it prunes (prune.kind: asha), else None."""
    if spec.config.prune.kind != "asha" or overfit_batches:
        return None
    from .prune import RungBook

    return RungBook(sweep.root, spec.run_id, spec.config)


def _fit(parts: Parts, recorder: RunRecorder, stop_flag: Any, log: Log, overfit_batches: Optional[int],
         rungs: Any = None):
    from .train.loop import Trainer
    from .train.overfit import OverfitCheck
    from .train.run_log import Throttled

    root = parts.backend.is_root
    check, on_epoch_end = None, _rung_judge(rungs, log) if rungs is not None else None
    if overfit_batches:
        check = OverfitCheck(overfit_batches, parts.cfg.data.task, parts.backend.size)
        cfg, train, val = check.setup(parts.cfg, parts.train_loader)
        parts = replace(parts, cfg=cfg, train_loader=train, val_loader=val, test_loader=None)
        on_epoch_end = check.on_epoch_end
    live = _live_tensorboard(parts.cfg, recorder, log) if root else None
    record = Throttled(recorder.report, parts.cfg.train.state_every_s)
    on_progress = (record if live is None else _both(record, live)) if root else None
    trainer = Trainer(parts.cfg, parts.model, parts.train_loader, parts.val_loader, parts.backend,
                      run_dir=recorder.run_dir, test_loader=parts.test_loader, stop_flag=stop_flag,
                      log=log if root else _quiet, model_meta=parts.model_meta, on_progress=on_progress,
                      on_epoch_end=on_epoch_end)
    settle()  # the heavy imports are done (the optimizer loads the last of them): see gcpolicy.py
    try:
        if check is None:
            return trainer.fit()
        check.start(trainer.evaluate)
        return check.judge(trainer.fit(), trainer.rows)
    finally:
        if live is not None:
            live.close()


def _rung_judge(rungs: Any, log: Log) -> Callable[[int, dict], Any]:
    """The trainer's on_epoch_end for successive halving: rank 0 asks the sweep's rung book."""
    from .train.loop import EndRun

    def judge(epoch: int, metrics: dict) -> Optional[EndRun]:
        decision = rungs.at_epoch_end(epoch, metrics)
        if decision is None:
            return None
        log(decision.message(rungs.metric))
        return None if decision.go_on else EndRun("pruned", decision.message(rungs.metric))
    return judge


def _live_tensorboard(cfg: Config, recorder: RunRecorder, log: Log):
    """TensorBoard events in the run folder each epoch (``train.tensorboard``), fed by the
    same progress reports as the recorder, after it."""
    if not cfg.train.tensorboard:
        return None
    from .report.live_tb import LiveTensorBoard

    return LiveTensorBoard(recorder.run_dir, log)


def _both(first: Callable, second: Callable) -> Callable:
    def report(progress: Any) -> None:
        first(progress)
        second(progress)
    return report
