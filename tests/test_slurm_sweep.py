"""Real sweeps on the local Slurm cluster (scripts/local-slurm.sh through the slurm_cluster fixture).

Each element has 2 tasks (srun --mpi=pmix, 2 ranks); Horovod when it is built, else torch.distributed.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from slurm_helpers import wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def _backend() -> str:
    if os.environ.get("HPCTRAIN_TEST_BACKEND"):  # torch or horovod, to test one explicitly
        return os.environ["HPCTRAIN_TEST_BACKEND"]
    probe = subprocess.run([sys.executable, "-c", "import horovod.torch"], capture_output=True, timeout=120)
    return "horovod" if probe.returncode == 0 else "torch"


BACKEND = _backend()


def write_config(folder: Path, name: str, *, epochs=2, rows=2000, grid=None, backend="torch") -> Path:
    cfg = {"name": name, "seed": 0,
           "data": {"path": str(folder / "data"), "task": "binary", "batch_size": 64,
                    "synth": {"rows": rows, "features": 8, "shards": 2, "seed": 0}},
           "model": {"hidden": [16]}, "optim": {"name": "adam", "lr": 0.01},
           "train": {"epochs": epochs, "threads": 1}, "dist": {"backend": backend},
           "slurm": {"nodes": 1, "tasks_per_node": 2, "cpus_per_task": 1, "time_min": 10,
                     "array_parallelism": 4, "max_requeues": 2},
           "grid": grid if grid is not None else {"optim.lr": [0.01, 0.001], "model.hidden": [[16], [8, 8]]}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def hpctrain(*args, timeout=120) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "hpctrain", *map(str, args)], capture_output=True,
                            text=True, timeout=timeout, cwd=REPO)
    return result


def states(sweep: Path) -> dict[int, dict]:
    out = {}
    for line in (sweep / "grid.jsonl").read_text().splitlines():
        rec = json.loads(line)
        path = sweep / "runs" / rec["run_id"] / "state.json"
        try:
            out[rec["index"]] = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            out[rec["index"]] = {"status": "?"}
    return out


def all_final(sweep: Path) -> bool:
    return all(s["status"] in ("done", "failed", "diverged") for s in states(sweep).values())


def queued_names() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%j"], capture_output=True, text=True, timeout=30)
    return out.stdout.split()


def release_requeued(job: str) -> None:
    """A requeued job waits 2 minutes (Slurm's BeginTime); start it now so the test stays short."""
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def finished_sweep(slurm_cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    config = write_config(folder, "four", backend=BACKEND)  # Horovod once it is built
    sweep = folder / "sw"
    result = hpctrain("submit", config, "--executor", "slurm", "--sweep-dir", sweep)
    assert result.returncode == 0, result.stderr
    assert "submitted job array" in result.stdout and str(sweep) in result.stdout
    wait_until(lambda: all_final(sweep), 300, "the 4 runs to finish", poll=2)
    wait_until(lambda: "four" not in queued_names(), 60, "the array to leave the queue")
    return config, sweep, result.stdout


def test_every_run_of_the_array_ends_done_with_metrics_and_checkpoints(finished_sweep):
    _config, sweep, out = finished_sweep
    array_id = out.split("submitted job array ")[1].split()[0]
    final = states(sweep)
    assert len(final) == 4
    for index, state in final.items():
        assert state["status"] == "done", state
        assert state["world_size"] == 2 and state["backend"] == BACKEND
        assert state["slurm_job_id"].startswith(f"{array_id}_")
        run = sweep / "runs" / state["run_id"]
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        assert [int(r["epoch"]) for r in rows] == [1, 2]
        assert (run / "checkpoints" / "last.pt").stat().st_size > 0
        assert (run / "checkpoints" / "best.pt").stat().st_size > 0
    element_ids = {s["slurm_job_id"] for s in final.values()}
    assert len(element_ids) == 4  # one element per grid point, all of one array


def test_dependent_collector_job_collects_the_sweep(finished_sweep):
    _config, sweep, out = finished_sweep
    assert "collector job" in out
    outputs = [sweep / "summary.csv", sweep / "leaderboard.md", sweep / "best" / "best.pt", sweep / "plots" / "loss.png"]
    # The job writes them one after the other (each atomically): wait for the last of them.
    wait_until(lambda: all(p.exists() for p in outputs), 180, "the collector job's outputs", poll=2)
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 4 and {r["state"] for r in rows} == {"done"}


def test_status_shows_every_run_and_counts(finished_sweep):
    _config, sweep, _ = finished_sweep
    result = hpctrain("status", sweep)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["idx", "run_id", "hidden", "lr"]
    assert sum(" done " in line for line in lines[1:5]) == 4
    assert "4 run(s): 4 done" in result.stdout
    assert "2/2" in lines[1]
    assert "COMPLETED" in result.stdout  # Slurm's own view, from sacct


def test_resubmitting_submits_nothing_then_exactly_a_deleted_run(finished_sweep):
    config, sweep, _ = finished_sweep
    result = hpctrain("submit", config, "--executor", "slurm", "--sweep-dir", sweep, "--no-collect")
    assert result.returncode == 0, result.stderr
    assert "nothing to submit" in result.stdout and "submitted" not in result.stdout
    assert "four" not in queued_names()

    target = states(sweep)[2]
    (sweep / "runs" / target["run_id"] / "state.json").unlink()
    before = {i: s["updated_at"] for i, s in states(sweep).items() if i != 2}
    result = hpctrain("submit", config, "--executor", "slurm", "--sweep-dir", sweep, "--no-collect")
    assert result.returncode == 0, result.stderr
    assert "1 of 4 grid point(s) to run" in result.stdout
    assert "(1 element(s)" in result.stdout
    wait_until(lambda: states(sweep)[2]["status"] == "done", 180, "the deleted run to finish again")
    after = states(sweep)
    assert {i: s["updated_at"] for i, s in after.items() if i != 2} == before  # finished runs untouched


def test_dry_run_prints_script_and_grid_and_submits_nothing(slurm_cluster, tmp_path):
    config = write_config(tmp_path, "dry")
    sweep = tmp_path / "sw"
    result = hpctrain("submit", config, "--executor", "slurm", "--sweep-dir", sweep, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --array=0-3%4" in result.stdout
    assert "#SBATCH --ntasks-per-node=2" in result.stdout and "--mpi=pmix" in result.stdout
    assert result.stdout.count("# run ") == 4
    assert not sweep.exists()
    assert "dry" not in queued_names()


def test_preempted_element_resumes_from_its_checkpoint_with_identical_metrics(slurm_cluster, tmp_path):
    config = write_config(tmp_path, "pre", epochs=5, rows=16000, grid={"optim.lr": [0.01]})
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    for sweep in (interrupted, reference):
        result = hpctrain("submit", config, "--executor", "slurm", "--sweep-dir", sweep, "--no-collect")
        assert result.returncode == 0, result.stderr
    wait_until(lambda: states(interrupted)[0].get("epoch", 0) >= 1 and states(interrupted)[0]["status"] == "running",
               180, "the first epoch", poll=0.3)
    job = states(interrupted)[0]["slurm_job_id"]
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)  # the default preempt_signal
    preempted = wait_until(lambda: (s := states(interrupted)[0])["status"] == "preempted" and s, 60, "preempted")
    assert preempted["epoch"] < 5
    run = interrupted / "runs" / preempted["run_id"]
    assert (run / "checkpoints" / "last.pt").exists()

    def resumed():
        release_requeued(job)
        return states(interrupted)[0]["status"] in ("running", "done")
    wait_until(resumed, 120, "the requeued element to start again", poll=2)
    wait_until(lambda: all_final(interrupted) and all_final(reference), 240, "both runs to finish", poll=2)
    final = states(interrupted)[0]
    assert final["status"] == "done" and final["requeues"] == 1
    ref_run = reference / "runs" / final["run_id"]
    assert (run / "metrics.csv").read_text() == (ref_run / "metrics.csv").read_text()
    logs = "".join(p.read_text() for p in (interrupted / "slurm").glob("*_0_log.out"))
    assert "resumed from last.pt" in logs and "requeued job" in logs


def test_generic_sbatch_script_runs_a_grid(slurm_cluster, tmp_path):
    config = write_config(tmp_path, "generic", grid={"optim.lr": [0.01, 0.001]})
    env = dict(os.environ, HPCTRAIN_PYTHON=sys.executable)
    result = subprocess.run(["sbatch", "--array=0-1%2", str(REPO / "jobs" / "generic.sbatch"), str(config)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "sweeps" / "generic"
    wait_until(lambda: (sweep / "grid.jsonl").exists() and all_final(sweep), 240, "the generic array", poll=2)
    assert [s["status"] for s in states(sweep).values()] == ["done", "done"]
    assert all(s["world_size"] == 2 for s in states(sweep).values())


# --------------------------------------------------------------------------- the `hpctrain sbatch` path


def sbatch_sweep(config: Path, sweep: Path) -> str:
    """`hpctrain sbatch` then `sbatch`, as a user does; returns the array id."""
    script = sweep.parent / f"{sweep.name}.sbatch"
    result = hpctrain("sbatch", config, "-o", script, "--sweep-dir", sweep)
    assert result.returncode == 0, result.stderr
    submitted = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def rank_pids(element: str, rank: int) -> list[int]:
    """Pids of the `hpctrain run` task of ``rank`` in array element ``element`` (``ARRAY_TASK``)."""
    array, task = element.split("_")
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if (b"hpctrain" in cmdline and b"run" in cmdline and environ.get(b"SLURM_ARRAY_JOB_ID") == array.encode()
                and environ.get(b"SLURM_ARRAY_TASK_ID") == task.encode()
                and environ.get(b"SLURM_PROCID") == str(rank).encode()):
            pids.append(int(proc.name))
    return pids


def sacct_element(element: str) -> tuple[str, str]:
    """(State, ExitCode) of an array element as sacct reports it."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State,ExitCode", "-j", element],
                         capture_output=True, text=True, timeout=30).stdout
    for line in out.splitlines():
        jid, state, code = line.split("|")
        if jid == element:
            return state.split()[0], code
    return "", ""


def test_rank_killed_with_9_fails_the_element_names_the_rank_and_is_not_requeued(slurm_cluster, tmp_path):
    config = write_config(tmp_path, "kill9", epochs=40, rows=16000, grid={"optim.lr": [0.01]}, backend=BACKEND)
    sweep = tmp_path / "sw"
    array = sbatch_sweep(config, sweep)
    element = f"{array}_0"
    wait_until(lambda: states(sweep)[0].get("epoch", 0) >= 1, 180, "the first epoch", poll=0.5)
    victims = wait_until(lambda: rank_pids(element, 1), 30, "rank 1's process")
    for pid in victims:
        os.kill(pid, 9)
    final = wait_until(lambda: (s := states(sweep)[0])["status"] == "failed" and s, 180, "the run to fail")
    assert final["requeues"] == 0
    assert "rank 1" in final["message"], final["message"]
    wait_until(lambda: sacct_element(element)[0] not in ("", "RUNNING", "COMPLETING", "PENDING", "REQUEUED"),
               120, "the element to end")
    time.sleep(5)  # a requeue would show within moments: Slurm would set it PENDING again
    state, code = sacct_element(element)
    assert state == "FAILED", (state, code)
    assert "kill9" not in queued_names()
    assert states(sweep)[0]["requeues"] == 0 and states(sweep)[0]["status"] == "failed"
    shown = json.loads(hpctrain("status", sweep, "--json").stdout.splitlines()[0])
    assert shown["status"] == "failed" and shown["slurm_reason"] == "FAILED (rank lost)", shown  # exit status 69


def test_sbatch_element_preempted_by_signal_or_scontrol_requeue_resumes_with_identical_metrics(slurm_cluster,
                                                                                              tmp_path):
    config = write_config(tmp_path, "req", epochs=5, rows=16000, grid={"optim.lr": [0.01, 0.003]}, backend=BACKEND)
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    array = sbatch_sweep(config, interrupted)
    sbatch_sweep(config, reference)
    elements = [f"{array}_0", f"{array}_1"]
    for index in (0, 1):
        wait_until(lambda: (s := states(interrupted)[index]).get("epoch", 0) >= 1 and s["status"] == "running",
                   240, f"the first epoch of element {index}", poll=0.3)
    # element 0: the preemption signal (hpctrain requeues it); element 1: Slurm requeues it (SIGTERM)
    subprocess.run(["scancel", "--signal=USR2", elements[0]], check=True, timeout=30)
    subprocess.run(["scontrol", "requeue", elements[1]], check=True, timeout=30)
    for index in (0, 1):
        stopped = wait_until(lambda: (s := states(interrupted)[index])["status"] == "preempted" and s, 120,
                             f"element {index} to stop with a checkpoint")
        assert stopped["epoch"] < 5

    def resumed():
        for element in elements:
            release_requeued(element)
        return all(s["status"] in ("running", "done") and s["requeues"] == 1 for s in states(interrupted).values())
    wait_until(resumed, 180, "both elements to start again", poll=2)
    wait_until(lambda: all_final(interrupted) and all_final(reference), 300, "every run to finish", poll=2)
    for index in (0, 1):
        final = states(interrupted)[index]
        assert final["status"] == "done" and final["requeues"] == 1, final
        run, ref = interrupted / "runs" / final["run_id"], reference / "runs" / final["run_id"]
        assert (run / "metrics.csv").read_text() == (ref / "metrics.csv").read_text()
    logs = {i: (interrupted / "logs" / f"{array}_{i}.out").read_text() for i in (0, 1)}
    assert "requeued job " + elements[0] in logs[0] and "resumed from last.pt" in logs[0]
    assert "SIGTERM" in logs[1] and "resumed from last.pt" in logs[1]


def test_two_submits_at_the_same_moment_submit_one_array(slurm_cluster, tmp_path):
    config = write_config(tmp_path, "twice", backend=BACKEND)
    sweep = tmp_path / "sw"
    cmd = [sys.executable, "-m", "hpctrain", "submit", str(config), "--executor", "slurm", "--sweep-dir", str(sweep),
           "--no-collect"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    stdout = [o[0] for o in outs]
    assert sum("submitted job array" in o for o in stdout) == 1, stdout
    assert sum("nothing to submit" in o for o in stdout) == 1, stdout
    wait_until(lambda: all_final(sweep), 300, "the 4 runs to finish", poll=2)
    arrays = {s["slurm_job_id"].split("_")[0] for s in states(sweep).values()}
    assert len(arrays) == 1 and all(s["status"] == "done" and s["requeues"] == 0 for s in states(sweep).values())
    entries = [json.loads(line) for line in (sweep / "submissions.jsonl").read_text().splitlines()]
    assert [e.get("array_id") for e in entries if e.get("array_id")] == list(arrays)
    assert not (sweep / ".submit.lock").exists()
