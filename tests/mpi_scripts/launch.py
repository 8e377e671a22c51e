"""Launch the scripts of this folder as real ranks: mpirun -np R, or torchrun-style processes."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PYTHON = sys.executable

# Open MPI refuses to run as root without these; a rank that exits non-zero aborts the job.
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1"}
MPIRUN_ARGS = ["--oversubscribe", "--mca", "orte_abort_on_non_zero_status", "1"]
LAUNCHER_VARS = ("OMPI_", "PMIX_", "PMI_", "SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                 "MASTER_ADDR", "MASTER_PORT", "HOROVOD_")


def clean_env(**extra: str) -> dict:
    """This environment without any launcher's rank variables (pytest may itself run under one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS) or k == "SLURM_CONF"}
    env.update(MPI_ENV)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def mpirun_available() -> bool:
    return shutil.which("mpirun") is not None


def run_mpi(script: str, *args: str, np: int = 2, timeout: float = 60, env: dict | None = None):
    cmd = ["mpirun", "-np", str(np), *MPIRUN_ARGS, PYTHON, str(HERE / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or clean_env(), cwd=REPO)


def run_srun(script: str, *args: str, np: int = 2, mpi: str = "pmix", timeout: float = 90):
    cmd = ["srun", "-n", str(np), f"--mpi={mpi}", "--kill-on-bad-exit=1", "--time=3", PYTHON, str(HERE / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env(), cwd=REPO)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun_style(script: str, *args: str, np: int = 2, timeout: float = 60):
    """R plain processes with the variables torchrun sets (no MPI at all)."""
    port = str(free_port())
    procs = [subprocess.Popen([PYTHON, str(HERE / script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO,
                              env=clean_env(RANK=str(r), WORLD_SIZE=str(np), LOCAL_RANK=str(r),
                                            LOCAL_WORLD_SIZE=str(np), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(np)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def results(stdout: str) -> dict[int, dict]:
    """The `RESULT {json}` lines of every rank, by rank."""
    # mpirun forwards every rank's stdout; a line of one rank may run into another rank's
    # output, so each object is decoded where its marker starts, not line by line.
    found = {}
    decoder = json.JSONDecoder()
    at = stdout.find("RESULT ")
    while at >= 0:
        data, end = decoder.raw_decode(stdout, at + len("RESULT "))
        found[data["backend"]["rank"] if "backend" in data else data["rank"]] = data
        at = stdout.find("RESULT ", end)
    return found
