"""``hpctrain submit CONFIG [a.b=c ...]``: the grid as one Slurm job array (or local processes).

Validation first: the config, every grid point, the data folders, the launch spec and the
cluster's limits are checked before anything is written; then the sweep folder is laid out
and the grid submitted. Submitting a sweep again runs only what is not finished.

One submitter at a time: the sweep's lock (launch/lock.py) is held from laying out the
folder until every job id is recorded (with a local executor, until the elements end); a
second submit waits for it, then finds those runs queued.
"""
from __future__ import annotations

import argparse
import json
import sys

from .lock import SweepLock


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file with a grid")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. slurm.partition=gpu")
    p.add_argument("--executor", choices=("auto", "slurm", "local", "debug"), default="auto",
                   help="slurm: one job array; local: elements as local processes (mpirun for several "
                        "tasks); debug: one after the other in this process. auto (default): slurm when "
                        "a cluster answers, else local")
    p.add_argument("--sweep-dir", default=None, help="sweep folder (default sweeps/<name>)")
    p.add_argument("--rerun", choices=("none", "failed", "diverged", "all"), default="none",
                   help="also run finished runs: failed ones resume from their checkpoints, diverged/all "
                        "start again from scratch (the old folder is kept under replaced/)")
    p.add_argument("--dry-run", action="store_true", help="print the grid and the sbatch script; submit nothing")
    p.add_argument("--no-collect", action="store_true", help="no dependent `hpctrain collect` job")


def main(args: argparse.Namespace) -> int:
    from ..runner import check_data, prepare_sweep
    from . import slurm

    sweep, raw, specs = prepare_sweep(args.config, list(args.overrides), args.sweep_dir, write=False)
    cfg = specs[0].config
    check_data(specs, args.config)
    executor = slurm.resolve_executor(args.executor)
    queued = slurm.queued_job_ids() if executor == "slurm" else None
    selection = slurm.select_runs(sweep, specs, args.rerun, queued)
    _check_executor(executor, cfg, sweep, len(selection.indices), len(specs))
    if args.dry_run:
        return _dry_run(cfg, sweep, specs, selection, executor)
    with SweepLock(sweep.root):
        return _submit_locked(args, sweep, raw, specs, executor)


def _submit_locked(args: argparse.Namespace, sweep, raw, specs, executor: str) -> int:
    """Lay out the sweep and submit what is unfinished, holding the sweep's lock."""
    from . import slurm

    cfg = specs[0].config
    sweep.write(raw, specs)
    # Selected again under the lock: a submit that waited for another finds the runs it queued.
    queued = slurm.queued_job_ids() if executor == "slurm" else None
    selection = slurm.select_runs(sweep, specs, args.rerun, queued)
    _report_skipped(selection, len(specs))
    if not selection.indices:
        print(f"nothing to submit: all {len(specs)} run(s) of {sweep.root} are finished or queued "
              "(--rerun failed|diverged|all to run some again)")
        return 0
    for index in selection.fresh:
        moved = slurm.set_aside(sweep, specs[index])
        print(f"run {index} ({specs[index].run_id}): starting again; previous results kept in {moved}")
    print(f"sweep {cfg.name}: {len(selection.indices)} of {len(specs)} grid point(s) to run, "
          f"{cfg.slurm.nodes * cfg.slurm.tasks_per_node} task(s) each, executor {executor}")
    if executor == "slurm":
        return _submit_slurm(cfg, sweep, specs, selection.indices, collect=not args.no_collect)
    return _run_here(executor, cfg, sweep, specs, selection.indices, collect=not args.no_collect)


def _check_executor(executor: str, cfg, sweep, elements: int, grid_size: int) -> None:
    """What the executor would refuse once the sweep folder is written, found before it is."""
    from . import local, slurm

    if executor == "slurm":
        slurm.check_submission(cfg, sweep, elements, grid_size)
    elif executor == "local":
        # Raises when elements of several tasks need mpirun and there is none on PATH.
        local.element_command(sweep.root, 0, cfg.slurm.nodes * cfg.slurm.tasks_per_node)


def _report_skipped(selection, total: int) -> None:
    for reason, indices in selection.skipped.items():
        print(f"skipping {len(indices)} run(s) {reason}: {_short(indices)}")


def _short(indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:20]))
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > 20 else "")


def _dry_run(cfg, sweep, specs, selection, executor: str) -> int:
    from . import slurm
    from .sbatch import render_array_script

    print(f"# sweep {cfg.name} in {sweep.root}: {len(specs)} grid point(s); would run {len(selection.indices)} "
          f"with executor {executor}")
    chosen = set(selection.indices)  # a list lookup per point would make a large grid quadratic
    sys.stdout.write("".join(f"# {'run ' if spec.index in chosen else 'skip'} {spec.index:4d} {spec.run_id}  "
                             f"{json.dumps(spec.params, sort_keys=True)}\n" for spec in specs))
    if not selection.indices:
        return 0
    if executor == "slurm":
        print(f"# the job array script (submitit, {len(selection.indices)} element(s)):")
        sys.stdout.write(slurm.array_script(cfg, sweep, len(selection.indices)))
    else:
        print("# the equivalent sbatch script (as `hpctrain sbatch` writes it):")
        sys.stdout.write(render_array_script(cfg, sweep_dir=sweep.root, config_path=sweep.config_path,
                                             indices=selection.indices))
    return 0


def _submit_slurm(cfg, sweep, specs, indices: list[int], *, collect: bool) -> int:
    from . import slurm

    submission = slurm.submit_array(cfg, sweep, specs, indices)
    print(f"submitted job array {submission.array_id} ({len(indices)} element(s), at most "
          f"{min(cfg.slurm.array_parallelism, len(indices))} at once)")
    if collect:
        submission.collector_id = slurm.submit_collector(cfg, sweep, submission.array_id)
        print(f"collector job {submission.collector_id} runs `hpctrain collect` after the array ends")
    slurm.record_submission(sweep, "slurm", specs, indices, submission)
    print(f"sweep folder: {sweep.root}")
    print(slurm.watch_hint(sweep, submission))
    return 0


def _run_here(executor: str, cfg, sweep, specs, indices: list[int], *, collect: bool) -> int:
    from . import local, slurm

    slurm.record_submission(sweep, executor, specs, indices, None)
    print(f"sweep folder: {sweep.root}  (watch it: hpctrain status {sweep.root})")
    if executor == "debug":
        outcome = local.run_debug(sweep, indices)
        failed = [i for i, status in outcome.items() if status not in ("done", "diverged")]
    else:
        codes = local.run_local(sweep, indices, tasks=cfg.slurm.nodes * cfg.slurm.tasks_per_node,
                                parallelism=cfg.slurm.array_parallelism)
        failed = [i for i, code in codes.items() if code != 0]
    if collect:
        _collect(sweep)
    if failed:
        print(f"{len(failed)} run(s) did not finish: {_short(sorted(failed))}; see hpctrain status {sweep.root}")
        return 1
    return 0


def _collect(sweep) -> None:
    import subprocess

    result = subprocess.run([sys.executable, "-m", "hpctrain", "collect", str(sweep.root)], timeout=3600)
    if result.returncode != 0:
        print(f"hpctrain collect {sweep.root} ended with status {result.returncode}", file=sys.stderr)
