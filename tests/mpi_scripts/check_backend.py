"""Run under `mpirun -np 2` (or as 2 torchrun-style processes): checks one backend for real.

Prints one line per rank: `RESULT <json>` with the rank environment, collective results,
broadcast_state checks and the data-parallel equivalence figures that the tests assert.

Usage: python check_backend.py BACKEND [--steps N]
"""
import argparse
import copy
import json
import sys

import torch

from hpctrain.config import DistConfig
from hpctrain.dist import discover, make_backend

FEATURES, BATCH_PER_RANK = 6, 8


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def dataset(steps: int, world: int):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(steps, world * BATCH_PER_RANK, FEATURES, generator=g)
    y = x.sum(-1, keepdim=True).sin() + 0.1 * torch.randn(steps, world * BATCH_PER_RANK, 1, generator=g)
    return x, y


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def train(model, optimizer, backend, x, y, micro_steps: int, rows):
    """Each step: this rank's rows, split into micro-batches; loss a mean over the rows used."""
    for step in range(x.shape[0]):
        xs, ys = x[step, rows].chunk(micro_steps), y[step, rows].chunk(micro_steps)
        for i, (xb, yb) in enumerate(zip(xs, ys)):
            ctx = backend.accumulation_context(model, i == micro_steps - 1) if backend else None
            with ctx if ctx is not None else torch.enable_grad():
                loss = torch.nn.functional.mse_loss(model(xb), yb) / micro_steps
                loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def equivalence(backend, steps: int, micro_steps: int, opt_name: str) -> dict:
    """R ranks x batch B (after broadcast_state) vs one process x batch R*B from rank 0's start."""
    rank, world = backend.rank, backend.size
    x, y = dataset(steps, world)
    model = make_model(seed=100 + rank)  # different on every rank until broadcast_state
    reference = copy.deepcopy(make_model(seed=100))  # rank 0's initial model, trained alone
    opt_cls = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
               "adam": lambda p: torch.optim.Adam(p, lr=0.01)}[opt_name]
    optimizer = opt_cls(model.parameters())
    backend.backward_passes_per_step = micro_steps  # as dist.backward_passes_per_step would set it
    model, optimizer = backend.wrap(model, optimizer)
    backend.broadcast_state(model, optimizer)
    rows = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
    train(model, optimizer, backend, x, y, micro_steps, rows)
    ref_opt = opt_cls(reference.parameters())
    train(reference, ref_opt, None, x, y, 1, slice(None))
    plain = backend.unwrap(model)
    root_params = backend.broadcast_object([p.detach().clone() for p in plain.parameters()])
    across = max((p.detach() - q).abs().max().item() for p, q in zip(plain.parameters(), root_params))
    moved = max_param_diff(make_model(seed=100), reference)
    return {"vs_single": max_param_diff(plain, reference), "across_ranks": across, "moved": moved}


def broadcast_checks(backend) -> dict:
    rank = backend.rank
    model = make_model(seed=rank)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    if rank == 0:  # rank 0 has optimizer state, the others a fresh optimizer
        model(torch.ones(2, FEATURES)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    before = backend.broadcast_object([p.detach().clone() for p in model.parameters()])
    differs_before = max((p.detach() - q).abs().max().item() for p, q in zip(model.parameters(), before))
    backend.broadcast_state(model, optimizer)
    root = backend.broadcast_object({"params": [p.detach().clone() for p in model.parameters()],
                                     "opt": optimizer.state_dict()})
    params_diff = max((p.detach() - q).abs().max().item() for p, q in zip(model.parameters(), root["params"]))
    mine = optimizer.state_dict()["state"]
    theirs = root["opt"]["state"]
    opt_diff = max((mine[k]["exp_avg_sq"] - theirs[k]["exp_avg_sq"]).abs().max().item() for k in theirs)
    steps = sorted({float(v["step"]) for v in mine.values()})
    return {"differs_before": differs_before, "params_diff": params_diff, "opt_diff": opt_diff,
            "opt_keys_match": sorted(mine) == sorted(theirs), "opt_steps": steps}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("backend")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    env = discover()
    logs = []
    backend = make_backend(DistConfig(backend=args.backend, timeout_s=30), device_preference="cpu",
                           log=logs.append)
    try:
        result = {
            "env": {"rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
                    "local_size": env.local_size, "source": env.source},
            "backend": {"name": backend.name, "rank": backend.rank, "size": backend.size,
                        "local_rank": backend.local_rank, "device": str(backend.device), "log": logs},
            "sum": backend.allreduce_sum(torch.tensor([backend.rank + 1.0, 2.0], dtype=torch.float64)).tolist(),
            "max": backend.allreduce_max(10.0 * backend.rank - 3.0),
            "object": backend.broadcast_object({"from": backend.rank, "list": [1, "two"]}),
            "broadcast": broadcast_checks(backend),
            "sgd": equivalence(backend, args.steps, 1, "sgd"),
            "adam_accumulate": equivalence(backend, args.steps, 2, "adam"),
        }
        backend.barrier()
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        backend.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
