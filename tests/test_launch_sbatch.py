"""sbatch script rendering: resources, array spec, signal/requeue, and no shell injection."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpctrain.config import build_config
from hpctrain.errors import ConfigError
from hpctrain.launch.sbatch import array_spec, render_array_script, render_collector_script
from hpctrain.launch.spec import check_setup_line, sbatch_line, sbatch_options

REPO = Path(__file__).resolve().parents[1]


def _cfg(**slurm):
    base = {"name": "demo", "slurm": {"nodes": 1, "tasks_per_node": 2, "cpus_per_task": 3, "time_min": 45,
                                      "array_parallelism": 4, "gpus_per_node": 2, "mem_gb": 16,
                                      "partition": "gpu", "account": "abc123", "max_requeues": 5,
                                      "setup": ["module load openmpi/4.1", "source ~/venv/bin/activate"]}}
    base["slurm"].update(slurm)
    return build_config(base)


def test_array_spec_full_and_subsets():
    assert array_spec(range(6), 4) == "0-5%4"
    assert array_spec([1, 2, 3, 7, 9, 10], 16) == "1-3,7,9-10%6"
    assert array_spec([5], 8) == "5%1"


def test_script_has_array_resources_signal_setup_and_srun(tmp_path):
    text = render_array_script(_cfg(), sweep_dir=tmp_path / "sw", config_path=tmp_path / "sw/sweep.yaml",
                               indices=range(6), python="/opt/py/bin/python")
    lines = text.splitlines()
    for expected in ["#SBATCH --array=0-5%4", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=2",
                     "#SBATCH --cpus-per-task=3", "#SBATCH --gpus-per-node=2", "#SBATCH --mem=16G",
                     "#SBATCH --time=45", "#SBATCH --partition=gpu", "#SBATCH --account=abc123",
                     "#SBATCH --signal=USR2@90", "#SBATCH --requeue", "module load openmpi/4.1",
                     "source ~/venv/bin/activate", "PYTHON=/opt/py/bin/python"]:
        assert expected in lines, expected
    srun = next(line for line in lines if line.startswith("srun "))
    assert srun.startswith("srun --mpi=pmix ") and srun == lines[-2]
    assert '-m hpctrain run "$CONFIG" --index "$((${HPCTRAIN_INDEX_OFFSET:-0} + ${SLURM_ARRAY_TASK_ID:-0}))" --sweep-dir "$SWEEP_DIR"' in srun
    # after the step: a run whose ranks were killed is recorded; the status is srun's, passed on
    assert lines[-1].startswith('"$PYTHON" -m hpctrain.launch.step_end $? "$CONFIG" --index')
    # hpctrain run requeues its own element after a preemption signal; the script decides nothing
    assert "scontrol" not in text and "requeue" not in text.split("#SBATCH --requeue")[1]
    assert all(not line.startswith("#SBATCH") for line in lines[lines.index("# setup"):])
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_single_task_elements_do_not_ask_for_pmix(tmp_path):
    text = render_array_script(_cfg(tasks_per_node=1), sweep_dir=tmp_path, config_path=tmp_path / "c.yaml",
                               indices=[0])
    assert "--mpi=pmix" not in text


@pytest.mark.parametrize("key,value", [
    ("partition", "gpu; rm -rf ~"), ("account", "a$(touch /tmp/x)"), ("qos", "normal\n#SBATCH --uid=0"),
    ("constraint", "a100`id`"),
])
def test_injection_through_names_is_rejected_by_the_config(key, value):
    with pytest.raises(ConfigError, match=f"slurm.{key}"):
        _cfg(**{key: value})


@pytest.mark.parametrize("line", ["module load x\nrm -rf ~", "echo hi\r", "a\x00b"])
def test_setup_lines_must_be_single_lines(line):
    with pytest.raises(ConfigError, match="newline or control character"):
        check_setup_line(line)
    cfg = _cfg()
    cfg.slurm.setup = [line]  # a config object built elsewhere is checked again on rendering
    with pytest.raises(ConfigError, match=r"slurm.setup\[0\]"):
        render_array_script(cfg, sweep_dir="/tmp/sw", config_path="/tmp/c.yaml", indices=[0])


def test_name_and_paths_are_checked(tmp_path):
    cfg = _cfg()
    cfg.name = "x;reboot"
    with pytest.raises(ConfigError, match="name"):
        render_array_script(cfg, sweep_dir=tmp_path, config_path=tmp_path / "c.yaml", indices=[0])
    with pytest.raises(ConfigError, match="the sweep folder"):
        render_array_script(_cfg(), sweep_dir=tmp_path / "a b;$(id)", config_path=tmp_path / "c.yaml", indices=[0])


def test_srun_args_are_quoted(tmp_path):
    text = render_array_script(_cfg(srun_args=["--cpu-bind=cores", "--export=ALL,X=$(id)"]), sweep_dir=tmp_path,
                               config_path=tmp_path / "c.yaml", indices=[0])
    assert "'--export=ALL,X=$(id)'" in text


def test_collector_script_runs_collect(tmp_path):
    text = render_collector_script(_cfg(), sweep_dir=tmp_path / "sw", python="/p/python")
    assert f"/p/python -m hpctrain collect {tmp_path / 'sw'}" in text
    assert "#SBATCH --partition=gpu" in text and "module load openmpi/4.1" in text


def test_cli_sbatch_writes_the_script_and_sweep(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "demo", "slurm": {"tasks_per_node": 2, "array_parallelism": 2},
                                      "grid": {"optim.lr": [0.1, 0.01, 0.001]}}))
    out = tmp_path / "jobs" / "demo.sbatch"
    result = subprocess.run([sys.executable, "-c", "import sys; from hpctrain.launch import cli_sbatch as m; "
                             "import argparse; p = argparse.ArgumentParser(); m.configure(p); "
                             "sys.exit(m.main(p.parse_args(sys.argv[1:])))",
                             str(config), "-o", str(out), "--sweep-dir", str(tmp_path / "sw")],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "#SBATCH --array=0-2%2" in text
    assert f"CONFIG={tmp_path / 'sw' / 'sweep.yaml'}" in text
    assert (tmp_path / "sw" / "grid.jsonl").read_text().count("\n") == 3


def test_preempt_signal_is_configurable(tmp_path):
    text = render_array_script(_cfg(preempt_signal="USR1", signal_delay_s=300), sweep_dir=tmp_path,
                               config_path=tmp_path / "c.yaml", indices=[0])
    assert "#SBATCH --signal=USR1@300" in text.splitlines()
    with pytest.raises(ConfigError, match="slurm.preempt_signal"):
        _cfg(preempt_signal="KILL")


def test_submitit_script_and_rendered_script_carry_the_same_spec(tmp_path):
    from hpctrain.launch.slurm import array_script
    from hpctrain.sweep import SweepDir

    cfg = _cfg()
    wanted = {sbatch_line(k, v) for k, v in sbatch_options(cfg.slurm, cfg.name)}
    submitit_lines = set(array_script(cfg, SweepDir(tmp_path / "sw"), 6).splitlines())
    rendered_lines = set(render_array_script(cfg, sweep_dir=tmp_path / "sw", config_path=tmp_path / "c.yaml",
                                             indices=range(6)).splitlines())
    assert wanted <= submitit_lines, sorted(wanted - submitit_lines)
    assert wanted <= rendered_lines, sorted(wanted - rendered_lines)
    for text in (submitit_lines, rendered_lines):  # one value per option, no submitit default left over
        assert sum(line.startswith("#SBATCH --signal") for line in text) == 1
        assert sum(line.startswith("#SBATCH --time") for line in text) == 1


def test_jobs_scripts_are_generated_from_the_template():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "make-jobs.py"), "--check"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_jobs_scripts_are_valid_bash():
    for script in sorted((REPO / "jobs").glob("*.sbatch")):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
        text = script.read_text()
        assert "--index \"$((${HPCTRAIN_INDEX_OFFSET:-0} + ${SLURM_ARRAY_TASK_ID:-0}))\"" in text and "srun --mpi=pmix" in text
        assert "#SBATCH --signal=USR2@" in text and "#SBATCH --requeue" in text
