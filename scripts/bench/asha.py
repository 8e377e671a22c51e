"""Successive halving and random search against the plain grid, measured in one run.

1. ASHA: a 27-point grid (3 lr x 3 widths x 3 weight decays, 27 epochs each) on a synthetic
   task, once in full and once with ``prune: {kind: asha, min_epochs: 3, reduction: 3}``
   (rungs at epochs 3 and 9; ``--min-epochs``).
   Printed: the epochs the ASHA sweep trained as a fraction of the full sweep's (goal <= 0.35),
   and its best run's monitored value against the full sweep's best (goal: same run, or
   within 1 %).
2. Random search at equal budget: 27 grid points (3 x 3 x 3) against 27 random samples over
   the same ranges, where only the learning rate of three swept keys matters (Adam ignores
   optim.momentum, ReLU ignores model.leaky_slope), for 5 seeds. Printed:
   each seed's best val_loss of both, and how often random is at least as good (goal 5/5).

    .venv/bin/python scripts/bench/asha.py [--executor local|slurm] [--skip-random] [--min-epochs 3]

Sweeps run through ``hpctrain submit`` (local executor: elements as processes, two at a
time; ``--executor slurm``: the local Slurm cluster, SLURM_CONF set). The random-search
part runs in-process (``--executor debug``): 270 short runs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
GRID = {"optim.lr": [3e-2, 3e-3, 3e-4], "model.hidden": [[8], [32], [128]],
        "optim.weight_decay": [0.0, 1e-3, 1e-1]}


def base(name: str, data: Path, epochs: int, **extra) -> dict:
    raw = {"name": name, "seed": 0,
           "data": {"path": str(data), "task": "binary", "batch_size": 64,
                    "synth": {"rows": 3000, "features": 12, "shards": 2, "noise": 0.3}},
           "model": {"hidden": [32]}, "optim": {"name": "adam", "lr": 1e-3},
           "train": {"epochs": epochs, "monitor": "val_loss", "evaluate_test": False, "tensorboard": False},
           "slurm": {"array_parallelism": 2, "time_min": 20}}
    raw.update(extra)
    return raw


def submit(raw: dict, folder: Path, executor: str) -> Path:
    config, sweep = folder / f"{raw['name']}.yaml", folder / raw["name"]
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "hpctrain", "submit", str(config), "--executor", executor,
                          "--sweep-dir", str(sweep), "--no-collect"], capture_output=True, text=True, cwd=folder)
    if out.returncode != 0:
        raise SystemExit(f"submit {raw['name']} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    if executor == "slurm":
        wait_for(sweep)
    return sweep


def wait_for(sweep: Path, timeout: float = 3600) -> None:
    from hpctrain.runstate import FINAL_STATUSES
    from hpctrain.sweep import SweepDir, iter_runs

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(s is not None and s.status in FINAL_STATUSES for _, s in iter_runs(SweepDir(sweep))):
            return
        time.sleep(3)
    raise SystemExit(f"{sweep}: not finished after {timeout:.0f} s")


def outcome(sweep: Path) -> dict:
    """Epochs trained, states, and the best run by val_loss."""
    from hpctrain.sweep import SweepDir, iter_runs

    epochs, best, states = 0, None, {}
    for rec, state in iter_runs(SweepDir(sweep)):
        epochs += state.epoch
        states[state.status] = states.get(state.status, 0) + 1
        if state.best_metric is not None and (best is None or state.best_metric < best[1]):
            best = (rec["index"], state.best_metric)
    return {"epochs": epochs, "best_index": best[0], "best": best[1], "states": states}


def asha(folder: Path, executor: str, min_epochs: int) -> dict:
    data = folder / "data-asha"
    full = outcome(submit(base("full", data, 27, grid=GRID), folder, executor))
    pruned = outcome(submit(base("asha", data, 27, grid=GRID,
                                 prune={"kind": "asha", "min_epochs": min_epochs, "reduction": 3}), folder, executor))
    if set(full["states"]) != {"done"}:
        raise SystemExit(f"the full sweep did not end done: {full['states']}")
    fraction = pruned["epochs"] / full["epochs"]
    gap = abs(pruned["best"] - full["best"]) / abs(full["best"])
    print(f"ASHA ({executor}): {pruned['epochs']} of {full['epochs']} epochs = {fraction:.3f} of the full sweep "
          f"(goal <= 0.35); states {pruned['states']}")
    print(f"  best val_loss: full sweep {full['best']:.5f} (point {full['best_index']}), "
          f"ASHA {pruned['best']:.5f} (point {pruned['best_index']}); gap {gap:.2%} (goal: same point or <= 1%)")
    return {"fraction": fraction, "full": full, "asha": pruned, "gap": gap}


def random_vs_grid(folder: Path, seeds: int = 5) -> dict:
    wins, rows = 0, []
    # Only the learning rate matters here: Adam ignores optim.momentum, and ReLU ignores
    # model.leaky_slope; a user could sweep both without knowing.
    grid = {"optim.lr": [1e-3, 1e-2, 1e-1], "optim.momentum": [0.0, 0.45, 0.9], "model.leaky_slope": [0.0, 0.1, 0.2]}
    for seed in range(seeds):
        data = folder / f"data-rs{seed}"
        g = outcome(submit(base(f"grid{seed}", data, 4, seed=seed, grid=grid), folder, "debug"))
        search = {"kind": "random", "samples": 27, "seed": seed, "optim.lr": {"loguniform": [1e-3, 1e-1]},
                  "optim.momentum": {"uniform": [0.0, 0.9]}, "model.leaky_slope": {"uniform": [0.0, 0.2]}}
        r = outcome(submit(base(f"random{seed}", data, 4, seed=seed, search=search), folder, "debug"))
        wins += r["best"] <= g["best"]
        rows.append((seed, g["best"], r["best"]))
        print(f"  seed {seed}: best val_loss grid {g['best']:.5f}, random {r['best']:.5f}")
    print(f"random search at least as good as the grid in {wins}/{seeds} seeds (goal {seeds}/{seeds})")
    return {"wins": wins, "seeds": seeds, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--skip-random", action="store_true")
    p.add_argument("--min-epochs", type=int, default=3, help="the first rung (default 3: rungs 3 and 9 of 27)")
    p.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="hpctrain-asha-") as tmp:
        results = {"asha": asha(Path(tmp), args.executor, args.min_epochs)}
        if not args.skip_random:
            results["random"] = random_vs_grid(Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
