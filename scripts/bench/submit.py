"""Submitting a 1000-point grid: one job array (submitit) vs 1000 single sbatch submissions.

Both on the same cluster in the same run, every job submitted held (--hold) and cancelled
right after, so nothing runs. Needs a cluster: scripts/local-slurm.sh start, then
export SLURM_CONF=... .

    .venv/bin/python scripts/bench/submit.py [--points 1000]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from hpctrain.launch.slurm import executor_for, slurm_available
from hpctrain.launch.worker import Worker
from hpctrain.runner import prepare_sweep


def make_sweep(folder: Path, points: int):
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "bench.yaml"
    config.write_text(yaml.safe_dump({"name": "bench-submit", "slurm": {"tasks_per_node": 2, "time_min": 10,
                                                                        "array_parallelism": 64},
                                      "grid": {"seed": list(range(points))}}))
    return prepare_sweep(config, [], folder / "sw")


def submit_array(folder: Path, points: int) -> tuple[float, float, str]:
    """(seconds to prepare the sweep folder, seconds to submit the array, array id)."""
    t0 = time.perf_counter()
    sweep, _raw, specs = make_sweep(folder, points)
    t1 = time.perf_counter()
    cfg = specs[0].config
    executor = executor_for(cfg, sweep)
    executor.update_parameters(additional_parameters={"requeue": True, "hold": True})
    worker = Worker(str(sweep.root), cfg.slurm.max_requeues)
    with executor.batch():
        jobs = [executor.submit(worker, spec.index) for spec in specs]
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, jobs[0].job_id.split("_")[0]


def submit_script_array(folder: Path, points: int) -> tuple[float, str]:
    """The `hpctrain sbatch` path: one rendered script with --array, one sbatch call."""
    from hpctrain.launch.sbatch import render_array_script

    sweep, _raw, specs = make_sweep(folder / "script", points)
    script = folder / "array.sbatch"
    script.write_text(render_array_script(specs[0].config, sweep_dir=sweep.root, config_path=sweep.config_path,
                                          indices=range(points)))
    t0 = time.perf_counter()
    out = subprocess.run(["sbatch", "--parsable", "--hold", str(script)], capture_output=True, text=True,
                         timeout=60, check=True)
    return time.perf_counter() - t0, out.stdout.strip().split(";")[0]


def submit_singles(folder: Path, points: int) -> tuple[float, list[str]]:
    """One sbatch per grid point, the way a shell loop over the grid would submit it."""
    script = folder / "single.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --ntasks-per-node=2\n#SBATCH --time=10\n"
                      f"#SBATCH --output={folder}/single-%j.out\nsrun true\n")
    ids = []
    t0 = time.perf_counter()
    for index in range(points):
        out = subprocess.run(["sbatch", "--parsable", "--hold", f"--job-name=bench-single-{index}", str(script)],
                             capture_output=True, text=True, timeout=60, check=True)
        ids.append(out.stdout.strip().split(";")[0])
    return time.perf_counter() - t0, ids


def cancel(ids: list[str]) -> None:
    for start in range(0, len(ids), 200):
        subprocess.run(["scancel", *ids[start:start + 200]], capture_output=True, timeout=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=1000)
    args = p.parse_args()
    if not slurm_available():
        print("no Slurm cluster answers; run scripts/local-slurm.sh start and export SLURM_CONF", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="hpctrain-bench-submit-") as tmp:
        folder = Path(tmp)
        prep_s, array_s, array_id = submit_array(folder, args.points)
        cancel([array_id])
        script_s, script_id = submit_script_array(folder, args.points)
        cancel([script_id])
        singles_s, ids = submit_singles(folder, args.points)
        cancel(ids)
    print(f"grid points:                         {args.points}")
    print(f"sweep folder preparation:            {prep_s:7.2f} s  (validation, sweep.yaml, grid.jsonl)")
    print(f"one job array (submitit, held):      {array_s:7.2f} s")
    print(f"one job array (hpctrain sbatch script): {script_s:5.2f} s")
    print(f"{args.points} single sbatch submissions:   {singles_s:7.2f} s")
    print(f"ratio single/array (submitit):       {singles_s / array_s:7.1f}x  (goal >= 20x, array < 5 s)")
    print(f"ratio single/array (sbatch script):  {singles_s / script_s:7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
