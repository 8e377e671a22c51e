"""The launch spec: what an array element asks Slurm for, in one place.

``sbatch_options`` turns a config's ``slurm:`` section into sbatch options; the submitit
path (``slurm.executor_for``), the scripts ``hpctrain sbatch`` renders and the shipped
``jobs/*.sbatch`` all take them from here, with the srun arguments and setup lines.

Every value that reaches a script is either checked against a strict pattern (``#SBATCH``
lines are not parsed by a shell) or shell-quoted by the renderer; setup lines are the
user's own shell code, so they are only checked to be single lines.
"""
from __future__ import annotations

import os
from typing import Optional

from ..config import CONTROL_CHARS, NAME_PATTERN, SLURM_CONSTRAINT, SLURM_WORD, SlurmConfig, full_match
from ..errors import ConfigError

# Paths that go into #SBATCH lines and scripts: plain characters only (matched whole: a
# trailing newline would end the #SBATCH line early).
SAFE_PATH = r"^[A-Za-z0-9_./+=,@%:~-]+$"

Options = list[tuple[str, Optional[str]]]  # (option, value); None for a flag such as --requeue

# slurm.sbatch_extra: any sbatch long option by name, with a value of plain characters (no
# spaces, quotes or shell metacharacters: submitit writes it into a shell script).
EXTRA_KEY = r"^[a-z][a-z0-9-]*$"
EXTRA_VALUE = r"^[A-Za-z0-9_.,:+@%=/-]+$"
# Options hpctrain sets from its own keys, or that would break the array's plumbing.
OWNED_OPTIONS = {"job-name": "name", "nodes": "slurm.nodes", "ntasks-per-node": "slurm.tasks_per_node",
                 "ntasks": "slurm.nodes and slurm.tasks_per_node", "cpus-per-task": "slurm.cpus_per_task",
                 "time": "slurm.time_min", "mem": "slurm.mem_gb", "gpus-per-node": "slurm.gpus_per_node",
                 "signal": "slurm.preempt_signal and slurm.signal_delay_s", "requeue": None, "no-requeue": None,
                 "array": None, "output": None, "error": None, "open-mode": None, "wrap": None,
                 "dependency": None, "parsable": None, "chdir": None, "export": None, "wait": None}


# --------------------------------------------------------------------------- checks


def check_setup_line(line: str, where: str = "slurm.setup") -> str:
    """A setup line runs as written (module load, source venv/bin/activate); it must be one line."""
    if not isinstance(line, str):
        raise ConfigError(f"{where}: expected a string, got {line!r}")
    if CONTROL_CHARS.search(line):
        raise ConfigError(f"{where}: {line!r} contains a newline or control character; "
                          "expected one shell command per list item")
    return line


def check_word(value: Optional[str], key: str, pattern: str = SLURM_WORD) -> Optional[str]:
    if value is not None and not full_match(pattern, value):
        raise ConfigError(f"{key}: {value!r} is not a valid value; expected text matching {pattern}")
    return value


def check_path(path: str | os.PathLike, what: str) -> str:
    text = str(path)
    if not full_match(SAFE_PATH, text):
        raise ConfigError(f"{what}: {text!r} contains spaces or shell characters; expected a path "
                          f"matching {SAFE_PATH} (it is written into #SBATCH lines)")
    return text


def validate_slurm(cfg: SlurmConfig) -> None:
    """Re-check every field that reaches a script, whatever built the config object."""
    check_word(cfg.partition, "slurm.partition")
    check_word(cfg.account, "slurm.account")
    check_word(cfg.qos, "slurm.qos")
    check_word(cfg.constraint, "slurm.constraint", SLURM_CONSTRAINT)
    if cfg.preempt_signal not in ("USR1", "USR2"):
        raise ConfigError(f"slurm.preempt_signal: {cfg.preempt_signal!r}; expected USR1 or USR2")
    for i, line in enumerate(cfg.setup):
        check_setup_line(line, f"slurm.setup[{i}]")
    for i, arg in enumerate(cfg.srun_args):
        if not isinstance(arg, str) or CONTROL_CHARS.search(arg):
            raise ConfigError(f"slurm.srun_args[{i}]: {arg!r}: expected one srun option per item, "
                              "without newlines or control characters")
    extra_options(cfg)


def extra_options(cfg: SlurmConfig) -> Options:
    """slurm.sbatch_extra as options: ``true`` is a bare flag, ``false`` leaves the option out."""
    extra = cfg.sbatch_extra
    if not isinstance(extra, dict):
        raise ConfigError(f"slurm.sbatch_extra: expected a mapping of sbatch options, got {extra!r}")
    opts: Options = []
    for key, value in extra.items():
        opts += _extra_option(cfg, key, value)
    return opts


def _extra_option(cfg: SlurmConfig, key, value) -> Options:
    where = f"slurm.sbatch_extra: {key!r}"
    if not isinstance(key, str) or not full_match(EXTRA_KEY, key):
        raise ConfigError(f"{where}: not an sbatch option name; expected a long option without dashes, "
                          f"matching {EXTRA_KEY} (e.g. mail-type)")
    if key in OWNED_OPTIONS:
        instead = OWNED_OPTIONS[key]
        raise ConfigError(f"{where}: hpctrain sets --{key} itself" + (f"; use {instead}" if instead else ""))
    if key in ("partition", "account", "qos", "constraint") and getattr(cfg, key) is not None:
        raise ConfigError(f"{where}: also given as slurm.{key} ({getattr(cfg, key)!r}); keep one")
    if value is True:
        return [(key, None)]
    if value is False:
        return []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not full_match(EXTRA_VALUE, value):
        raise ConfigError(f"{where}: value {value!r} is not allowed; expected true, false, a number or text "
                          f"matching {EXTRA_VALUE} (no spaces, quotes, newlines or shell characters)")
    return [(key, value)]


# --------------------------------------------------------------------------- the spec


def mem_option(mem_gb: Optional[float]) -> Optional[str]:
    if mem_gb is None:
        return None
    return f"{int(mem_gb)}G" if float(mem_gb).is_integer() else f"{int(mem_gb * 1024)}M"


def sbatch_options(cfg: SlurmConfig, job_name: str) -> Options:
    """The sbatch options of one array element: name, resources, slurm.sbatch_extra, preemption
    signal, requeue.

    ``--signal=SIG@delay`` (no ``B:``) signals every task of the job step, where the ranks
    run; ``--requeue`` lets Slurm requeue the element after preemption or a node failure.
    """
    validate_slurm(cfg)
    opts: Options = [("job-name", check_word(job_name, "name", NAME_PATTERN)),
                     ("nodes", str(cfg.nodes)), ("ntasks-per-node", str(cfg.tasks_per_node)),
                     ("cpus-per-task", str(cfg.cpus_per_task)), ("time", str(cfg.time_min))]
    if cfg.gpus_per_node:
        opts.append(("gpus-per-node", str(cfg.gpus_per_node)))
    if cfg.mem_gb is not None:
        opts.append(("mem", mem_option(cfg.mem_gb)))
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(cfg, key)
        if value is not None:
            opts.append((key, value))
    opts += extra_options(cfg)
    opts += [("signal", f"{cfg.preempt_signal}@{cfg.signal_delay_s}"), ("requeue", None)]
    return opts


def sbatch_line(option: str, value: Optional[str]) -> str:
    return f"#SBATCH --{option}" if value is None else f"#SBATCH --{option}={value}"


def submitit_parameters(options: Options) -> dict:
    """The same options as submitit's ``additional_parameters``, which override its own
    defaults of the same name (its ``_`` keys become ``-`` in the script)."""
    return {key.replace("-", "_"): True if value is None else value for key, value in options}


def srun_args(cfg: SlurmConfig) -> list[str]:
    """``--mpi=pmix`` whenever an element has more than one task (MPI ranks under srun)."""
    validate_slurm(cfg)
    extra = list(cfg.srun_args)
    if cfg.nodes * cfg.tasks_per_node > 1 and not any(a.startswith("--mpi") for a in extra):
        extra.insert(0, "--mpi=pmix")
    return extra


# Open MPI refuses to start as root unless told so (containers, test clusters). A shell
# test rather than a fixed line: the same script may run as root on one machine and not another.
ROOT_MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
ROOT_MPI_LINE = ('if [ "$(id -u)" -eq 0 ]; then export '
                 + " ".join(f"{k}={v}" for k, v in ROOT_MPI_ENV.items()) + "; fi")


def setup_lines(cfg: SlurmConfig) -> list[str]:
    """The user's setup lines, then what every element needs before srun."""
    validate_slurm(cfg)
    return list(cfg.setup) + [ROOT_MPI_LINE, "export PYTHONUNBUFFERED=1"]
