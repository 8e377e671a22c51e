"""``hpctrain run CONFIG [a.b=c ...] [--index I] [--sweep-dir DIR]``: one grid point, this process.

Under ``srun``/``mpirun`` every rank runs this same command; ranks come from the
environment and only rank 0 writes files.
"""
from __future__ import annotations

import argparse

from .. import exitcodes


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides such as optim.lr=0.01 or model.hidden=[128,128]; "
                        "overriding a swept key fixes it")
    p.add_argument("--index", type=int, default=0, help="grid point to train (default 0)")
    p.add_argument("--sweep-dir", default=None, help="sweep folder (default sweeps/<name>)")
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


def main(args: argparse.Namespace) -> int:
    from ..dist import discover
    from ..dist.backends import CollectiveError
    from ..errors import HpctrainError
    from ..launch.element import run_element
    from ..runner import check_data, pick, prepare_sweep

    is_root = discover().rank == 0
    overrides = list(args.overrides) + quick_check_overrides(args)
    sweep, raw, specs = prepare_sweep(args.config, overrides, args.sweep_dir, write=False)
    spec = pick(specs, args.index, args.config)
    check_data([spec], args.config)  # before anything is written
    if is_root:
        sweep.write(raw, specs)
        print(f"run {spec.index}/{len(specs)}: {spec.run_id} in {sweep.run_dir(spec.run_id)}", flush=True)
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
