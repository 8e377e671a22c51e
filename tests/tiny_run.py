"""The smallest real `hpctrain run`: a tiny synthetic dataset and model, launched as 2 MPI ranks.

Shared by the tests that launch whole runs many times (tests/test_launch_stress.py,
tests/test_dist_teardown.py): each launch takes a few seconds, most of it importing torch.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from mpi_scripts.launch import MPIRUN_ARGS, REPO, clean_env

PYTHON = sys.executable


def write_tiny_config(folder: Path, backend: str, *, name: str = "tiny", data: Path | None = None,
                      lr: float = 0.01) -> Path:
    """A one-epoch, one-point config; the data (made on first use) may be shared between configs."""
    cfg = {"name": name, "seed": 0,
           "data": {"path": str(data or folder / "data"), "task": "binary", "batch_size": 64,
                    "synth": {"rows": 600, "features": 4, "shards": 2, "seed": 0}},
           "model": {"hidden": [8]}, "optim": {"name": "adam", "lr": lr},
           "train": {"epochs": 1, "threads": 1}, "dist": {"backend": backend, "timeout_s": 60}}
    path = folder / f"{name}-{backend}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@dataclass
class Launch:
    """One finished `mpirun -np 2 ... hpctrain run`: its exit status, output and final run status."""
    returncode: int
    stdout: str
    stderr: str
    status: str

    def tail(self, chars: int = 1500) -> str:
        return (self.stdout[-chars:] + "\n--- stderr ---\n" + self.stderr[-chars:]).strip()


def run_status(sweep_dir: Path) -> str:
    """The status in state.json of the (single) run of a sweep folder; '?' when there is none."""
    states = sorted(Path(sweep_dir).glob("runs/*/state.json"))
    if len(states) != 1:
        return "?"
    try:
        return json.loads(states[0].read_text()).get("status", "?")
    except ValueError:
        return "?"


def mpirun_command(np: int, *command: str) -> list[str]:
    return ["mpirun", "-np", str(np), *MPIRUN_ARGS, *command]


def launch_run(config: Path, sweep_dir: Path, *, np: int = 2, timeout: float = 180, env: dict | None = None) -> Launch:
    """`mpirun -np NP python -m hpctrain run CONFIG --index 0 --sweep-dir SWEEP_DIR`."""
    cmd = mpirun_command(np, PYTHON, "-m", "hpctrain", "run", str(config), "--index", "0",
                         "--sweep-dir", str(sweep_dir))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env or clean_env())
    except subprocess.TimeoutExpired as exc:
        return Launch(124, _text(exc.stdout), _text(exc.stderr) + f"\n(timed out after {timeout:.0f} s)",
                      run_status(sweep_dir))
    return Launch(out.returncode, out.stdout, out.stderr, run_status(sweep_dir))


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data
