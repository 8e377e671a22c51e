"""The ``hpctrain`` command.

Each subcommand lives in the module that owns its concern; that module exposes
``configure(parser)`` to add its arguments and ``main(args) -> int`` to run it.
Modules keep heavy imports (torch, h5py) inside their functions so ``--help`` is quick.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import exitcodes
from .errors import HpctrainError

# name -> (module, one-line description)
COMMANDS = {
    "run": ("hpctrain.commands.run", "train one grid point in this process (debugging, or one rank under srun/mpirun)"),
    "submit": ("hpctrain.launch.cli_submit", "submit the whole grid as one Slurm job array (or run it locally)"),
    "sbatch": ("hpctrain.launch.cli_sbatch", "write a self-contained sbatch script for the grid"),
    "status": ("hpctrain.launch.cli_status", "show the state of every run of a sweep"),
    "collect": ("hpctrain.collect", "aggregate a sweep: summary table, curves, plots, leaderboard, best model"),
    "data": ("hpctrain.data.cli", "HDF5 datasets: convert, synth, inspect"),
    "lr-find": ("hpctrain.commands.lr_find", "learning-rate range test: loss against an increasing LR"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpctrain",
        description="Grid-search neural networks on Slurm clusters: one YAML config with a grid "
                    "becomes one job array; each element trains data-parallel over MPI from HDF5 shards.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary)
        module = importlib.import_module(module_name)
        module.configure(p)
        p.set_defaults(_module=module_name)
    return parser


def _version() -> str:
    from . import __version__
    return f"hpctrain {__version__}"


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; ``KEY=VALUE`` overrides may also follow the options.

    argparse takes a command's positional overrides only before its first option, so
    ``hpctrain run c.yaml --index 0 train.epochs=200`` would be refused; such trailing
    overrides join the others, in order.
    """
    args, extra = parser.parse_known_args(argv)
    trailing = [a for a in extra if "=" in a and not a.startswith("-")]
    if extra != trailing or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if trailing:
        args.overrides = list(args.overrides) + trailing
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except HpctrainError as e:
        print(f"hpctrain {args.command}: error: {e}", file=sys.stderr)
        return exitcodes.USAGE
    except KeyboardInterrupt:
        print(f"hpctrain {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`hpctrain status ... | head`): not an error of ours.
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
