"""A sweep past MaxArraySize on the local cluster (MaxArraySize=1001 for this module), and
slurm.sbatch_extra reaching real jobs on both submit paths.

The 2,500-point sweep is submitted with the partition down, so nothing trains: the test reads
what Slurm holds (three arrays, one collector depending on all of them) and cancels it.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from slurm_helpers import restart_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_arrays(slurm_cluster):
    restart_cluster(max_array=1001)
    yield slurm_cluster
    restart_cluster()


def hpctrain(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpctrain", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def scontrol(*args) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60).stdout


def write_config(folder: Path, name: str, points: int, **slurm) -> Path:
    raw = {"name": name, "seed": 0,
           "data": {"path": str(folder / "data"), "task": "binary", "batch_size": 50,
                    "synth": {"rows": 200, "features": 4, "shards": 1, "seed": 0}},
           "model": {"hidden": [4]}, "train": {"epochs": 1, "threads": 1}, "dist": {"backend": "none"},
           "slurm": {"nodes": 1, "tasks_per_node": 1, "cpus_per_task": 1, "time_min": 5, "array_parallelism": 2,
                     **slurm},
           "grid": {"seed": list(range(points))}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class PartitionDown:
    """Jobs submitted meanwhile stay pending: Slurm holds them, nothing trains."""

    def __enter__(self):
        scontrol("update", "partitionname=debug", "state=down")

    def __exit__(self, *exc):
        scontrol("update", "partitionname=debug", "state=up")


def cancel(*ids: str) -> None:
    subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


def test_2500_points_go_as_three_arrays_each_run_once_with_one_collector_after_all(small_arrays, tmp_path):
    config = write_config(tmp_path, "big", 2500)
    sweep = tmp_path / "sw"
    with PartitionDown():
        started = time.perf_counter()
        result = hpctrain("submit", config, "--executor", "slurm", "--sweep-dir", sweep)
        elapsed = time.perf_counter() - started
        assert result.returncode == 0, result.stderr
        arrays = re.search(r"submitted job arrays (\d+), (\d+), (\d+) \(2500 element", result.stdout).groups()
        collector = re.search(r"collector job (\d+)", result.stdout).group(1)
        try:
            shown = scontrol("show", "job", collector)
            dependency = re.search(r"Dependency=(\S+)", shown).group(1)
            assert sorted(re.findall(r"afterany:(\d+)_\*", dependency)) == sorted(arrays), dependency
            for array, last in zip(arrays, (1000, 1000, 497)):
                assert f"ArrayTaskId=0-{last}" in scontrol("show", "job", array), array
            status = hpctrain("status", sweep, "--json")
            assert status.returncode == 0, status.stderr
            rows = [json.loads(line) for line in status.stdout.splitlines()]
        finally:
            cancel(*arrays, collector)
    assert len(rows) == 2500 and len({r["run_id"] for r in rows}) == 2500
    elements = [r["slurm_job_id"] for r in rows]
    assert len(set(elements)) == 2500
    for r in rows:  # grid point i is element i - offset of the array at that offset
        array = arrays[r["index"] // 1001]
        assert r["slurm_job_id"] == f"{array}_{r['index'] % 1001}"
        assert r["status"] == "pending" and r["slurm_state"] == "PENDING"
    entry = json.loads((sweep / "submissions.jsonl").read_text().splitlines()[-1])
    assert entry["array_ids"] == list(arrays) and entry["collector_id"] == collector
    print(f"submit of 2,500 points as 3 arrays: {elapsed:.1f}s")
    assert elapsed < 60, f"submitting 2,500 points took {elapsed:.1f}s"


def test_sbatch_scripts_of_a_split_grid_train_the_points_of_their_offset(small_arrays, tmp_path):
    config = write_config(tmp_path, "split", 1003)
    sweep = tmp_path / "sw"
    result = hpctrain("sbatch", config, "-o", tmp_path / "split.sbatch", "--sweep-dir", sweep)
    assert result.returncode == 0, result.stderr
    second = tmp_path / "split-2.sbatch"
    assert f"sbatch {tmp_path / 'split-1.sbatch'}; sbatch {second}" in result.stdout
    submitted = subprocess.run(["sbatch", "--parsable", str(second)], capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    array = submitted.stdout.strip().split(";")[0]
    deadline = time.time() + 240
    while time.time() < deadline and array in subprocess.run(["squeue", "-h", "-o", "%F"], capture_output=True,
                                                             text=True, timeout=30).stdout.split():
        time.sleep(2)
    runs = {json.loads(line)["index"]: json.loads(line) for line in
            hpctrain("status", sweep, "--json").stdout.splitlines()}
    assert runs[1001]["status"] == "done" and runs[1001]["slurm_job_id"] == f"{array}_0", runs[1001]
    assert runs[1002]["status"] == "done" and runs[1002]["slurm_job_id"] == f"{array}_1", runs[1002]
    assert {r["status"] for i, r in runs.items() if i < 1001} == {"pending"}
    assert not any((sweep / "runs" / runs[i]["run_id"]).exists() for i in (0, 1000))


EXTRA = {"comment": "hpctrain-extra", "mail-type": "NONE", "exclusive": True}


def test_sbatch_extra_reaches_the_job_on_both_paths(small_arrays, tmp_path):
    config = write_config(tmp_path, "extra", 1, sbatch_extra=EXTRA)
    script = tmp_path / "extra.sbatch"
    assert hpctrain("sbatch", config, "-o", script, "--sweep-dir", tmp_path / "sb").returncode == 0
    with PartitionDown():
        result = hpctrain("submit", config, "--executor", "slurm", "--sweep-dir", tmp_path / "sw", "--no-collect")
        assert result.returncode == 0, result.stderr
        submitit_job = re.search(r"submitted job array (\d+)", result.stdout).group(1)
        sbatch_job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                                    timeout=60).stdout.strip()
        try:
            for job in (submitit_job, sbatch_job):
                shown = scontrol("show", "job", job)
                assert "Comment=hpctrain-extra" in shown and "OverSubscribe=NO" in shown, shown
        finally:
            cancel(submitit_job, sbatch_job)
    assert "#SBATCH --exclusive" in script.read_text().splitlines()


def test_a_bad_sbatch_extra_value_is_refused_before_anything_is_written(small_arrays, tmp_path):
    config = write_config(tmp_path, "bad", 1, sbatch_extra={"mail-user": "me@x.org; rm -rf ~"})
    result = hpctrain("submit", config, "--executor", "slurm", "--sweep-dir", tmp_path / "sw")
    assert result.returncode == 2 and "'mail-user'" in result.stderr and "rm -rf" in result.stderr
    assert not (tmp_path / "sw").exists()
