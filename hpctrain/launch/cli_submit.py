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

from .. import exitcodes
from ..plan import RERUN_CHOICES
from ..plan import short as _short
from .lock import SweepLock


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file with a grid")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. slurm.partition=gpu")
    p.add_argument("--executor", choices=("auto", "slurm", "local", "debug"), default="auto",
                   help="slurm: one job array; local: elements as local processes (mpirun for several "
                        "tasks); debug: one after the other in this process. auto (default): slurm when "
                        "a cluster answers, else local")
    p.add_argument("--sweep-dir", default=None, help="sweep folder (default sweeps/<name>)")
    p.add_argument("--rerun", choices=RERUN_CHOICES, default="none",
                   help="also run finished runs: failed ones resume from their checkpoints, pruned ones go on "
                        "from theirs (promoted at the rung that stopped them), diverged/all start again from "
                        "scratch (the old folder is kept under replaced/)")
    p.add_argument("--only", type=_indices, default=None, metavar="I,J,...",
                   help="run only these grid points, finished ones again (failed ones resume, others "
                        "start from scratch with the old folder kept under replaced/)")
    p.add_argument("--extend-epochs", type=int, default=None, metavar="N",
                   help="train.epochs=N: finished runs continue from last.pt to N epochs where their "
                        "schedule allows it (the plan names those that cannot)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what the submit would do (runs, skips, sweep changes) and the sbatch script")
    p.add_argument("--no-collect", action="store_true", help="no dependent `hpctrain collect` job")


def _indices(text: str) -> list[int]:
    try:
        return sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected grid indices such as 3,7") from None


def main(args: argparse.Namespace) -> int:
    from ..plan import make_plan
    from ..runner import check_data, prepare_sweep
    from . import slurm

    overrides = list(args.overrides)
    if args.extend_epochs is not None:
        overrides.append(f"train.epochs={args.extend_epochs}")
    sweep, raw, specs = prepare_sweep(args.config, overrides, args.sweep_dir, write=False)
    cfg = specs[0].config
    check_data(specs, args.config)
    executor = slurm.resolve_executor(args.executor)
    queued = slurm.queued_job_ids() if executor == "slurm" else None
    plan = make_plan(sweep, raw, specs, rerun=args.rerun, queued=queued, only=args.only)
    _check_executor(executor, cfg, sweep, len(plan.indices), len(specs))
    if args.dry_run:
        return _dry_run(cfg, sweep, specs, plan, executor)
    with SweepLock(sweep.root):
        return _submit_locked(args, sweep, raw, specs, executor)


def _submit_locked(args: argparse.Namespace, sweep, raw, specs, executor: str) -> int:
    """Lay out the sweep and submit what is unfinished, holding the sweep's lock."""
    from ..plan import apply_evolution, apply_promotions, make_plan, set_aside
    from . import slurm

    cfg = specs[0].config
    # Planned again under the lock: a submit that waited for another finds the runs it queued.
    queued = slurm.queued_job_ids() if executor == "slurm" else None
    plan = make_plan(sweep, raw, specs, rerun=args.rerun, queued=queued, only=args.only)
    apply_evolution(sweep, specs, plan)
    apply_promotions(sweep, specs, plan)
    sweep.write(raw, specs, replace=plan.changes_sweep)
    for line in plan.describe():
        print(line)
    _report_skipped(plan, len(specs))
    if not plan.indices:
        print(f"nothing to submit: all {len(specs)} run(s) of {sweep.root} are finished or queued "
              "(--rerun failed|diverged|pruned|all or --only I,J to run some again)")
        return 0
    for index in plan.fresh:
        moved = set_aside(sweep, specs[index])
        print(f"run {index} ({specs[index].run_id}): starting again; previous results kept in {moved}")
    print(f"sweep {cfg.name}: {len(plan.indices)} of {len(specs)} grid point(s) to run, "
          f"{cfg.slurm.nodes * cfg.slurm.tasks_per_node} task(s) each, executor {executor}")
    if executor == "slurm":
        return _submit_slurm(cfg, sweep, specs, plan.indices, collect=not args.no_collect)
    return _run_here(executor, cfg, sweep, specs, plan.indices, collect=not args.no_collect)


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


def _dry_run(cfg, sweep, specs, selection, executor: str) -> int:
    from . import slurm
    from .sbatch import render_array_script

    print(f"# sweep {cfg.name} in {sweep.root}: {len(specs)} grid point(s); would run {len(selection.indices)} "
          f"with executor {executor}")
    for line in selection.describe():
        print(f"# would {line}")
    for reason, indices in selection.skipped.items():
        print(f"# would skip {len(indices)} run(s) {reason}: {_short(indices)}")
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
    print(slurm.describe_arrays(submission, cfg.slurm.array_parallelism))
    if collect:
        submission.collector_id = slurm.submit_collector(cfg, sweep, submission.array_ids)
        print(f"collector job {submission.collector_id} runs `hpctrain collect` after the array(s) end")
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
        failed = [i for i, status in outcome.items() if exitcodes.for_status(status) != exitcodes.OK]
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
