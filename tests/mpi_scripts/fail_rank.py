"""Run under `mpirun -np 2`: train a few steps, then rank 1 dies (os._exit) or hangs.

The surviving rank must fail within a bounded time with a clear message instead of waiting
forever. Usage: python fail_rank.py BACKEND die|hang TIMEOUT_S [MARKER_FILE]
Rank 1 writes MARKER_FILE before it leaves: mpirun may drop a dying rank's last output.
"""
import os
import sys
import time

import torch

from hpctrain.config import DistConfig
from hpctrain.dist import make_backend

FAIL_AT_STEP = 3


def main() -> int:
    backend_name, mode, timeout_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
    torch.set_num_threads(1)
    backend = make_backend(DistConfig(backend=backend_name, timeout_s=timeout_s), device_preference="cpu",
                           log=lambda msg: None)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        model, optimizer = backend.wrap(model, optimizer)
        backend.broadcast_state(model, optimizer)
        for step in range(1000):
            if backend.rank == 1 and step == FAIL_AT_STEP:
                print(f"rank 1: {mode} at step {step}", flush=True)
                if len(sys.argv) > 4:
                    with open(sys.argv[4], "w") as marker:
                        marker.write(f"rank 1: {mode} at step {step}")
                if mode == "die":
                    os._exit(1)
                time.sleep(3600)
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()  # the gradient exchange: DDP in backward, Horovod in step()
            optimizer.step()
            optimizer.zero_grad()
            backend.allreduce_sum(loss.detach().double())
            if backend.rank == 0 and step == FAIL_AT_STEP - 1:
                print(f"rank 0: {FAIL_AT_STEP} steps done", flush=True)
        print(f"rank {backend.rank}: finished all steps (unexpected)", flush=True)
    finally:
        backend.shutdown()  # while an error propagates: print it and abort the MPI job
    return 0


if __name__ == "__main__":
    sys.exit(main())
