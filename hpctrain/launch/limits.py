"""The cluster's limits on what one submission may ask, read once, and the split they force.

MaxArraySize caps the array *index*, not only the element count (``--array=1001-2000`` is
refused under a limit of 1001), so a larger sweep becomes several arrays whose indices each
start at 0; element ``k`` of the array at offset ``o`` trains grid point ``o + k``.
MaxJobCount (the controller's) and MaxSubmitJobs (the user's association, visible only
where accounting answers) count array elements one by one; they cannot be split around.
"""
from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Iterable, Optional

from ..errors import HpctrainError

NO_ACCOUNTING = "accounting_storage/none"


def _run(args: list[str], timeout: float) -> Optional[str]:
    """stdout of a Slurm client, or None when it is missing, fails or does not answer."""
    if shutil.which(args[0]) is None:
        return None
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return result.stdout if result.returncode == 0 else None


_CACHE_S = 60.0
_asked: dict[Optional[str], tuple[float, dict[str, str]]] = {}


def cluster_config() -> dict[str, str]:
    """``scontrol show config`` as a map; empty when no cluster answers.

    Asked once per submission or status: kept a minute per SLURM_CONF, so a long-lived
    process (``status --watch``) still sees an admin's change.
    """
    key = os.environ.get("SLURM_CONF")
    hit = _asked.get(key)
    if hit and time.monotonic() - hit[0] < _CACHE_S:
        return hit[1]
    text = _run(["scontrol", "show", "config"], 30) or ""
    pairs = (re.match(r"^(\w+)\s*=\s*(.*?)\s*$", line) for line in text.splitlines())
    config = {m.group(1): m.group(2) for m in pairs if m}
    _asked[key] = (time.monotonic(), config)
    return config


def accounting_on() -> Optional[bool]:
    """Whether the controller stores accounting (sacct answers); None when no cluster answers."""
    kind = cluster_config().get("AccountingStorageType")
    return None if kind is None else kind != NO_ACCOUNTING


def _int(value: Optional[str]) -> Optional[int]:
    return int(value) if value and value.isdigit() else None


def max_submit_jobs() -> Optional[int]:
    """The user's MaxSubmitJobs from their association; None without one or without accounting."""
    if not accounting_on():
        return None
    text = _run(["sacctmgr", "-n", "-P", "show", "assoc", f"where user={getpass.getuser()}",
                 "format=MaxSubmit"], 15) or ""
    values = [int(v) for v in text.split() if v.isdigit()]
    return min(values) if values else None


@dataclass(frozen=True)
class Limits:
    max_array_size: Optional[int] = None  # array indices must stay below it
    max_job_count: Optional[int] = None
    max_submit_jobs: Optional[int] = None


def cluster_limits() -> Limits:
    config = cluster_config()
    return Limits(_int(config.get("MaxArraySize")), _int(config.get("MaxJobCount")), max_submit_jobs())


@dataclass(frozen=True)
class Chunk:
    """One job array of a split sweep: element ``k`` runs grid point ``offset + tasks[k]``."""
    offset: int
    tasks: tuple[int, ...]

    @property
    def indices(self) -> list[int]:
        return [self.offset + t for t in self.tasks]


def split(indices: Iterable[int], max_array_size: Optional[int]) -> list[Chunk]:
    """Grid indices as arrays whose task ids stay below ``max_array_size`` (one array when None)."""
    ids = sorted(set(int(i) for i in indices))
    if not ids:
        return []
    if max_array_size is None:
        return [Chunk(0, tuple(ids))]
    chunks, start = [], 0
    while start < len(ids):
        offset = ids[start]
        end = start
        while end < len(ids) and ids[end] - offset < max_array_size:
            end += 1
        chunks.append(Chunk(offset, tuple(i - offset for i in ids[start:end])))
        start = end
    return chunks


def check_limits(elements: int, grid_size: int, limits: Limits) -> None:
    """Refuse, before anything is written, a submission that no split makes acceptable."""
    where = "`scontrol show config`"
    if limits.max_array_size is not None and limits.max_array_size < 1:
        raise HpctrainError(f"this cluster's MaxArraySize is {limits.max_array_size} ({where}): it takes no "
                            "job arrays; ask its admins")
    for name, limit, source in (("MaxJobCount", limits.max_job_count, where),
                                ("MaxSubmitJobs", limits.max_submit_jobs, "your association, `sacctmgr show assoc`")):
        if limit is not None and elements > limit:
            raise HpctrainError(
                f"the sweep has {grid_size} grid point(s); submitting {elements} array element(s) is more than "
                f"this cluster takes: {name} is {limit} ({source}); every element counts. Submit fewer at once: "
                "fix a swept key with KEY=VALUE, or submit again once some have ended")
