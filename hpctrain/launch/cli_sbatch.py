"""``hpctrain sbatch CONFIG -o jobs/NAME.sbatch``: a self-contained job array script.

For users who submit with ``sbatch`` themselves. The config, the grid, the data folders and
the script are checked first; then the sweep folder is laid out (the script runs the
sweep.yaml written there). A grid past the cluster's MaxArraySize gets one script per
array (``NAME-1.sbatch``, ``NAME-2.sbatch``, ...), each with its index offset.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file with a grid")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("-o", "--output", default=None,
                   help="script to write (default: print it); NAME-1.sbatch, NAME-2.sbatch, ... when the grid "
                        "needs several arrays")
    p.add_argument("--sweep-dir", default=None, help="sweep folder (default sweeps/<name>)")
    p.add_argument("--python", default=None,
                   help="Python with hpctrain installed, as the compute nodes see it (default: this one)")


def part_paths(output: str, parts: int) -> list[Path]:
    path = Path(output)
    if parts == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{k}{path.suffix}") for k in range(1, parts + 1)]


def main(args: argparse.Namespace) -> int:
    from ..errors import HpctrainError
    from ..fsutil import atomic_write_text
    from ..plan import apply_evolution, make_plan
    from ..runner import check_data, prepare_sweep
    from . import limits, slurm
    from .lock import SweepLock
    from .sbatch import render_array_script

    sweep, raw, specs = prepare_sweep(args.config, list(args.overrides), args.sweep_dir, write=False)
    cfg = specs[0].config
    check_data(specs, args.config)
    found = slurm.check_array_limit(len(specs), len(specs)) if slurm.slurm_available() else limits.Limits()
    chunks = limits.split(range(len(specs)), found.max_array_size)
    if len(chunks) > 1 and args.output is None:
        raise HpctrainError(f"the sweep has {len(specs)} grid point(s), more than this cluster's MaxArraySize of "
                            f"{found.max_array_size}: it needs {len(chunks)} job arrays; give -o FILE to write "
                            "one script per array")
    scripts = [render_array_script(cfg, sweep_dir=sweep.root, config_path=sweep.config_path, indices=chunk.indices,
                                   python=args.python, offset=chunk.offset,
                                   part=f" (array {k} of {len(chunks)})" if len(chunks) > 1 else "")
               for k, chunk in enumerate(chunks, 1)]
    with SweepLock(sweep.root):
        # The same rules as submit for a sweep folder that holds another version of the sweep.
        queued = slurm.queued_job_ids() if slurm.slurm_available() else None
        plan = make_plan(sweep, raw, specs, queued=queued)
        apply_evolution(sweep, specs, plan)
        sweep.write(raw, specs, replace=plan.changes_sweep)
    for line in plan.describe():
        print(line, file=sys.stderr)
    (sweep.root / "logs").mkdir(parents=True, exist_ok=True)
    if args.output is None:
        sys.stdout.write(scripts[0])
        return 0
    paths = part_paths(args.output, len(scripts))
    for path, script in zip(paths, scripts):
        atomic_write_text(path, script)
        os.chmod(path, 0o755)
    _instructions(paths, chunks, len(specs), sweep.root, found.max_array_size)
    return 0


def _instructions(paths, chunks, grid_size: int, sweep_root, max_array_size) -> None:
    if len(paths) == 1:
        print(f"wrote {paths[0]}: job array of {grid_size} grid point(s), sweep folder {sweep_root}")
        print(f"submit it with: sbatch {paths[0]}    watch it with: hpctrain status {sweep_root}")
        return
    print(f"wrote {len(paths)} scripts, one job array each (this cluster's MaxArraySize is {max_array_size}); "
          f"{grid_size} grid point(s) in all, sweep folder {sweep_root}:")
    for path, chunk in zip(paths, chunks):
        print(f"  {path}: grid points {chunk.indices[0]}-{chunk.indices[-1]}")
    print("submit them all with:  " + "; ".join(f"sbatch {p}" for p in paths))
    print(f"watch them with: hpctrain status {sweep_root}")
