"""A 100,000-point grid: `hpctrain submit --dry-run` and laying out its sweep folder.

Both against a floor measured in the same run: json-dumping the grid's 100,000 param dicts
(what grid.jsonl and the dry run print must do at the least). Each figure is the best of
``--repeats`` runs; the machine is shared, so the ratios are the figures to compare.

    .venv/bin/python scripts/bench/large_grid.py [--executor local|slurm] [--repeats 3]

Also printed, for scale: what validating every point in full and making a run folder per
point (a durable state.json each) would cost, extrapolated from 1,000 points.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from hpctrain.config import build_config, set_dotted
from hpctrain.runner import prepare_sweep
from hpctrain.sweep import SweepDir, expand_grid

AXES = {  # 10 x 10 x 10 x 10 x 10 = 100,000 points
    "optim.lr": [round(0.1 * i, 1) for i in range(1, 11)],
    "optim.weight_decay": [round(0.01 * i, 2) for i in range(10)],
    "model.dropout": [round(0.05 * i, 2) for i in range(10)],
    "model.hidden": [[8 * i] for i in range(1, 11)],
    "seed": list(range(10)),
}


def write_config(folder: Path) -> Path:
    raw = {"name": "bench-large-grid", "data": {"path": "data/bench", "synth": {"rows": 100}}, "grid": AXES}
    path = folder / "large.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def floor(params: list[dict]) -> None:
    for p in params:
        json.dumps(p, sort_keys=True)


def dry_run(config: Path, executor: str, cwd: Path) -> None:
    """The command as a user runs it: a new interpreter, the whole grid printed."""
    result = subprocess.run([sys.executable, "-m", "hpctrain", "submit", str(config), "--dry-run",
                             "--executor", executor], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"hpctrain submit --dry-run failed: {result.stderr}")


def layout(config: Path, folder: Path) -> None:
    """Validate the config and its grid, then write sweep.yaml and grid.jsonl."""
    prepare_sweep(config, [], folder / f"sw-{time.perf_counter_ns()}")


def per_point_costs(config: Path, folder: Path, sample: int = 1000) -> tuple[float, float]:
    """Seconds per point of a full validation and of a run folder with its durable pending state."""
    sweep, raw, specs = prepare_sweep(config, [], folder / "sample", write=False)
    specs = specs[:sample]
    base = {k: v for k, v in raw.items() if k != "grid"}
    start = time.perf_counter()
    for spec in specs:  # each point's whole config built and validated, as every point once was
        point = copy.deepcopy(base)
        for key, value in spec.params.items():
            set_dotted(point, key, value)
        build_config(point)
    full = (time.perf_counter() - start) / len(specs)
    start = time.perf_counter()
    for spec in specs:
        sweep.prepare_run(spec)
    folders = (time.perf_counter() - start) / len(specs)
    return full, folders


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="slurm also asks the cluster (squeue, scontrol) and renders submitit's script")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="hpctrain-bench-large-") as tmp:
        folder = Path(tmp)
        config = write_config(folder)
        params = expand_grid(yaml.safe_load(config.read_text()))
        points = len(params)
        floor_s = best_of(args.repeats, lambda: floor(params))
        dry_s = best_of(args.repeats, lambda: dry_run(config, args.executor, folder))
        layout_s = best_of(args.repeats, lambda: layout(config, folder))
        floor2_s = best_of(args.repeats, lambda: floor(params))  # the floor again, after: load may change
        base = min(floor_s, floor2_s)
        full_s, folder_s = per_point_costs(config, folder)
        sweep = SweepDir(next(folder.glob("sw-*")))
        assert len(sweep.records()) == points and not (sweep.root / "runs").exists()
    print(f"grid points:                              {points:,}")
    print(f"floor: json.dumps of every param dict:    {base:6.2f} s  (best of {args.repeats}, before and after)")
    print(f"submit --dry-run (--executor {args.executor}):    {dry_s:6.2f} s  = {dry_s / base:5.1f}x the floor  "
          f"(goal < 5 s; a new interpreter, imports included)")
    print(f"lay out the sweep (validate + write):     {layout_s:6.2f} s  = {layout_s / base:5.1f}x the floor  "
          f"(goal < 20 s; sweep.yaml + grid.jsonl)")
    print(f"for scale, per point x {points:,} (from 1,000 points):")
    print(f"  every point validated in full:          {full_s * points:6.1f} s  ({full_s * 1e6:.0f} us a point)")
    print(f"  a run folder + durable state.json each: {folder_s * points:6.1f} s  ({folder_s * 1e3:.2f} ms a point)")
    print(f"machine load (1 min): {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
