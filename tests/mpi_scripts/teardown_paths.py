"""Run under `mpirun -np 2`: the ways a rank can leave a backend, and the threads left afterwards.

- ``done``: wrap, train, shutdown() while the caller still holds the wrapped model (as a
  trainer may);
- ``error``: shutdown() in a ``finally`` while an exception propagates whose traceback holds
  the wrapped model (a run that failed for a reason other than a collective);
- ``no_shutdown``: never call shutdown() (a run that failed while it was being built); the
  backend must still leave the group before the interpreter finalises.

Prints `RESULT {"rank": R, "mode": M, "threads": [...]}` once the backend is left: at once for
``done`` and ``error``, from an exit handler that runs after the backend's for ``no_shutdown``.

Usage: python teardown_paths.py BACKEND done|error|no_shutdown
"""
import atexit
import json
import os
import sys

import torch

from hpctrain.config import DistConfig
from hpctrain.dist import make_backend
from threads import thread_names  # noqa: E402  (this folder is the script's sys.path[0])


def report(rank: int, mode: str) -> None:
    print("RESULT " + json.dumps({"rank": rank, "mode": mode, "threads": thread_names()}), flush=True)


def train(backend, steps: int = 3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model, optimizer = backend.wrap(model, torch.optim.Adam(model.parameters(), lr=0.01))
    backend.broadcast_state(model, optimizer)
    for _ in range(steps):
        loss = model(torch.randn(16, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        backend.allreduce_sum(loss.detach().double())
    return model, optimizer


def fail_while_holding(backend):
    model, optimizer = train(backend)  # noqa: F841 (held by this frame, hence by the traceback)
    raise ValueError("a failure that is not a collective's")


def main() -> int:
    backend_name, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMIX_RANK", "0")))
    if mode == "no_shutdown":
        atexit.register(report, rank, mode)  # registered first, so it runs after the backend's handler
    backend = make_backend(DistConfig(backend=backend_name, timeout_s=60), device_preference="cpu",
                           log=lambda msg: None)
    if mode == "done":
        model, optimizer = train(backend)
        backend.shutdown()
        report(backend.rank, mode)
        del model, optimizer
    elif mode == "error":
        try:
            try:
                fail_while_holding(backend)
            finally:
                backend.shutdown()
        except ValueError as held:  # the traceback, and the model in it, are still alive here
            report(backend.rank, mode)
            del held
    else:
        train(backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
