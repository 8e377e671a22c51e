"""Cluster limits, the split of a large sweep into arrays, and slurm.sbatch_extra (no cluster needed)."""
from __future__ import annotations

import subprocess

import pytest
import yaml

from hpctrain import cli
from hpctrain.config import build_config
from hpctrain.errors import ConfigError, HpctrainError
from hpctrain.launch import limits, slurm
from hpctrain.launch.sbatch import render_array_script
from hpctrain.launch.spec import sbatch_options, submitit_parameters


def test_split_keeps_every_task_id_below_the_limit_and_every_point_once():
    chunks = limits.split(range(2500), 1001)
    assert [c.offset for c in chunks] == [0, 1001, 2002]
    assert [len(c.tasks) for c in chunks] == [1001, 1001, 498]
    assert all(max(c.tasks) < 1001 for c in chunks)
    assert sum((c.indices for c in chunks), []) == list(range(2500))


def test_split_of_a_subset_starts_each_array_at_its_first_point():
    chunks = limits.split([5, 9, 1004, 1005, 3000], 1000)
    assert [(c.offset, c.tasks) for c in chunks] == [(5, (0, 4, 999)), (1005, (0,)), (3000, (0,))]
    assert limits.split([3, 1], None) == [limits.Chunk(0, (1, 3))]


@pytest.mark.parametrize("found, words", [
    (limits.Limits(max_job_count=100), ["MaxJobCount is 100", "120 array element(s)", "150 grid point(s)"]),
    (limits.Limits(max_submit_jobs=50), ["MaxSubmitJobs is 50", "sacctmgr"]),
    (limits.Limits(max_array_size=0), ["MaxArraySize is 0"]),
])
def test_limits_that_no_split_meets_are_refused_by_name(found, words):
    with pytest.raises(HpctrainError) as err:
        limits.check_limits(120, 150, found)
    for word in words:
        assert word in str(err.value)
    limits.check_limits(120, 150, limits.Limits(max_array_size=10, max_job_count=120))


def _slurm(**extra):
    return build_config({"name": "ex", "data": {"path": "d"}, "slurm": {"sbatch_extra": extra}}).slurm


def test_sbatch_extra_becomes_options_flags_and_submitit_parameters():
    s = _slurm(**{"mail-type": "END", "mail-user": "me@example.org", "gres": "gpu:a100:2", "exclusive": True,
                  "mem-per-gpu": 8000, "comment": "x", "reservation": False})
    opts = sbatch_options(s, "ex")
    assert ("mail-user", "me@example.org") in opts and ("gres", "gpu:a100:2") in opts
    assert ("exclusive", None) in opts and ("mem-per-gpu", "8000") in opts
    assert not any(key == "reservation" for key, _ in opts)
    params = submitit_parameters(opts)
    assert params["exclusive"] is True and params["mail_type"] == "END"


@pytest.mark.parametrize("extra, words", [
    ({"mail-user": "a b"}, ["'mail-user'", "'a b'"]),
    ({"comment": "x\n#SBATCH --uid=0"}, ["'comment'", "newlines"]),
    ({"gres": "gpu;reboot"}, ["'gres'", "gpu;reboot"]),
    ({"--qos": "x"}, ["'--qos'", "not an sbatch option name"]),
    ({"Mail_Type": "END"}, ["'Mail_Type'"]),
    ({"time": 5}, ["'time'", "slurm.time_min"]),
    ({"array": "0-3"}, ["'array'", "sets --array itself"]),
    ({"comment": ["a"]}, ["'comment'", "['a']"]),
])
def test_sbatch_extra_refuses_unsafe_keys_and_values_naming_them(extra, words):
    with pytest.raises(ConfigError) as err:
        sbatch_options(_slurm(**extra), "ex")
    for word in words:
        assert word in str(err.value)


def test_sbatch_extra_may_not_repeat_a_dedicated_key():
    cfg = build_config({"name": "ex", "data": {"path": "d"}, "slurm": {"qos": "long", "sbatch_extra": {"qos": "x"}}})
    with pytest.raises(ConfigError, match="also given as slurm.qos"):
        sbatch_options(cfg.slurm, "ex")


def _config(tmp_path, points: int, extra=None):
    raw = {"name": "big", "data": {"path": str(tmp_path / "d"), "synth": {"rows": 100}},
           "slurm": {"sbatch_extra": extra or {}, "array_parallelism": 4}, "grid": {"seed": list(range(points))}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_both_paths_carry_sbatch_extra(tmp_path):
    cfg = build_config(yaml.safe_load(_config(tmp_path, 2, {"comment": "hpctrain-x", "exclusive": True}).read_text()))
    rendered = render_array_script(cfg, sweep_dir=tmp_path / "sw", config_path=tmp_path / "c.yaml", indices=[0, 1])
    submitit = slurm.array_script(cfg, slurm.SweepDir(tmp_path / "sw"), 2)
    for text in (rendered, submitit):
        lines = text.splitlines()
        assert "#SBATCH --comment=hpctrain-x" in lines and "#SBATCH --exclusive" in lines, text


def test_the_collector_takes_account_and_qos_from_sbatch_extra_too(tmp_path):
    from hpctrain.launch.sbatch import render_collector_script

    cfg = build_config({"name": "ex", "data": {"path": "d"},
                        "slurm": {"partition": "gpu", "sbatch_extra": {"account": "proj1", "qos": "long",
                                                                       "gres": "gpu:2"}}})
    lines = render_collector_script(cfg, sweep_dir=tmp_path / "sw").splitlines()
    assert {"#SBATCH --partition=gpu", "#SBATCH --account=proj1", "#SBATCH --qos=long"} <= set(lines)
    assert not any("gres" in line for line in lines)


@pytest.fixture
def limit_1001(monkeypatch):
    monkeypatch.setattr(slurm, "slurm_available", lambda timeout=10: True)
    monkeypatch.setattr(limits, "cluster_config", lambda: {"MaxArraySize": "1001", "MaxJobCount": "10000"})


def test_sbatch_writes_one_script_per_array_with_its_offset(tmp_path, limit_1001, capsys):
    out = tmp_path / "big.sbatch"
    assert cli.main(["sbatch", str(_config(tmp_path, 2500)), "-o", str(out), "--sweep-dir", str(tmp_path / "sw")]) == 0
    printed = capsys.readouterr().out
    scripts = [tmp_path / f"big-{k}.sbatch" for k in (1, 2, 3)]
    assert not out.exists() and all(p.exists() for p in scripts)
    for path, (array, offset) in zip(scripts, [("0-1000%4", 0), ("0-1000%4", 1001), ("0-497%4", 2002)]):
        text = path.read_text()
        assert f"#SBATCH --array={array}" in text.splitlines() and f"HPCTRAIN_INDEX_OFFSET={offset}" in text
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
        assert f"sbatch {path}" in printed
    assert "MaxArraySize is 1001" in printed


def test_sbatch_to_stdout_refuses_a_grid_that_needs_several_arrays(tmp_path, limit_1001, capsys):
    assert cli.main(["sbatch", str(_config(tmp_path, 1002)), "--sweep-dir", str(tmp_path / "sw")]) == 2
    err = capsys.readouterr().err
    assert "1002 grid point(s)" in err and "2 job arrays" in err and "-o FILE" in err
    assert not (tmp_path / "sw").exists()


def test_the_offset_expression_gives_the_grid_index():
    line = 'echo "$((${HPCTRAIN_INDEX_OFFSET:-0} + ${SLURM_ARRAY_TASK_ID:-0}))"'
    env = {"PATH": "/usr/bin:/bin", "HPCTRAIN_INDEX_OFFSET": "1001", "SLURM_ARRAY_TASK_ID": "7"}
    assert subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True).stdout.strip() == "1008"


def test_dry_run_of_a_split_sweep_shows_the_first_array(tmp_path, limit_1001, capsys, monkeypatch):
    monkeypatch.setattr(slurm, "queued_job_ids", lambda timeout=30: set())
    assert cli.main(["submit", str(_config(tmp_path, 2500)), "--executor", "slurm", "--dry-run",
                     "--sweep-dir", str(tmp_path / "sw")]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-1000%4" in out.splitlines() and not (tmp_path / "sw").exists()
