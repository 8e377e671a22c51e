"""``hpctrain run CONFIG [a.b=c ...] [--index I] [--sweep-dir DIR]``: one grid point, this process.

Under ``srun``/``mpirun`` every rank runs this same command; ranks come from the
environment and only rank 0 writes files.

Where the run goes: a debug run (no ``--sweep-dir``) trains in a scratch sweep,
``sweeps/<name>/debug``, replaced by the next debug run of the same point, so that the
sweep that ``submit`` fills never adopts a run trained another way (on fewer ranks, with
other overrides). A Slurm array element (``SLURM_ARRAY_TASK_ID`` set: jobs/*.sbatch, the
rendered scripts) and ``--into-sweep`` write into ``sweeps/<name>`` itself, and only when
this run has the ranks, hence the global batch, of the sweep's elements. ``--sweep-dir
DIR`` writes into DIR, the folder its caller named.
"""
from __future__ import annotations

import argparse
import os
import shutil

from .. import exitcodes
from ..errors import HpctrainError


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides such as optim.lr=0.01 or model.hidden=[128,128]; "
                        "overriding a swept key fixes it")
    p.add_argument("--index", type=int, default=0, help="grid point to train (default 0)")
    p.add_argument("--sweep-dir", default=None,
                   help="sweep folder to write the run into (default: the scratch sweep sweeps/<name>/debug)")
    p.add_argument("--into-sweep", action="store_true",
                   help="write into the sweep sweeps/<name> itself, as its element would (the ranks must "
                        "be the sweep's slurm.nodes x slurm.tasks_per_node)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (quick check)")
    p.add_argument("--limit-rows", type=int, default=None, help="use only the first N rows of each split")
    p.add_argument("--overfit-batches", type=int, default=None, metavar="N",
                   help="train on N fixed batches and report whether the model can fit them")


def quick_check_overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if args.max_steps is not None:
        extra.append(f"train.max_steps={args.max_steps}")
    if args.limit_rows is not None:
        extra.append(f"data.limit_rows={args.limit_rows}")
    return extra


def check_element_scale(spec, world_size: int, source: str) -> None:
    """A run enters its sweep only with the global batch of the sweep's elements (and, unless
    data.global_batch_size fixes the global batch, with their ranks)."""
    from ..data.loader import rank_batch_size

    data, slurm = spec.config.data, spec.config.slurm
    ranks = slurm.nodes * slurm.tasks_per_node
    mine, theirs = rank_batch_size(data, world_size) * world_size, rank_batch_size(data, ranks) * ranks
    if mine != theirs:
        raise HpctrainError(
            f"{source}: this run has {world_size} rank(s) (global batch {mine}) but the sweep's "
            f"elements have slurm.nodes x slurm.tasks_per_node = {ranks} (global batch {theirs}); "
            f"run it under `mpirun -np {ranks}` or `srun -n {ranks}`, or leave out --into-sweep to train "
            "it in the scratch sweep")


def main(args: argparse.Namespace) -> int:
    from ..gcpolicy import defer_full_collections

    defer_full_collections()  # until the runner has built the run's parts (gcpolicy.py)
    from ..dist import discover
    from ..dist.backends import CollectiveError
    from ..launch.element import run_element
    from ..runner import check_data, pick, prepare_sweep
    from ..sweep import SweepDir

    if args.overfit_batches is not None and args.overfit_batches < 1:
        raise HpctrainError(f"--overfit-batches: {args.overfit_batches}; expected a number of batches >= 1")
    env = discover()
    is_root = env.rank == 0
    overrides = list(args.overrides) + quick_check_overrides(args)
    sweep, raw, specs = prepare_sweep(args.config, overrides, args.sweep_dir, write=False)
    spec = pick(specs, args.index, args.config)
    check_data([spec], args.config)  # before anything is written
    scratch = args.sweep_dir is None and not (args.into_sweep or os.environ.get("SLURM_ARRAY_TASK_ID"))
    if scratch:
        sweep = SweepDir(sweep.root / "debug")
    elif args.sweep_dir is None:
        check_element_scale(spec, env.world_size, args.config)
    if is_root:
        if scratch:
            shutil.rmtree(sweep.run_dir(spec.run_id), ignore_errors=True)  # a debug run starts afresh
        sweep.write(raw, specs, replace=scratch)
        where = "scratch sweep (not part of the submitted sweep)" if scratch else "sweep"
        print(f"run {spec.index}/{len(specs)}: {spec.run_id} in {sweep.run_dir(spec.run_id)} ({where})", flush=True)
    try:
        state = run_element(sweep, spec, max_requeues=spec.config.slurm.max_requeues,
                            overfit_batches=args.overfit_batches, log=lambda m: print(m, flush=True))
    except HpctrainError:
        raise
    except CollectiveError:  # the message is logged and recorded; another rank died or hung
        return exitcodes.RANK_LOST
    except Exception:  # already logged with its traceback and recorded as failed
        return exitcodes.FAILED
    return exitcodes.for_status(state.status)
