"""The ``mpi`` backend: plain MPI through mpi4py, one fused Allreduce of all gradients a step.

Horovod's background cycle and Gloo's TCP round trips cost about a millisecond a
collective on a small CPU node, more than a whole training step of a small MLP; an MPI
Allreduce over shared memory costs microseconds. This backend is for CPU ranks on
such models: it keeps data-parallel training worth its ranks where the others do not.
MPI collectives have no timeout: a rank that dies makes mpirun/srun end the job
(``--kill-on-bad-exit``); a rank that hangs is ended by the job's time limit.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from ..errors import ConfigError
from .backends import Backend, Log, select_device
from .env import discover


class MpiBackend(Backend):
    name = "mpi"

    def __init__(self, dist_cfg: Any, device_preference: str = "auto", log: Log = print):
        from mpi4py import MPI

        env = discover()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        super().__init__(rank=self.comm.Get_rank(), size=self.comm.Get_size(), local_rank=env.local_rank,
                         local_size=env.local_size, device=select_device(device_preference, env.local_rank),
                         timeout_s=dist_cfg.timeout_s, backward_passes_per_step=dist_cfg.backward_passes_per_step,
                         log=log)

    def wrap(self, model, optimizer):
        _refuse_sparse_gradients(model)
        model = model.to(self.device)
        return model, GradientAveragingOptimizer(optimizer, self.comm)

    def allreduce_sum(self, tensor):
        import torch

        with self.collective_errors():
            array = tensor.detach().cpu().contiguous().numpy().copy()
            self.comm.Allreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)
            return torch.from_numpy(array).to(tensor.device)

    def allreduce_max(self, value: float) -> float:
        with self.collective_errors():
            return float(self.comm.allreduce(float(value), op=self.MPI.MAX))

    def broadcast_object(self, obj):
        with self.collective_errors():
            return self.comm.bcast(obj, root=0)

    def barrier(self) -> None:
        with self.collective_errors():
            self.comm.Barrier()

    def _wire_device(self):
        import torch

        return torch.device("cpu")

    def _broadcast_flat_(self, flat) -> None:
        self.comm.Bcast(flat.numpy(), root=0)


def _refuse_sparse_gradients(model) -> None:
    """The flat Allreduce adds dense buffers; a sparse gradient would be cut wrongly."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and module.sparse:
            raise ConfigError(f"dist.backend mpi cannot average the sparse gradients of {name or 'the model'} "
                              f"({type(module).__name__}(sparse=True)); expected dense gradients, or "
                              f"dist.backend horovod or torch")


class GradientAveragingOptimizer:
    """An optimizer whose ``step()`` first averages the gradients over all ranks.

    All gradients travel in one flat buffer (one message, not one per tensor). The
    ``synchronize()`` / ``skip_synchronize()`` pair matches Horovod's, so gradient clipping
    sees the averaged gradients. Everything else is the wrapped optimizer's.
    """

    def __init__(self, optimizer, comm):
        self.optimizer = optimizer
        self._comm = comm
        self._synchronized = False

    def __getattr__(self, name: str):
        return getattr(self.optimizer, name)

    def _grads(self) -> list:
        return [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def synchronize(self) -> None:
        import torch
        from mpi4py import MPI

        grads = self._grads()
        if grads and self._comm.Get_size() > 1:
            flat = torch.cat([g.detach().reshape(-1).cpu() for g in grads]).numpy()
            self._comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
            flat /= self._comm.Get_size()
            offset = 0
            source = torch.from_numpy(flat)
            for g in grads:
                g.copy_(source[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        self._synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        self._synchronized = True
        yield

    def step(self, closure=None):
        if not self._synchronized:
            self.synchronize()
        self._synchronized = False
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        return self.optimizer.load_state_dict(state)
