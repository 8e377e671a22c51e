#!/usr/bin/env python
"""Data-parallel scaling: samples/s of the demo MLP on 1 rank against 2 ranks (1 thread each).

Both runs go through the real Trainer and the real backend under mpirun, with the same
per-rank batch and in-memory data, so the ratio shows what the gradient exchange and the
per-step agreement between ranks cost. Goal: 2 ranks >= 1.7x one rank on a 2-core machine.

Each repeat launches one rank and then each backend's two ranks, one after the other, so a
repeat's runs saw the same state of the machine. The headline speed-up is the median over
the repeats of each repeat's ratio (2 ranks / 1 rank of that repeat), as in the other
benchmarks; the best 2-rank run over the best 1-rank run is printed beside it. A single
fast or slow run moves the second, not the first.

    python scripts/bench/scaling.py [--backends mpi torch horovod] [--rows 131072] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def worker(args: argparse.Namespace) -> None:
    import torch

    from hpctrain.config import build_config
    from hpctrain.data.memory import TensorLoader
    from hpctrain.dist import make_backend
    from hpctrain.model import build_model
    from hpctrain.train.loop import Trainer

    torch.set_num_threads(1)
    cfg = build_config({
        "data": {"task": "binary", "batch_size": args.batch},
        "model": {"hidden": [64, 64]}, "optim": {"name": "adam", "lr": 1e-3},
        "train": {"epochs": args.epochs, "evaluate_test": False, "threads": 1},
        "dist": {"backend": args.backend},
    })
    backend = make_backend(cfg.dist, device_preference="cpu", log=lambda m: None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, 16, generator=gen)
    y = (x[:, 0] - x[:, 1] > 0).long()
    share = args.rows // backend.size  # each rank its share: the global epoch is the same size
    mine = slice(backend.rank * share, (backend.rank + 1) * share)
    train = TensorLoader(x[mine], y[mine], batch_size=args.batch, split="train", seed=backend.rank)
    val = TensorLoader(x[:1024], y[:1024], batch_size=1024, split="val", rank=backend.rank,
                       world_size=backend.size)
    model = build_model(cfg.model, "binary", 16)
    result = Trainer(cfg, model, train, val, backend, run_dir=None, log=lambda m: None).fit()
    if backend.is_root:
        print("RESULT " + json.dumps({"ranks": backend.size, "samples_per_s": result.samples_per_s}), flush=True)
    backend.shutdown()


def launch(ranks: int, args: argparse.Namespace, backend: str) -> float:
    cmd = ["mpirun", "-np", str(ranks), "--oversubscribe", "--bind-to", "core", sys.executable, __file__, "--worker",
           "--backend", backend, "--rows", str(args.rows),
           "--batch", str(args.batch), "--epochs", str(args.epochs)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, **MPI_ENV))
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])["samples_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="mpi", choices=("mpi", "torch", "horovod", "none"))  # one worker's
    p.add_argument("--backends", nargs="+", default=["mpi", "torch", "horovod"], choices=("mpi", "torch", "horovod"))
    p.add_argument("--rows", type=int, default=131072)
    p.add_argument("--batch", type=int, default=256, help="per-rank batch")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    one: list[float] = []
    two: dict[str, list[float]] = {b: [] for b in args.backends}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits every variant alike
        one.append(launch(1, args, "none"))
        for backend in args.backends:
            two[backend].append(launch(2, args, backend))
    best1 = max(one)
    print(f"demo MLP 16-64-64-1, batch {args.batch} per rank, Adam, 1 thread per rank, {args.rows} rows per epoch, "
          f"{args.repeats} repeats")
    print(f"1 rank          : {best1:12,.0f} samples/s  (runs: {', '.join(f'{v:,.0f}' for v in one)})")
    for backend, values in two.items():
        pairs = [b / a for a, b in zip(one, values)]
        print(f"2 ranks {backend:8s}: {max(values):12,.0f} samples/s  (runs: {', '.join(f'{v:,.0f}' for v in values)})"
              f"  speed-up {statistics.median(pairs):.2f}x median of repeats (each {', '.join(f'{r:.2f}' for r in pairs)}), "
              f"{max(values) / best1:.2f}x best to best  (goal >= 1.7x)")


if __name__ == "__main__":
    main()
