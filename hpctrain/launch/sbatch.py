"""sbatch scripts from one template: the grid's array, the shipped jobs/*.sbatch, the collector.

An element script is the launch spec's ``#SBATCH`` lines, the setup lines, one
``srun ... python -m hpctrain run CONFIG --index OFFSET+$SLURM_ARRAY_TASK_ID`` and the step's
epilogue (launch/step_end.py: a run whose ranks were killed is recorded failed). It holds no
requeue logic: ``hpctrain run`` checkpoints on the preemption signal and requeues its own
element (launch/element.py), so the script, the submitit path and the local executor
behave the same. ``jobs/*.sbatch`` are rendered from ``jobs/profiles.yaml``
by ``scripts/make-jobs.py``; a test renders them again and fails on any difference.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Iterable, Optional

from ..config import NAME_PATTERN, Config, SlurmConfig
from .spec import (Options, check_path, check_setup_line, check_word, extra_options, sbatch_line,
                   sbatch_options, setup_lines, srun_args)

# Array task ids stay below the cluster's MaxArraySize, so a larger grid is several arrays,
# each starting at task 0: the grid index is the array's offset plus the task id.
OFFSET_VARIABLE = "HPCTRAIN_INDEX_OFFSET"
RUN_INDEX = f'--index "$((${{{OFFSET_VARIABLE}:-0}} + ${{SLURM_ARRAY_TASK_ID:-0}}))"'


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


def element_script(slurm: SlurmConfig, *, job_name: str, header: list[str], array: str, output: str,
                   variables: list[str], run_args: str, notes: Optional[dict] = None) -> str:
    """The one template of an array element's script.

    ``variables`` are shell assignments (already quoted) made before the srun line;
    ``run_args`` follows ``-m hpctrain run``; ``notes`` adds a comment to an option's line.
    """
    notes = notes or {}
    options: Options = [("job-name", check_word(job_name, "name", NAME_PATTERN)), ("array", array)]
    options += [o for o in sbatch_options(slurm, job_name) if o[0] != "job-name"]
    options += [("open-mode", "append"), ("output", output)]
    lines = ["#!/bin/bash", *(f"# {h}".rstrip() for h in header)]
    lines += [_with_note(sbatch_line(k, v), notes.get(k)) for k, v in options]
    lines += ["", "# setup", *setup_lines(slurm), "", *variables, ""]
    srun = " ".join(["srun", *map(shlex.quote, srun_args(slurm))])
    lines.append(f'{srun} "$PYTHON" -m hpctrain run {run_args}')
    lines.append(f'"$PYTHON" -m hpctrain.launch.step_end $? {run_args}  # records a run whose ranks were killed')
    return "\n".join(lines) + "\n"


def _with_note(line: str, note: Optional[str]) -> str:
    return line if not note else f"{line:<34} # {note}"


def render_array_script(cfg: Config, *, sweep_dir: str | os.PathLike, config_path: str | os.PathLike,
                        indices: Iterable[int], python: Optional[str] = None, offset: int = 0,
                        part: str = "") -> str:
    """The sbatch script of a sweep, or of one part of it: element k trains grid point
    ``offset + k`` of the sweep's sweep.yaml."""
    sweep = check_path(Path(sweep_dir).absolute(), "the sweep folder")
    config = check_path(Path(config_path).absolute(), "the config path")
    indices = list(indices)
    header = [f"Job array for sweep {cfg.name}{part}: {len(indices)} grid point(s) from index {offset}, "
              "written by `hpctrain sbatch`.",
              f"Submit with: sbatch THIS_FILE    Watch with: hpctrain status {shlex.quote(sweep)}",
              f"On {cfg.slurm.preempt_signal} (time limit near, or preemption) every rank stops at the same step,",
              "rank 0 saves the checkpoint and requeues this element (slurm.max_requeues times at most)."]
    variables = [f"PYTHON={shlex.quote(python or sys.executable)}", f"CONFIG={shlex.quote(config)}",
                 f"SWEEP_DIR={shlex.quote(sweep)}", f"{OFFSET_VARIABLE}={int(offset)}"]
    return element_script(cfg.slurm, job_name=cfg.name, header=header,
                          array=array_spec([i - offset for i in indices], cfg.slurm.array_parallelism),
                          output=f"{sweep}/logs/%A_%a.out", variables=variables,
                          run_args=f'"$CONFIG" {RUN_INDEX} --sweep-dir "$SWEEP_DIR"')


# The usage part of every shipped job script: CONFIG and overrides come from sbatch's arguments.
JOB_USAGE = [
    "",
    "Usage: sbatch [--array=0-(N-1)%P] THIS_FILE CONFIG [KEY=VALUE ...]",
    f"Each array element trains grid point ${OFFSET_VARIABLE} + $SLURM_ARRAY_TASK_ID (offset 0 unless",
    "set) of CONFIG on all its tasks (srun --mpi=pmix: one MPI world per element). Task ids stay",
    "below the cluster's MaxArraySize: submit a larger grid as several arrays with an offset, e.g.",
    f"sbatch --array=0-999 --export=ALL,{OFFSET_VARIABLE}=1000 THIS_FILE CONFIG  (points 1000-1999).",
    "The sweep folder is sweeps/<name> under the folder you submit from; watch it with:",
    "hpctrain status sweeps/<name>",
    "The element checkpoints on the preemption signal and requeues itself (slurm.max_requeues",
    "of CONFIG); hpctrain run's exit status: 0 done/diverged, 1 failed, 2 bad config,",
    "69 a rank died or hung, 75 preempted and not requeued.",
    "Python: the one on PATH after the setup lines, or $HPCTRAIN_PYTHON (sbatch passes it on).",
    "Generated by scripts/make-jobs.py from jobs/profiles.yaml: edit the profile, or edit this file.",
]
JOB_VARIABLES = ['PYTHON="${HPCTRAIN_PYTHON:-python3}"',
                 'CONFIG="${1:?usage: sbatch [--array=0-(N-1)%P] $0 CONFIG [KEY=VALUE ...]}"',
                 "shift"]


def render_job_template(profile: dict, source: str = "jobs/profiles.yaml") -> str:
    """A shipped jobs/*.sbatch: a profile's resources, taking CONFIG and overrides as arguments."""
    from ..config import build_config

    name = profile["name"]
    cfg = build_config({"name": name, "slurm": profile["slurm"]}, f"{source}: {name}")
    return element_script(cfg.slurm, job_name=name, header=[profile["description"], *JOB_USAGE],
                          array=profile["array"], output="hpctrain-%A_%a.out", variables=JOB_VARIABLES,
                          run_args=f'"$CONFIG" "$@" {RUN_INDEX}', notes=profile.get("notes"))


def render_collector_script(cfg: Config, *, sweep_dir: str | os.PathLike, python: Optional[str] = None) -> str:
    """One small job that runs ``hpctrain collect`` after the array ends (whatever its outcome)."""
    s = cfg.slurm
    name = check_word(cfg.name, "name", NAME_PATTERN)
    sweep = check_path(Path(sweep_dir).absolute(), "the sweep folder")
    lines = ["#!/bin/bash",
             f"# Collector for sweep {name}, written by `hpctrain submit`.",
             sbatch_line("job-name", f"{name}-collect"),
             sbatch_line("ntasks", "1"),
             sbatch_line("time", "30"),
             sbatch_line("output", f"{sweep}/logs/collect_%j.out")]
    extra = dict(extra_options(s))  # where a site needs an account or qos, the collector does too
    for key in ("partition", "account", "qos"):
        value = check_word(getattr(s, key), f"slurm.{key}") or extra.get(key)
        if value is not None:
            lines.append(sbatch_line(key, value))
    lines += ["", "# setup"] + [check_setup_line(line) for line in s.setup]
    lines += ["", " ".join([shlex.quote(python or sys.executable), "-m", "hpctrain", "collect", shlex.quote(sweep)]), ""]
    return "\n".join(lines)
