"""Every check passes before anything is written: config values, data folders, launch spec, cluster limits.

The commands run in this process (``hpctrain.cli.main``) in a scratch folder, so relative
paths resolve there; every failure must leave no sweep folder and no script behind.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from hpctrain import cli
from hpctrain.config import NAME_PATTERN, build_config
from hpctrain.errors import ConfigError
from hpctrain.launch import slurm
from hpctrain.launch.spec import check_path, check_word, validate_slurm

SYNTH = {"rows": 200, "features": 4, "shards": 1}


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A scratch working folder; no Slurm cluster is asked anything unless a test says so."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(slurm, "slurm_available", lambda timeout=10: False)
    return tmp_path


def config(folder: Path, name="v", *, data=None, slurm_section=None, grid=None) -> Path:
    raw = {"name": name, "data": data if data is not None else {"path": "data/v", "synth": SYNTH},
           "train": {"epochs": 1}, "grid": grid if grid is not None else {"optim.lr": [0.1, 0.01]}}
    if slurm_section:
        raw["slurm"] = slurm_section
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def hpctrain(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def nothing_written(folder: Path) -> bool:
    """No sweep folder, no script: only the config (and data made by a test) are there."""
    return not any(p.name not in ("c.yaml", "data", "meta.json") for p in folder.iterdir())


# --------------------------------------------------------------------------- whole-value patterns


@pytest.mark.parametrize("value", ["debug\n", "debug\n#SBATCH --uid=0", "\ndebug"])
def test_launch_spec_words_must_match_whole(value):
    with pytest.raises(ConfigError, match="slurm.partition"):
        check_word(value, "slurm.partition")
    with pytest.raises(ConfigError, match="name"):
        check_word(value, "name", NAME_PATTERN)


def test_launch_spec_paths_must_match_whole(tmp_path):
    with pytest.raises(ConfigError, match="the sweep folder"):
        check_path(f"{tmp_path}/sw\n", "the sweep folder")
    assert check_path(f"{tmp_path}/sw", "the sweep folder") == f"{tmp_path}/sw"


def test_launch_spec_rechecks_a_config_built_elsewhere():
    cfg = build_config({"slurm": {"partition": "debug"}})
    cfg.slurm.partition = "debug\n"
    with pytest.raises(ConfigError, match="slurm.partition"):
        validate_slurm(cfg.slurm)


def test_name_with_a_final_newline_makes_no_folder(here, capsys):
    path = config(here)
    path.write_text(path.read_text().replace("name: v", 'name: "abc\\n"'))
    code, _out, err = hpctrain(capsys, "submit", path, "--executor", "local")
    assert code == 2 and "name:" in err and "not a valid value" in err
    assert nothing_written(here)


# --------------------------------------------------------------------------- the data folder


@pytest.mark.parametrize("command", [["submit", "--dry-run"], ["submit", "--executor", "local"],
                                     ["sbatch", "-o", "job.sbatch"], ["run"]])
def test_missing_data_folder_is_refused_before_anything_is_written(here, capsys, command):
    path = config(here, data={"path": "data/missing"})
    code, _out, err = hpctrain(capsys, command[0], path, *command[1:])
    assert code == 2, err
    assert "data.path: 'data/missing'" in err and str(here / "data" / "missing") in err
    assert "meta.json" in err and "hpctrain data convert" in err and "data.synth" in err
    assert "Traceback" not in err
    assert nothing_written(here)


def test_data_folder_without_meta_json_is_refused(here, capsys):
    (here / "data" / "half").mkdir(parents=True)
    code, _out, err = hpctrain(capsys, "sbatch", config(here, data={"path": "data/half"}))
    assert code == 2 and "data.path: 'data/half'" in err and "meta.json" in err
    assert not (here / "sweeps").exists()


def test_data_path_is_relative_to_the_working_folder(here, capsys, monkeypatch):
    (here / "data" / "real").mkdir(parents=True)
    (here / "data" / "real" / "meta.json").write_text("{}")
    path = config(here, data={"path": "data/real"})
    code, out, err = hpctrain(capsys, "submit", path, "--dry-run", "--executor", "local")
    assert code == 0, err and "# run " in out
    elsewhere = here / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _out, err = hpctrain(capsys, "submit", path, "--dry-run", "--executor", "local")
    assert code == 2 and str(elsewhere / "data" / "real") in err


def test_a_synth_section_makes_the_data_and_passes(here, capsys):
    code, out, err = hpctrain(capsys, "submit", config(here), "--dry-run", "--executor", "local")
    assert code == 0, err
    assert out.count("# run ") == 2


def test_swept_data_paths_are_each_checked_naming_the_grid_point(here, capsys):
    (here / "data" / "a").mkdir(parents=True)
    (here / "data" / "a" / "meta.json").write_text("{}")
    path = config(here, data={"path": "data/a"}, grid={"data.path": ["data/a", "data/b"], "seed": [0, 1]})
    code, _out, err = hpctrain(capsys, "sbatch", path)
    assert code == 2 and "data.path: 'data/b'" in err and "grid point 2" in err
    assert not (here / "sweeps").exists()
    # a point that makes its own data needs no folder
    path = config(here, data={"path": "data/a"},
                  grid={"zip": {"data.path": ["data/a", "data/b"], "data.synth": [None, SYNTH]}})
    code, _out, err = hpctrain(capsys, "submit", path, "--dry-run", "--executor", "local")
    assert code == 0, err


# --------------------------------------------------------------------------- nothing written first


def test_sbatch_with_a_rejected_setup_line_writes_nothing(here, capsys):
    path = config(here, slurm_section={"setup": ["module load x\nrm -rf ~"]})
    code, _out, err = hpctrain(capsys, "sbatch", path, "-o", "job.sbatch")
    assert code == 2 and "slurm.setup[0]" in err and "newline or control character" in err
    assert nothing_written(here)


def test_sbatch_with_an_unsafe_sweep_folder_writes_nothing(here, capsys):
    code, _out, err = hpctrain(capsys, "sbatch", config(here), "-o", "job.sbatch", "--sweep-dir", "a b")
    assert code == 2 and "the sweep folder" in err
    assert nothing_written(here)


def test_submit_to_slurm_without_a_cluster_writes_nothing(here, capsys):
    code, _out, err = hpctrain(capsys, "submit", config(here), "--executor", "slurm")
    assert code == 2 and "no Slurm cluster answers" in err
    assert nothing_written(here)


def test_local_elements_of_several_tasks_without_mpirun_write_nothing(here, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(here / "no-bin"))
    path = config(here, slurm_section={"tasks_per_node": 2})
    code, _out, err = hpctrain(capsys, "submit", path, "--executor", "local")
    assert code == 2 and "mpirun" in err
    assert nothing_written(here)


@pytest.fixture
def fake_cluster(monkeypatch):
    """A cluster that answers, with MaxArraySize 5 and MaxJobCount 7; a submission is a test failure."""
    from hpctrain.launch import limits

    monkeypatch.setattr(slurm, "slurm_available", lambda timeout=10: True)
    monkeypatch.setattr(slurm, "queued_job_ids", lambda timeout=30: set())
    monkeypatch.setattr(limits, "cluster_config", lambda: {"MaxArraySize": "5", "MaxJobCount": "7",
                                                           "AccountingStorageType": limits.NO_ACCOUNTING})

    def submit_array(*_a, **_k):
        raise AssertionError("submitted")
    monkeypatch.setattr(slurm, "submit_array", submit_array)


def test_submit_to_slurm_with_an_unsafe_sweep_folder_writes_nothing(here, capsys, fake_cluster):
    code, _out, err = hpctrain(capsys, "submit", config(here), "--executor", "slurm", "--sweep-dir", "a b")
    assert code == 2 and "the sweep folder" in err
    assert nothing_written(here)


@pytest.mark.parametrize("command", [["submit", "--executor", "slurm"], ["submit", "--executor", "slurm", "--dry-run"]])
def test_more_elements_than_the_cluster_takes_are_refused_first(here, capsys, fake_cluster, command):
    path = config(here, grid={"optim.lr": [0.1, 0.01, 0.001], "seed": [0, 1, 2]})
    code, _out, err = hpctrain(capsys, command[0], path, *command[1:])
    assert code == 2, err
    assert "9 grid point(s)" in err and "MaxJobCount is 7" in err
    assert nothing_written(here)


def test_a_grid_past_max_array_size_needs_several_sbatch_scripts(here, capsys, fake_cluster):
    path = config(here, grid={"optim.lr": [0.1, 0.01, 0.001], "seed": [0, 1]})
    code, _out, err = hpctrain(capsys, "sbatch", path)
    assert code == 2 and "2 job arrays" in err, err
    assert nothing_written(here)
    code, out, err = hpctrain(capsys, "submit", path, "--executor", "slurm", "--dry-run")
    assert code == 0, err
    assert "#SBATCH --array=0-4%" in out


def test_grid_within_the_cluster_limit_passes(here, capsys, fake_cluster):
    code, out, err = hpctrain(capsys, "submit", config(here), "--executor", "slurm", "--dry-run")
    assert code == 0, err
    assert "#SBATCH --array=0-1%" in out


def test_cluster_limits_come_from_scontrol(monkeypatch):
    from hpctrain.launch import limits

    text = textwrap.dedent("""\
        Configuration data as of 2024-01-01T00:00:00
        MaxArraySize            = 1001
        MaxJobCount             = 10000
    """)
    monkeypatch.setattr(limits, "_asked", {})
    monkeypatch.setattr(limits, "_run", lambda args, timeout: text if args[0] == "scontrol" else None)
    found = limits.cluster_limits()
    assert (found.max_array_size, found.max_job_count) == (1001, 10000)
    monkeypatch.setattr(limits, "_asked", {})
    monkeypatch.setattr(limits, "_run", lambda args, timeout: None)
    assert limits.cluster_limits().max_array_size is None


