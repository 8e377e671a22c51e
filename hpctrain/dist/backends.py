"""Data-parallel backends behind one small interface: none, horovod, torch.

```python
backend = make_backend(cfg.dist, device_preference="auto")   # logs which backend it chose
model, optimizer = backend.wrap(model, optimizer)             # moves the model to backend.device
backend.broadcast_state(model, optimizer)                     # rank 0's parameters and optimizer state
for i, batch in enumerate(micro_batches):                     # k = backend.backward_passes_per_step
    with backend.accumulation_context(model, is_last_micro_step=(i == k - 1)):
        (loss_fn(model(batch.x), batch.y) / k).backward()     # loss: a mean over this rank's rows
optimizer.step(); optimizer.zero_grad()
backend.allreduce_sum(t); backend.allreduce_max(x); backend.broadcast_object(o)
backend.barrier(); backend.shutdown()
```

Gradients are averaged across ranks (Horovod's ``op=Average``, DDP's mean), so when every
rank's loss is the mean over its own rows, R ranks with batch B take the same step as one
process with batch R*B.

A collective that fails (a rank died, or stopped for longer than ``dist.timeout_s``) raises
``CollectiveError`` with a message naming the rank and the timeout; ``shutdown()`` called
while such an error propagates aborts the MPI job, so the other ranks do not hang in
``MPI_Finalize`` waiting for a rank that will never arrive.

Otherwise ``shutdown()`` leaves the group before the interpreter finalises: no thread of a
communication library may outlive it (see ``TorchBackend._teardown``).
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import math
import os
import socket
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from .. import exitcodes
from ..errors import ConfigError, HpctrainError
from .env import RankEnv, discover

Log = Callable[[str], None]

# Optimizer-state tensors up to this many elements travel inside the pickled skeleton (Adam's
# step counter lives on the CPU even for GPU models, which NCCL cannot broadcast).
_SMALL_TENSOR = 64


class CollectiveError(RuntimeError):
    """A collective operation failed because another rank died or stopped responding."""


# --------------------------------------------------------------------------- failure messages


_TIMEOUT_MARKERS = ("timed out", "timeout", "stalled for longer", "watchdog")
_PEER_LOST_MARKERS = ("connection closed by peer", "connection reset", "broken pipe", "ecconnreset",
                      "econnreset", "epipe", "socket closed", "connection refused", "read error",
                      "shut down", "has been shut down", "peer", "process group has been aborted")


def collective_failure_message(exc: BaseException, *, rank: int, size: int, timeout_s: float,
                               backend: str) -> Optional[str]:
    """A clear sentence for an exception raised by a collective, or None when it is not one.

    Gloo says "Timed out waiting ... for recv" or "Connection closed by peer [addr]:port";
    Horovod raises HorovodInternalError after its stall check shut it down (its log names the
    missing ranks) or after a peer's exception. Both become "rank X failed" / "collective
    timed out after N s" with the setting that controls it.
    """
    if isinstance(exc, CollectiveError):
        return str(exc)
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    horovod_error = type(exc).__name__ == "HorovodInternalError"
    others = f"rank {1 - rank}" if size == 2 else "another rank"
    first_line = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    if any(marker in lowered for marker in _TIMEOUT_MARKERS) or (horovod_error and "shut down" in lowered):
        return (f"{backend} collective on rank {rank} of {size} timed out after {timeout_s:g} s "
                f"(dist.timeout_s): {others} stopped taking part (hung or dead). [{first_line}]")
    if horovod_error or (isinstance(exc, RuntimeError) and any(m in lowered for m in _PEER_LOST_MARKERS)):
        return (f"{backend} collective on rank {rank} of {size} failed: {others} failed "
                f"(its connection closed or it raised an error). [{first_line}]")
    return None


def _abort_mpi_job(message: str) -> None:
    """Print ``message`` and, if this process is an MPI rank, abort every rank of the job."""
    print(f"hpctrain: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if "mpi4py.MPI" not in sys.modules and not discover().mpi_launched:
        return
    try:
        import mpi4py
        if "mpi4py.MPI" not in sys.modules:
            mpi4py.rc.initialize = False  # only abort an MPI that someone (Horovod) started
            mpi4py.rc.finalize = False
        from mpi4py import MPI
        if MPI.Is_initialized() and not MPI.Is_finalized():
            print("hpctrain: aborting the MPI job so that no rank waits forever", file=sys.stderr, flush=True)
            MPI.COMM_WORLD.Abort(exitcodes.RANK_LOST)
    except ImportError:
        pass


# --------------------------------------------------------------------------- device


def select_device(preference: str, local_rank: int):
    """cuda:(local_rank mod visible GPUs) when CUDA is available and allowed, else the CPU.

    CUDA_VISIBLE_DEVICES is respected because torch only counts the devices it lists; when
    Slurm binds one GPU per task each rank sees one device and takes cuda:0.
    """
    import torch

    if preference not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device: {preference!r} is not allowed; expected one of: auto, cpu, cuda")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise HpctrainError("train.device: 'cuda' but torch sees no CUDA device "
                            f"(CUDA_VISIBLE_DEVICES={visible!r}, torch {torch.__version__}); "
                            "expected a GPU node and a CUDA build of torch, or train.device: auto/cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


# --------------------------------------------------------------------------- common part


@dataclass
class _TensorSlot:
    """Stands for one large optimizer-state tensor in the broadcast skeleton."""
    index: int
    shape: tuple
    dtype: Any
    on_gpu: bool


class Backend:
    """The interface every backend offers; this base is also the single-process behaviour."""

    name = "none"

    def __init__(self, *, rank: int = 0, size: int = 1, local_rank: int = 0, local_size: int = 1,
                 device: Any = None, timeout_s: float = 300.0, backward_passes_per_step: int = 1,
                 log: Log = print):
        self.rank, self.size = rank, size
        self.local_rank, self.local_size = local_rank, local_size
        self.device = device
        self.timeout_s = timeout_s
        self.backward_passes_per_step = backward_passes_per_step
        self.log = log
        self.failure: Optional[str] = None
        self._closed = False

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, "
                f"device={self.device})")

    # -- model and optimizer

    def wrap(self, model, optimizer):
        return model.to(self.device), optimizer

    def unwrap(self, model):
        """The plain module (what a checkpoint should save), whatever wrap returned."""
        return getattr(model, "module", model)

    def accumulation_context(self, model, is_last_micro_step: bool):
        """Context for one backward pass of an accumulation of backward_passes_per_step passes."""
        return contextlib.nullcontext()

    def broadcast_state(self, model, optimizer=None) -> None:
        """Give every rank rank 0's parameters, buffers and (when given) optimizer state."""
        if self.size == 1:
            return
        import torch

        with self.collective_errors(), torch.no_grad():
            self._broadcast_tensors_(list(self.unwrap(model).state_dict().values()))
            if optimizer is not None:
                self._broadcast_optimizer_state(optimizer)

    # -- collectives

    def allreduce_sum(self, tensor):
        return tensor

    def allreduce_max(self, value: float) -> float:
        return float(value)

    def any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true on every rank when it is true on any: one small allreduce for all of
        them (nothing in one process). Ranks decide together what they must do together."""
        flags = tuple(bool(f) for f in flags)
        if self.size == 1:
            return flags
        import torch

        summed = self.allreduce_sum(torch.tensor(flags, dtype=torch.float64))
        return tuple(bool(v > 0) for v in summed.tolist())

    def broadcast_object(self, obj):
        return obj

    def barrier(self) -> None:
        pass

    def shutdown(self) -> None:
        """Leave the group. Called while a collective failure propagates, abort the MPI job."""
        if self._closed:
            return
        self._closed = True
        in_flight = sys.exc_info()[1]
        failure = self.failure
        if failure is None and in_flight is not None:
            failure = self.failure_message(in_flight)
        if failure is not None and self.size > 1:
            _abort_mpi_job(failure)
            return
        self._teardown()

    def _teardown(self) -> None:
        pass

    # -- failures

    def failure_message(self, exc: BaseException) -> Optional[str]:
        return collective_failure_message(exc, rank=self.rank, size=self.size, timeout_s=self.timeout_s,
                                          backend=self.name)

    @contextlib.contextmanager
    def collective_errors(self) -> Iterator[None]:
        """Turn an exception from a collective into a CollectiveError with a clear message."""
        try:
            yield
        except CollectiveError:
            raise
        except Exception as exc:
            message = self.failure_message(exc)
            if message is None:
                raise
            self.failure = message
            raise CollectiveError(message) from exc

    # -- helpers for broadcast_state

    def _broadcast_flat_(self, flat) -> None:
        raise NotImplementedError

    def _broadcast_tensors_(self, tensors: list) -> None:
        """Broadcast tensors in place from rank 0, one flat buffer per dtype (few, large messages)."""
        import torch

        by_dtype: dict = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for dtype, group in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):
            wire = torch.uint8 if dtype == torch.bool else dtype
            flat = torch.cat([t.detach().reshape(-1).to(self._wire_device(), wire) for t in group])
            self._broadcast_flat_(flat)
            if not self.is_root:
                offset = 0
                for t in group:
                    t.copy_(flat[offset:offset + t.numel()].view(t.shape).to(t.device, t.dtype))
                    offset += t.numel()

    def _wire_device(self):
        return self.device

    def _broadcast_optimizer_state(self, optimizer) -> None:
        import torch

        large: list = []

        def strip(x):
            if torch.is_tensor(x):
                if x.numel() <= _SMALL_TENSOR:
                    return x.detach().cpu().clone()
                large.append(x)
                return _TensorSlot(len(large) - 1, tuple(x.shape), x.dtype, x.is_cuda)
            if isinstance(x, dict):
                return {k: strip(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(strip(v) for v in x)
            return x

        skeleton = self.broadcast_object(strip(optimizer.state_dict()) if self.is_root else None)
        if not self.is_root:
            large = [None] * _count_slots(skeleton)
            _fill_slots(skeleton, large, lambda s: torch.empty(s.shape, dtype=s.dtype,
                                                              device=self.device if s.on_gpu else "cpu"))
        self._broadcast_tensors_(large)
        if not self.is_root:
            optimizer.load_state_dict(_replace_slots(skeleton, large))


def _walk_slots(x, visit):
    if isinstance(x, _TensorSlot):
        visit(x)
    elif isinstance(x, dict):
        for v in x.values():
            _walk_slots(v, visit)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _walk_slots(v, visit)


def _count_slots(skeleton) -> int:
    slots: list = []
    _walk_slots(skeleton, slots.append)
    return len(slots)


def _fill_slots(skeleton, out: list, make) -> None:
    def visit(slot):
        out[slot.index] = make(slot)
    _walk_slots(skeleton, visit)


def _replace_slots(x, tensors: list):
    if isinstance(x, _TensorSlot):
        return tensors[x.index]
    if isinstance(x, dict):
        return {k: _replace_slots(v, tensors) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_replace_slots(v, tensors) for v in x)
    return x


class NoneBackend(Backend):
    """One process, no communication."""

    name = "none"

    def __init__(self, dist_cfg: Any = None, device_preference: str = "auto", log: Log = print):
        super().__init__(device=select_device(device_preference, 0),
                         timeout_s=getattr(dist_cfg, "timeout_s", 300.0),
                         backward_passes_per_step=getattr(dist_cfg, "backward_passes_per_step", 1), log=log)


# --------------------------------------------------------------------------- Horovod


def horovod_stall_settings(timeout_s: float) -> dict[str, str]:
    """Stall check every quarter of the timeout, shutdown after the timeout (whole seconds).

    Horovod's coordinator checks for tensors some ranks submitted and others did not every
    HOROVOD_STALL_CHECK_TIME_SECONDS and shuts down once one has waited longer than
    HOROVOD_STALL_SHUTDOWN_TIME_SECONDS (which must not be below the check time), so a
    stalled collective fails within about 1.25 x dist.timeout_s.
    """
    shutdown = max(1, math.ceil(timeout_s))
    check = max(1, min(60, shutdown // 4))
    return {"HOROVOD_STALL_CHECK_TIME_SECONDS": str(check),
            "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(shutdown)}


class HorovodBackend(Backend):
    """Horovod over MPI (or Gloo): DistributedOptimizer with tensor fusion, rank-0 broadcasts."""

    name = "horovod"

    def __init__(self, dist_cfg: Any, device_preference: str = "auto", log: Log = print):
        for key, value in horovod_stall_settings(dist_cfg.timeout_s).items():
            os.environ.setdefault(key, value)  # read by hvd.init(); a value set by the user wins
        import horovod.torch as hvd

        hvd.init()
        self.hvd = hvd
        self.fp16_compression = bool(dist_cfg.fp16_compression)
        super().__init__(rank=hvd.rank(), size=hvd.size(), local_rank=hvd.local_rank(),
                         local_size=hvd.local_size(), device=select_device(device_preference, hvd.local_rank()),
                         timeout_s=dist_cfg.timeout_s, backward_passes_per_step=dist_cfg.backward_passes_per_step,
                         log=log)
        self._broadcasts = 0

    def wrap(self, model, optimizer):
        hvd = self.hvd
        model = model.to(self.device)
        compression = hvd.Compression.fp16 if self.fp16_compression else hvd.Compression.none
        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                             compression=compression, op=hvd.Average,
                                             backward_passes_per_step=self.backward_passes_per_step)
        return model, optimizer

    def allreduce_sum(self, tensor):
        with self.collective_errors():
            return self.hvd.allreduce(tensor.detach(), op=self.hvd.Sum)

    def allreduce_max(self, value: float) -> float:
        import torch

        with self.collective_errors():
            return float(self.hvd.allreduce(torch.tensor([float(value)], dtype=torch.float64), op=self.hvd.Max))

    def broadcast_object(self, obj):
        with self.collective_errors():
            # An explicit name: Horovod's default names the object's type, which differs
            # between rank 0 (the object) and the others (None).
            self._broadcasts += 1
            return self.hvd.broadcast_object(obj, root_rank=0, name=f"hpctrain.object.{self._broadcasts}")

    def barrier(self) -> None:
        with self.collective_errors():
            self.hvd.barrier()

    def _broadcast_flat_(self, flat) -> None:
        self._broadcasts += 1
        self.hvd.broadcast_(flat, root_rank=0, name=f"hpctrain.broadcast_state.{self._broadcasts}")

    def _teardown(self) -> None:
        self.hvd.shutdown()


# --------------------------------------------------------------------------- torch.distributed


def _mpi_rendezvous(env: RankEnv, timeout: datetime.timedelta, log: Log):
    """Rank 0 opens a TCPStore on a free port; its host name and port reach the others by MPI."""
    import torch.distributed as dist
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() != env.world_size or comm.Get_rank() != env.rank:
        raise HpctrainError(f"MPI_COMM_WORLD is rank {comm.Get_rank()} of {comm.Get_size()} but the environment "
                            f"says {env.describe()}; expected the same (is mpi4py built against this MPI?)")
    store, address = None, None
    if env.rank == 0:
        host = _reachable_hostname(env)
        store = dist.TCPStore(host, 0, env.world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        address = (host, store.port)
    host, port = comm.bcast(address, root=0)
    if store is None:
        store = dist.TCPStore(host, port, env.world_size, is_master=False, timeout=timeout)
    log(f"torch.distributed rendezvous at {host}:{port} (announced by rank 0 over MPI)")
    return store


def _reachable_hostname(env: RankEnv) -> str:
    host = socket.gethostname()
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        if env.local_size >= env.world_size:
            return "127.0.0.1"  # every rank is on this node
        raise HpctrainError(f"host name {host!r} of rank 0 does not resolve; the other nodes cannot reach it "
                            "(set MASTER_ADDR and MASTER_PORT)") from None


class TorchBackend(Backend):
    """torch.distributed: NCCL on GPUs, Gloo on CPUs, DistributedDataParallel."""

    name = "torch"

    def __init__(self, dist_cfg: Any, device_preference: str = "auto", log: Log = print,
                 env: Optional[RankEnv] = None):
        import torch.distributed as dist

        env = env or discover()
        device = select_device(device_preference, env.local_rank)
        super().__init__(rank=env.rank, size=env.world_size, local_rank=env.local_rank,
                         local_size=env.local_size, device=device, timeout_s=dist_cfg.timeout_s,
                         backward_passes_per_step=dist_cfg.backward_passes_per_step, log=log)
        self.pg_backend = "nccl" if device.type == "cuda" else "gloo"
        self._wrapped: weakref.WeakSet = weakref.WeakSet()  # DDP wrappers, released by shutdown()
        timeout = datetime.timedelta(seconds=dist_cfg.timeout_s)
        if not dist.is_initialized():
            _import_group_defaults()
            self._init_process_group(env, timeout)
        self.dist = dist
        # A path that never reaches shutdown() (an error while the run is being built) must
        # still leave the group while the interpreter is intact; atexit runs before it finalises.
        atexit.register(self.shutdown)

    def _init_process_group(self, env: RankEnv, timeout: datetime.timedelta) -> None:
        import torch.distributed as dist

        common = dict(backend=self.pg_backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
        if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
            dist.init_process_group(init_method="env://", **common)  # torchrun, or set by the user
        elif env.mpi_launched:
            dist.init_process_group(store=_mpi_rendezvous(env, timeout, self.log), **common)
        elif env.source == "slurm" and env.master_addr:
            self.log(f"torch.distributed rendezvous at {env.master_addr}:{env.master_port} "
                     "(first host of the Slurm step)")
            store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=env.rank == 0,
                                  timeout=timeout, wait_for_workers=False)
            dist.init_process_group(store=store, **common)
        else:
            raise HpctrainError(f"dist.backend torch: cannot find a rendezvous for {env.describe()}; expected "
                                "mpirun/srun (MPI or a Slurm step with a node list) or MASTER_ADDR/MASTER_PORT")

    def wrap(self, model, optimizer):
        from torch.nn.parallel import DistributedDataParallel

        model = model.to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # DDP averages gradients in ~25 MB buckets while backward still runs; its constructor
        # also copies rank 0's parameters and buffers to every rank.
        with self.collective_errors():
            ddp = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
        self._wrapped.add(ddp)
        return ddp, optimizer

    def accumulation_context(self, model, is_last_micro_step: bool):
        if not is_last_micro_step and hasattr(model, "no_sync"):
            return model.no_sync()  # accumulate locally; the last pass reduces the sum
        return contextlib.nullcontext()

    def _wire_device(self):
        import torch
        return self.device if self.pg_backend == "nccl" else torch.device("cpu")

    def allreduce_sum(self, tensor):
        with self.collective_errors():
            wire = tensor.detach().to(self._wire_device()).clone()
            self.dist.all_reduce(wire, op=self.dist.ReduceOp.SUM)
            return wire.to(tensor.device)

    def allreduce_max(self, value: float) -> float:
        import torch

        with self.collective_errors():
            wire = torch.tensor([float(value)], dtype=torch.float64, device=self._wire_device())
            self.dist.all_reduce(wire, op=self.dist.ReduceOp.MAX)
            return float(wire.item())

    def broadcast_object(self, obj):
        with self.collective_errors():
            box = [obj if self.is_root else None]
            device = self.device if self.pg_backend == "nccl" else None
            self.dist.broadcast_object_list(box, src=0, device=device)
            return box[0]

    def barrier(self) -> None:
        with self.collective_errors():
            if self.pg_backend == "nccl":
                self.dist.barrier(device_ids=[self.device.index])
            else:
                self.dist.barrier()

    def _broadcast_flat_(self, flat) -> None:
        self.dist.broadcast(flat, src=0)

    def _teardown(self) -> None:
        """Free the process group now, so that its worker threads end before the interpreter does.

        destroy_process_group() only forgets the group; the group itself, and with it Gloo's
        worker threads, lives until its last reference goes. A worker thread that outlives
        the interpreter's finalisation dies when it drops the last reference to a tensor
        with a Python object (it then needs the GIL): "terminate called without an active
        exception", status 134, after a run that finished. So every holder goes first:
        the DDP wrappers (whoever still references them: the trainer, a traceback), then
        unreachable cycles; the last reference then goes inside destroy_process_group(),
        and the group's destructor drains its queue and joins its threads.
        """
        atexit.unregister(self.shutdown)
        for ddp in list(self._wrapped):
            _release_ddp(ddp)
        self._wrapped.clear()
        gc.collect()
        if not self.dist.is_initialized():
            return
        group = weakref.ref(self.dist.group.WORLD)
        self.dist.destroy_process_group()
        if group() is not None:
            gc.collect()
        if group() is not None:
            print(f"hpctrain: warning: rank {self.rank}: the torch.distributed process group is still referenced "
                  "after destroy_process_group(); its worker threads may outlive the interpreter",
                  file=sys.stderr, flush=True)


def _import_group_defaults() -> None:
    """Import torch.distributed.nn before the default process group exists.

    Its functions take ``group=group.WORLD`` as a default argument, evaluated on import.
    Imported after init_process_group (DDP's first construction imports it, through
    torch._dynamo), those defaults hold the default group until the interpreter
    finalises, out of reach of destroy_process_group(); imported first, they are None.
    """
    import torch.distributed.nn.functional  # noqa: F401


def _release_ddp(ddp) -> None:
    """Drop what a DDP wrapper holds of the process group; the wrapper cannot train afterwards.

    The reducer (its bucket tensors and a C++ reference to the group), the logger (which
    holds the reducer) and the group itself: the attributes DDP drops when it is pickled.
    """
    for name in ("logger", "reducer", "process_group"):
        ddp.__dict__.pop(name, None)


# --------------------------------------------------------------------------- choice


def horovod_available() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except Exception:  # ImportError, or a build that does not match this torch
        return False
    return True


def mpi4py_available() -> bool:
    """Whether mpi4py is installed, found without importing ``mpi4py.MPI``: that import
    initialises MPI, and a process that has initialised MPI as a singleton hands its PMIx
    and Open MPI variables to every process it starts afterwards (jobs submitted from it
    included, whose ranks then share one MPI job id and crash in shared memory)."""
    import importlib.util

    return importlib.util.find_spec("mpi4py") is not None


def choose_backend(env: RankEnv, device_preference: str) -> tuple[str, str]:
    """(backend, why) for ``dist.backend: auto``: the fastest that is correct here.

    - one process: none;
    - CUDA devices: torch (NCCL; DDP overlaps the gradient exchange with backward);
    - CPU ranks that an MPI launcher started (mpirun, srun --mpi=pmix): mpi. One fused MPI
      Allreduce over shared memory costs microseconds a step, where Horovod's cycle and
      Gloo's round trips cost about a millisecond, more than a step of a small model; for
      large CPU models the MPI Allreduce was still the fastest exchange measured
      (docs/benchmarks.md, "Scaling" and "Gradient exchange");
    - other CPU ranks (torchrun, a plain srun step): torch (Gloo), whose rendezvous needs no
      MPI. Horovod is never picked by auto: ask for it by name.
    """
    import torch

    if env.world_size == 1:
        return "none", "a single process"
    if device_preference != "cpu" and torch.cuda.is_available():
        return "torch", "CUDA devices: NCCL, with the gradient exchange overlapping backward"
    if env.mpi_launched and mpi4py_available():
        return "mpi", ("CPU ranks started by MPI: one fused MPI Allreduce a step, microseconds where "
                       "Gloo and Horovod pay about a millisecond a collective")
    return "torch", ("CPU ranks not started by MPI: Gloo" if not env.mpi_launched
                     else "CPU ranks, mpi4py does not import: Gloo")


def make_backend(dist_cfg: Any, device_preference: str = "auto", log: Log = print) -> Backend:
    """The backend named by ``dist_cfg.backend``; ``auto`` is ``choose_backend``'s pick,
    logged with its reason."""
    choice = dist_cfg.backend
    env = discover()
    if choice == "auto":
        choice, why = choose_backend(env, device_preference)
        log(f"dist.backend auto -> {choice} ({why}; {env.describe()})")
    else:
        log(f"dist.backend {choice} ({env.describe()})")
    if choice == "none":
        if env.world_size > 1:
            raise ConfigError(f"dist.backend: 'none' but this process is {env.describe()}; expected one "
                              "process, or dist.backend auto/horovod/torch")
        return NoneBackend(dist_cfg, device_preference, log)
    if choice == "horovod":
        if not horovod_available():
            raise ConfigError("dist.backend: 'horovod' but horovod.torch does not import; "
                              "build it with scripts/install-horovod.sh, or use dist.backend torch")
        return HorovodBackend(dist_cfg, device_preference, log)
    if choice == "mpi":
        from .mpi import MpiBackend

        return MpiBackend(dist_cfg, device_preference, log)
    if choice == "torch":
        if env.world_size == 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
            log("dist.backend torch with one process: using the single-process backend")
            return NoneBackend(dist_cfg, device_preference, log)
        return TorchBackend(dist_cfg, device_preference, log, env=env)
    raise ConfigError(f"dist.backend: {choice!r} is not allowed; expected one of: auto, none, horovod, torch, mpi")
