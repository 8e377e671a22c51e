"""Where this process stands in a parallel job: rank, world size, local rank, rendezvous hints.

Launchers announce a process's place through environment variables. They are read in this
order, the first that applies wins:

1. Open MPI (``mpirun``): ``OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE``. These come first
   because ``mpirun`` inside a Slurm allocation starts its daemons with ``srun``, so its ranks
   also carry ``SLURM_PROCID``/``SLURM_NTASKS`` of the daemon step (one task per node), which
   are not the MPI ranks.
2. PMIx (``srun --mpi=pmix``, ``prterun``): ``PMIX_RANK``, the size from ``PMIX_SIZE``,
   ``OMPI_COMM_WORLD_SIZE`` or the Slurm step's task count.
3. MPICH / Intel MPI (Hydra): ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``.
4. A Slurm job step of more than one task (``srun -n R``): ``SLURM_PROCID``,
   ``SLURM_STEP_NUM_TASKS`` (or ``SLURM_NTASKS``), ``SLURM_LOCALID``.
5. torchrun / torch.distributed.launch: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
   ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``. They come after a multi-task Slurm
   step but before a one-task one, so ``srun -n 1 torchrun --nproc_per_node 4`` is 4 ranks.
6. Otherwise a single process (world size 1). The batch script of an ``sbatch`` job carries
   ``SLURM_PROCID=0`` and ``SLURM_NTASKS`` of the whole allocation, but it is one process;
   Slurm variables count only inside a job step (``SLURM_STEP_ID`` set and not the batch or
   extern step).
"""
from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Mapping, Optional

from ..errors import HpctrainError

# Step ids Slurm gives the batch script and the extern step; processes there are not srun tasks.
_NON_TASK_STEP_IDS = {"batch", "extern", "interactive", "4294967294", "4294967295", "4294967293",
                      "4294967292"}


@dataclass(frozen=True)
class RankEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_size: int = 1
    source: str = "single"  # openmpi | pmix | mpich | slurm | torchrun | single
    node_list: tuple[str, ...] = field(default_factory=tuple)  # hosts of the job step (Slurm)
    master_addr: Optional[str] = None  # a rendezvous host known from the environment
    master_port: Optional[int] = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def mpi_launched(self) -> bool:
        """True when an MPI launcher started this process, so MPI_Init joins the other ranks."""
        return self.source in ("openmpi", "pmix", "mpich")

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} (local {self.local_rank}/{self.local_size}) "
                f"from {self.source}")


# --------------------------------------------------------------------------- Slurm host lists


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list: ``node[01-03,07],gpu5`` -> node01 node02 node03 node07 gpu5.

    Zero padding is kept (``[08-10]`` -> 08 09 10); several bracket groups in one name
    (``r[1-2]n[1-2]``) expand to their product, as Slurm does.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        if item:
            hosts.extend(_expand_host(item, nodelist))
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _expand_host(item: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        if "[" in item or "]" in item:
            raise HpctrainError(f"Slurm node list {whole!r}: unbalanced brackets in {item!r}")
        return [item]
    prefix, ranges, rest = item[:m.start()], m.group(1), item[m.end():]
    tails = _expand_host(rest, whole) if rest else [""]
    return [prefix + number + tail for number in _expand_ranges(ranges, whole) for tail in tails]


def _expand_ranges(ranges: str, whole: str) -> list[str]:
    numbers: list[str] = []
    for part in ranges.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise HpctrainError(f"Slurm node list {whole!r}: cannot read the range {part!r}; "
                                "expected N or N-M")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise HpctrainError(f"Slurm node list {whole!r}: range {part!r} runs backwards")
        width = len(lo) if lo.startswith("0") else 0
        numbers.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return numbers


def expand_tasks_per_node(spec: str) -> list[int]:
    """``2(x3),1`` -> [2, 2, 2, 1] (the form of SLURM_STEP_TASKS_PER_NODE)."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            return []
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


# --------------------------------------------------------------------------- discovery


def discover(environ: Optional[Mapping[str, str]] = None) -> RankEnv:
    """This process's rank environment (see the module docstring for the order of sources)."""
    env = os.environ if environ is None else environ
    for probe in (_openmpi, _pmix, _mpich):
        found = probe(env)
        if found is not None:
            return _check(found, env)
    slurm = _slurm_step(env)
    if slurm is not None and slurm.world_size > 1:
        return _check(slurm, env)
    torchrun = _torchrun(env)
    if torchrun is not None:
        return _check(torchrun, env)
    if slurm is not None:
        return _check(slurm, env)
    return RankEnv()


def _int(env: Mapping[str, str], *names: str, default: Optional[int] = None) -> Optional[int]:
    """The first of ``names`` that is set, as an int; a set but unreadable value is an error."""
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise HpctrainError(f"environment variable {name}={value!r}: expected an integer") from None
    return default


def _slurm_hints(env: Mapping[str, str]) -> dict:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    nodes = tuple(expand_nodelist(nodelist)) if nodelist else ()
    return {"node_list": nodes, "master_addr": nodes[0] if nodes else None,
            "master_port": slurm_rendezvous_port(env) if nodes else None}


def slurm_rendezvous_port(env: Mapping[str, str]) -> int:
    """A port every task of one Slurm step computes alike, without talking to the others.

    Derived from the job and step ids, so two steps on one node (an array's elements, two
    sruns) pick different ports; MASTER_PORT overrides it.
    """
    explicit = _int(env, "MASTER_PORT")
    if explicit is not None:
        return explicit
    key = f"{env.get('SLURM_JOB_ID', '')}.{env.get('SLURM_STEP_ID', env.get('SLURM_STEPID', ''))}"
    return 20000 + zlib.crc32(key.encode()) % 20000


def _in_slurm_step(env: Mapping[str, str]) -> bool:
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    return step is not None and step not in _NON_TASK_STEP_IDS and "SLURM_PROCID" in env


def _openmpi(env: Mapping[str, str]) -> Optional[RankEnv]:
    rank = _int(env, "OMPI_COMM_WORLD_RANK")
    if rank is None:
        return None
    size = _int(env, "OMPI_COMM_WORLD_SIZE", default=1)
    hints = _slurm_hints(env) if _in_slurm_step(env) else {}
    # The Slurm rendezvous hints describe the daemon step of mpirun, not the ranks: keep the hosts only.
    return RankEnv(rank, size, _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0),
                   _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", default=1), "openmpi",
                   node_list=hints.get("node_list", ()))


def _pmix(env: Mapping[str, str]) -> Optional[RankEnv]:
    rank = _int(env, "PMIX_RANK")
    if rank is None:
        return None
    size = _int(env, "PMIX_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1)
    local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "PMIX_LOCAL_RANK", "SLURM_LOCALID", default=0)
    local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "PMIX_LOCAL_SIZE", default=None)
    hints = _slurm_hints(env) if _in_slurm_step(env) else {}
    if local_size is None:
        local_size = _slurm_local_size(env) or 1
    return RankEnv(rank, size, local_rank, local_size, "pmix", **hints)


def _mpich(env: Mapping[str, str]) -> Optional[RankEnv]:
    rank = _int(env, "PMI_RANK")
    size = _int(env, "PMI_SIZE")
    if rank is None or size is None:
        return None
    local_rank = _int(env, "MPI_LOCALRANKID", default=0)
    local_size = _int(env, "MPI_LOCALNRANKS", default=1)
    return RankEnv(rank, size, local_rank, local_size, "mpich")


def _slurm_local_size(env: Mapping[str, str]) -> Optional[int]:
    counts = expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "")
    node = _int(env, "SLURM_NODEID", default=0)
    return counts[node] if counts and node < len(counts) else None


def _slurm_step(env: Mapping[str, str]) -> Optional[RankEnv]:
    if not _in_slurm_step(env):
        return None
    rank = _int(env, "SLURM_PROCID", default=0)
    size = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS", default=1)
    local_rank = _int(env, "SLURM_LOCALID", default=0)
    return RankEnv(rank, size, local_rank, _slurm_local_size(env) or 1, "slurm", **_slurm_hints(env))


def _torchrun(env: Mapping[str, str]) -> Optional[RankEnv]:
    rank, size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if rank is None or size is None:
        return None
    local_rank = _int(env, "LOCAL_RANK", default=0)
    local_size = _int(env, "LOCAL_WORLD_SIZE", default=1)
    return RankEnv(rank, size, local_rank, local_size, "torchrun",
                   master_addr=env.get("MASTER_ADDR") or None, master_port=_int(env, "MASTER_PORT"))


def _check(found: RankEnv, env: Mapping[str, str]) -> RankEnv:
    if found.world_size < 1 or not 0 <= found.rank < found.world_size:
        raise HpctrainError(f"rank environment from {found.source}: rank {found.rank} with world size "
                            f"{found.world_size}; expected 0 <= rank < world size")
    if found.local_rank < 0 or found.local_size < 1:
        raise HpctrainError(f"rank environment from {found.source}: local rank {found.local_rank} of local size "
                            f"{found.local_size}; expected local rank >= 0 and local size >= 1")
    return found
