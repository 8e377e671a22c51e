"""``hpctrain sbatch CONFIG -o jobs/NAME.sbatch``: a self-contained job array script.

For users who submit with ``sbatch`` themselves. The config, the grid, the data folders and
the script are checked first; then the sweep folder is laid out (the script runs the
sweep.yaml written there).
"""
from __future__ import annotations

import argparse
import os
import sys


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file with a grid")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("-o", "--output", default=None, help="script to write (default: print it)")
    p.add_argument("--sweep-dir", default=None, help="sweep folder (default sweeps/<name>)")
    p.add_argument("--python", default=None,
                   help="Python with hpctrain installed, as the compute nodes see it (default: this one)")


def main(args: argparse.Namespace) -> int:
    from ..fsutil import atomic_write_text
    from ..runner import check_data, prepare_sweep
    from . import slurm
    from .lock import SweepLock
    from .sbatch import render_array_script

    sweep, raw, specs = prepare_sweep(args.config, list(args.overrides), args.sweep_dir, write=False)
    cfg = specs[0].config
    check_data(specs, args.config)
    if slurm.slurm_available():  # the array's indices are the grid's: 0..N-1
        slurm.check_array_limit(len(specs), len(specs))
    script = render_array_script(cfg, sweep_dir=sweep.root, config_path=sweep.config_path,
                                 indices=range(len(specs)), python=args.python)
    with SweepLock(sweep.root):
        sweep.write(raw, specs)
    (sweep.root / "logs").mkdir(parents=True, exist_ok=True)
    if args.output is None:
        sys.stdout.write(script)
        return 0
    atomic_write_text(args.output, script)
    os.chmod(args.output, 0o755)
    print(f"wrote {args.output}: job array of {len(specs)} grid point(s), sweep folder {sweep.root}")
    print(f"submit it with: sbatch {args.output}    watch it with: hpctrain status {sweep.root}")
    return 0
