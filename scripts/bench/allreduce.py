#!/usr/bin/env python
"""Gradient exchange of each backend against a raw mpi4py Allreduce of the same bytes.

    python scripts/bench/allreduce.py            # launches itself: mpirun -np 2 ... --worker
    python scripts/bench/allreduce.py --np 4 --sizes 1 10 --reps 20

For models of about 1M and 10M parameters (several Linear layers, so several tensors), each
rank times the backend's real gradient path with a small batch:
  horovod: forward + backward + DistributedOptimizer.synchronize() (fused allreduce)
  torch:   forward + backward through DistributedDataParallel (bucketed allreduce)
minus the same forward + backward without any exchange (a hook-free copy for Horovod, no_sync
for DDP). The raw baseline is comm.Allreduce(IN_PLACE) of one float32 buffer of the same size,
measured in the same run. Ratio = raw time / backend exchange time (goal >= 0.8).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--np", type=int, default=2, help="ranks to launch (default 2)")
    p.add_argument("--sizes", type=float, nargs="+", default=[1, 10], help="model sizes in millions of parameters")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--backends", nargs="+", default=["horovod", "torch"], choices=["horovod", "torch"])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def launch(args) -> int:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = ["mpirun", "-np", str(args.np), "--oversubscribe", "--bind-to", "core",
           sys.executable, __file__, "--worker", "--reps", str(args.reps),
           "--sizes", *map(str, args.sizes), "--backends", *args.backends]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env, timeout=900).returncode


def make_model(million: float):
    """Linear layers of width 1000 holding about ``million`` x 1e6 parameters."""
    import torch

    width = 1000
    layers = max(1, round(million * 1e6 / (width * width + width)))
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]), width


def median_times(fns: dict, reps: int, barrier) -> dict:
    """Median seconds of each callable, measured round-robin so that all see the same load."""
    for fn in fns.values():  # warm-up: allocations, Horovod's response cache, DDP buckets
        for _ in range(3):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            barrier()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def raw_allreduce(n_floats: int, comm):
    import numpy as np
    from mpi4py import MPI

    buf = np.ones(n_floats, dtype=np.float32)
    return lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)


def step_fn(model, x, sync=None, context=None):
    def run():
        for p in model.parameters():
            p.grad = None
        if context is not None:
            with context():
                model(x).sum().backward()
        else:
            model(x).sum().backward()
        if sync is not None:
            sync()
    return run


def measure(backend: str, million: float, reps: int, comm) -> tuple[dict, int]:
    import torch

    from hpctrain.config import DistConfig
    from hpctrain.dist import make_backend

    model, width = make_model(million)
    n = sum(p.numel() for p in model.parameters())
    x = torch.randn(4, width)
    be = make_backend(DistConfig(backend=backend), device_preference="cpu", log=lambda m: None)
    if backend == "horovod":
        local = copy.deepcopy(model)  # no Horovod hooks: backward without any exchange
        wrapped, opt = be.wrap(model, torch.optim.SGD(model.parameters(), lr=0.0))
        fns = {"full": step_fn(wrapped, x, sync=opt.synchronize), "alone": step_fn(local, x)}
    else:
        wrapped, _ = be.wrap(model, torch.optim.SGD(model.parameters(), lr=0.0))
        fns = {"full": step_fn(wrapped, x), "alone": step_fn(wrapped, x, context=wrapped.no_sync)}
    fns["raw"] = raw_allreduce(n, comm)
    return median_times(fns, reps, comm.Barrier), n


def worker(args) -> int:
    import torch
    from mpi4py import MPI

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rows = []
    for million in args.sizes:
        for backend in args.backends:
            t, n = measure(backend, million, args.reps, comm)
            # The slowest rank decides; report its figures.
            full, alone, raw = (comm.allreduce(t[k], op=MPI.MAX) for k in ("full", "alone", "raw"))
            exch = max(full - alone, 1e-9)
            mb = n * 4 / 1e6
            rows.append((backend, n, mb, full * 1e3, alone * 1e3, exch * 1e3, mb / exch / 1e3,
                         raw * 1e3, mb / raw / 1e3, raw / exch))
    if rank == 0:
        print(f"gradient exchange across {size} ranks (median of {args.reps}; bandwidth = gradient bytes / time)")
        head = ("backend", "params", "MB", "fwd+bwd+xchg ms", "fwd+bwd ms", "exchange ms", "GB/s",
                "raw MPI ms", "raw GB/s", "ratio")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print(f"| {r[0]} | {r[1] / 1e6:.2f}M | {r[2]:.1f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2f} | "
                  f"{r[7]:.2f} | {r[8]:.2f} | {r[9]:.2f} |")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    sys.exit(main())
