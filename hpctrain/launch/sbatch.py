"""Render self-contained sbatch scripts: the grid as one job array, and the collector job.

Every value from a config that reaches a script is either validated against a strict
pattern (names, partitions, paths in ``#SBATCH`` lines, where the shell does not parse)
or passed through ``shlex.quote`` (commands); setup lines are the user's own shell code,
so they are only checked to be single lines without control characters.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import Iterable, Optional

from ..config import NAME_PATTERN, SLURM_CONSTRAINT, SLURM_WORD, Config, SlurmConfig
from ..errors import ConfigError

# Exit status of `hpctrain run` when it stopped on a signal after saving its checkpoint.
EXIT_PREEMPTED = 75
PREEMPT_SIGNAL = "USR1"
# Paths that go into #SBATCH lines (not parsed by a shell) and into the script: plain characters only.
SAFE_PATH = r"^[A-Za-z0-9_./+=,@%:~-]+$"
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def check_setup_line(line: str, where: str = "slurm.setup") -> str:
    """A setup line runs as written (module load, source venv/bin/activate); it must be one line."""
    if not isinstance(line, str):
        raise ConfigError(f"{where}: expected a string, got {line!r}")
    if _CONTROL.search(line):
        raise ConfigError(f"{where}: {line!r} contains a newline or control character; "
                          "expected one shell command per list item")
    return line


def check_word(value: Optional[str], key: str, pattern: str = SLURM_WORD) -> Optional[str]:
    if value is not None and not re.match(pattern, value):
        raise ConfigError(f"{key}: {value!r} is not a valid value; expected text matching {pattern}")
    return value


def check_path(path: str | os.PathLike, what: str) -> str:
    text = str(path)
    if not re.match(SAFE_PATH, text):
        raise ConfigError(f"{what}: {text!r} contains spaces or shell characters; expected a path "
                          f"matching {SAFE_PATH} (it is written into #SBATCH lines)")
    return text


def validate_slurm(cfg: SlurmConfig) -> None:
    """Re-check every field that reaches a script, whatever built the config object."""
    check_word(cfg.partition, "slurm.partition")
    check_word(cfg.account, "slurm.account")
    check_word(cfg.qos, "slurm.qos")
    check_word(cfg.constraint, "slurm.constraint", SLURM_CONSTRAINT)
    for i, line in enumerate(cfg.setup):
        check_setup_line(line, f"slurm.setup[{i}]")
    for i, arg in enumerate(cfg.srun_args):
        if not isinstance(arg, str) or _CONTROL.search(arg):
            raise ConfigError(f"slurm.srun_args[{i}]: {arg!r}: expected one srun option per item, "
                              "without newlines or control characters")


def root_mpi_lines() -> list[str]:
    """Open MPI refuses to start as root unless told so (containers, test clusters)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return ["export OMPI_ALLOW_RUN_AS_ROOT=1", "export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"]
    return []


def setup_lines(cfg: SlurmConfig) -> list[str]:
    validate_slurm(cfg)
    return list(cfg.setup) + root_mpi_lines()


def mem_option(mem_gb: Optional[float]) -> Optional[str]:
    if mem_gb is None:
        return None
    return f"{int(mem_gb)}G" if float(mem_gb).is_integer() else f"{int(mem_gb * 1024)}M"


def resource_options(cfg: SlurmConfig) -> list[tuple[str, str]]:
    """(option, value) pairs for the resources of one array element."""
    validate_slurm(cfg)
    opts = [("nodes", str(cfg.nodes)), ("ntasks-per-node", str(cfg.tasks_per_node)),
            ("cpus-per-task", str(cfg.cpus_per_task)), ("time", str(cfg.time_min))]
    if cfg.gpus_per_node:
        opts.append(("gpus-per-node", str(cfg.gpus_per_node)))
    mem = mem_option(cfg.mem_gb)
    if mem:
        opts.append(("mem", mem))
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(cfg, key)
        if value is not None:
            opts.append((key, value))
    return opts


def srun_args(cfg: SlurmConfig) -> list[str]:
    """``--mpi=pmix`` whenever an element has more than one task (MPI ranks under srun)."""
    validate_slurm(cfg)
    extra = list(cfg.srun_args)
    if cfg.nodes * cfg.tasks_per_node > 1 and not any(a.startswith("--mpi") for a in extra):
        extra.insert(0, "--mpi=pmix")
    return extra


def array_spec(indices: Iterable[int], parallelism: int) -> str:
    """``0-5%4`` for a full grid, ``1,4,7%2`` (compressed to ranges) for a subset."""
    ids = sorted(set(int(i) for i in indices))
    if not ids:
        raise ValueError("an array needs at least one index")
    parts, start, prev = [], ids[0], ids[0]
    for i in ids[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return f"{','.join(parts)}%{min(parallelism, len(ids))}"


def _sbatch(option: str, value: Optional[str] = None) -> str:
    return f"#SBATCH --{option}" if value is None else f"#SBATCH --{option}={value}"


def render_array_script(cfg: Config, *, sweep_dir: str | os.PathLike, config_path: str | os.PathLike,
                        indices: Iterable[int], python: Optional[str] = None) -> str:
    """The sbatch script of the whole grid: one array element per grid point.

    The elements run ``python -m hpctrain run CONFIG --index $SLURM_ARRAY_TASK_ID`` under
    ``srun``; on USR1 (sent ``signal_delay_s`` before the time limit, or by ``scancel
    --signal=USR1``) every task stops at the same step, rank 0 saves the checkpoint, they
    exit with status 75 and the script requeues the element, at most ``slurm.max_requeues``
    times (``SLURM_RESTART_COUNT``).
    """
    s = cfg.slurm
    name = check_word(cfg.name, "name", NAME_PATTERN)
    sweep = check_path(Path(sweep_dir).absolute(), "the sweep folder")
    config = check_path(Path(config_path).absolute(), "the config path")
    python = python or sys.executable
    indices = list(indices)
    lines = ["#!/bin/bash",
             f"# Job array for sweep {name}: {len(indices)} grid point(s), written by `hpctrain sbatch`.",
             "# Submit with: sbatch THIS_FILE    Watch with: hpctrain status " + shlex.quote(sweep),
             _sbatch("job-name", name),
             _sbatch("array", array_spec(indices, s.array_parallelism))]
    lines += [_sbatch(k, v) for k, v in resource_options(s)]
    lines += [_sbatch("signal", f"{PREEMPT_SIGNAL}@{s.signal_delay_s}"),
              _sbatch("requeue"),
              _sbatch("open-mode", "append"),
              _sbatch("output", f"{sweep}/logs/%A_%a.out"),
              "",
              "# setup"]
    lines += [check_setup_line(line) for line in s.setup] + root_mpi_lines()
    lines += ["export PYTHONUNBUFFERED=1",
              "",
              f"PYTHON={shlex.quote(python)}",
              f"CONFIG={shlex.quote(config)}",
              f"SWEEP_DIR={shlex.quote(sweep)}",
              f"MAX_REQUEUES={int(s.max_requeues)}",
              ""]
    lines += run_and_requeue_lines(srun_args(s), sweep_dir_arg=True)
    return "\n".join(lines) + "\n"


def run_and_requeue_lines(srun_extra: list[str], *, sweep_dir_arg: bool) -> list[str]:
    """The srun line and the requeue decision, shared by rendered scripts and jobs/*.sbatch."""
    srun = " ".join(["srun", *map(shlex.quote, srun_extra)])
    sweep = ' --sweep-dir "$SWEEP_DIR"' if sweep_dir_arg else ""
    return [
        f'{srun} "$PYTHON" -m hpctrain run "$CONFIG" --index "${{SLURM_ARRAY_TASK_ID:-0}}"{sweep}',
        "status=$?",
        f"if [ \"$status\" -eq {EXIT_PREEMPTED} ]; then",
        "    # Stopped on a signal after saving its checkpoint: requeue this element to resume.",
        '    if [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then',
        '        echo "hpctrain: preempted; requeueing job $SLURM_JOB_ID (requeue $(( ${SLURM_RESTART_COUNT:-0} + 1 )) of $MAX_REQUEUES)"',
        '        scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "    else",
        '        echo "hpctrain: preempted; not requeued: $MAX_REQUEUES requeue(s) done; submit again to resume"',
        "    fi",
        "fi",
        'exit "$status"',
    ]


def render_collector_script(cfg: Config, *, sweep_dir: str | os.PathLike, python: Optional[str] = None) -> str:
    """One small job that runs ``hpctrain collect`` after the array ends (whatever its outcome)."""
    s = cfg.slurm
    name = check_word(cfg.name, "name", NAME_PATTERN)
    sweep = check_path(Path(sweep_dir).absolute(), "the sweep folder")
    lines = ["#!/bin/bash",
             f"# Collector for sweep {name}, written by `hpctrain submit`.",
             _sbatch("job-name", f"{name}-collect"),
             _sbatch("ntasks", "1"),
             _sbatch("time", "30"),
             _sbatch("output", f"{sweep}/logs/collect_%j.out")]
    for key in ("partition", "account", "qos"):
        value = check_word(getattr(s, key), f"slurm.{key}")
        if value is not None:
            lines.append(_sbatch(key, value))
    lines += ["", "# setup"] + [check_setup_line(line) for line in s.setup]
    lines += ["", " ".join([shlex.quote(python or sys.executable), "-m", "hpctrain", "collect", shlex.quote(sweep)]), ""]
    return "\n".join(lines)
