"""The local cluster without accounting (AccountingStorageType=accounting_storage/none, no
slurmdbd, no sacct): submit, collect and status still work and say what they cannot see;
an element cancelled without requeue, or killed whole, shows in status with Slurm's reason.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from slurm_helpers import restart_cluster, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def no_accounting(slurm_cluster):
    restart_cluster(accounting="none")
    yield slurm_cluster
    restart_cluster()


def hpctrain(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpctrain", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def write_config(folder: Path, name: str, *, points=1, epochs=2, rows=400) -> Path:
    raw = {"name": name, "seed": 0,
           "data": {"path": str(folder / "data"), "task": "binary", "batch_size": 50,
                    "synth": {"rows": rows, "features": 4, "shards": 1, "seed": 0}},
           "model": {"hidden": [8]}, "train": {"epochs": epochs, "threads": 1}, "dist": {"backend": "none"},
           "slurm": {"nodes": 1, "tasks_per_node": 1, "cpus_per_task": 1, "time_min": 10, "array_parallelism": 2},
           "grid": {"seed": list(range(points))}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def status(sweep: Path) -> tuple[str, dict[int, dict]]:
    table = hpctrain("status", sweep)
    assert table.returncode == 0, table.stderr
    rows = hpctrain("status", sweep, "--json").stdout.splitlines()
    return table.stdout, {r["index"]: r for r in map(json.loads, rows)}


def on_disk(sweep: Path, index: int = 0) -> dict:
    for line in (sweep / "grid.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["index"] == index:
            try:
                return json.loads((sweep / "runs" / rec["run_id"] / "state.json").read_text())
            except (FileNotFoundError, ValueError):
                return {"status": "?"}
    raise KeyError(index)


def slurm_state(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-r", "-j", job.split("_")[0], "-o", "%i %T"],
                         capture_output=True, text=True, timeout=30).stdout
    return dict(line.split() for line in out.splitlines()).get(job, "")


def element_pids(element: str) -> list[int]:
    """Every process started for job ``ID`` or array element ``ARRAY_TASK`` (its environment says so)."""
    if "_" in element:
        array, task = element.split("_")
        wanted = {b"SLURM_ARRAY_JOB_ID": array.encode(), b"SLURM_ARRAY_TASK_ID": task.encode()}
    else:
        wanted = {b"SLURM_JOB_ID": element.encode()}
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            environ = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
        except (OSError, ValueError):
            continue
        if all(environ.get(k) == v for k, v in wanted.items()):
            pids.append(int(proc.name))
    return pids


def test_submit_collect_and_status_work_and_say_accounting_is_off(no_accounting, tmp_path):
    sweep = tmp_path / "sw"
    result = hpctrain("submit", write_config(tmp_path, "noacct", points=2), "--executor", "slurm", "--sweep-dir", sweep)
    assert result.returncode == 0, result.stderr
    assert "accounting is off" in result.stdout
    wait_until(lambda: (sweep / "summary.csv").exists() and (sweep / "leaderboard.md").exists(), 240,
               "the collector's outputs", poll=2)
    text, rows = status(sweep)
    assert [rows[i]["status"] for i in (0, 1)] == ["done", "done"]
    assert {rows[i]["slurm_state"] for i in (0, 1)} == {"COMPLETED"}  # squeue still holds ended jobs
    assert "not seen: accounting is off" in text and "2 run(s): 2 done" in text


def long_run_started(tmp_path, name: str):
    """(sweep, config, element id) of a one-point sweep of 60 epochs, once its first epoch ended."""
    sweep = tmp_path / "sw"
    config = write_config(tmp_path, name, epochs=60, rows=20000)
    assert hpctrain("submit", config, "--executor", "slurm", "--sweep-dir", sweep, "--no-collect").returncode == 0
    wait_until(lambda: on_disk(sweep).get("epoch", 0) >= 1, 180, "the first epoch", poll=0.5)
    return sweep, config, on_disk(sweep)["slurm_job_id"]


def test_cancelled_element_ends_preempted_and_the_next_submit_resumes_it(no_accounting, tmp_path):
    sweep, config, job = long_run_started(tmp_path, "cancel")
    # SIGTERM then, KillWait later, SIGKILL: what PreemptMode=CANCEL does; nobody requeues it.
    subprocess.run(["scancel", job], check=True, timeout=30)
    state = wait_until(lambda: (s := on_disk(sweep))["status"] == "preempted" and s, 60, "the run to stop")
    assert "SIGTERM" in state["message"] and "hpctrain submit" in state["message"]
    wait_until(lambda: slurm_state(job) == "CANCELLED", 60, "Slurm to end the element")
    text, rows = status(sweep)
    assert rows[0]["status"] == "preempted" and rows[0]["slurm_state"] == "CANCELLED"
    assert "not requeued by Slurm" in rows[0]["message"]
    again = hpctrain("submit", config, "--executor", "slurm", "--sweep-dir", sweep, "--no-collect")
    assert again.returncode == 0 and "1 of 1 grid point(s) to run" in again.stdout, again.stdout
    resumed = wait_until(lambda: (s := on_disk(sweep))["status"] == "running" and s["requeues"] == 1 and s, 180,
                         "the run to resume")
    assert resumed["slurm_job_id"] != job
    subprocess.run(["scancel", resumed["slurm_job_id"]], timeout=30)


def test_element_killed_whole_shows_failed_with_slurms_reason_in_one_status(no_accounting, tmp_path):
    sweep, config, job = long_run_started(tmp_path, "kill")
    # SIGKILL to every process of the element at once (batch shell, srun, the rank), as when its
    # node dies: nothing of the element can record the end.
    victims = element_pids(job)
    assert len(victims) >= 3, victims
    for pid in victims:
        os.kill(pid, 9)
    ended = wait_until(lambda: (s := slurm_state(job)) not in ("", "RUNNING", "COMPLETING") and s, 60,
                       "Slurm to end the element")
    assert on_disk(sweep)["status"] == "running"  # state.json was left behind
    text, rows = status(sweep)
    assert rows[0]["status"] == "failed", rows[0]
    assert rows[0]["message"].startswith(f"slurm {ended}") and "while state.json said running" in rows[0]["message"]
    assert re.search(rf"\b0\s.*\bfailed\b.*\b{ended}\b", text), text
