"""Large grids: quick validation and dry runs, a layout without a folder per point, exact run ids."""
from __future__ import annotations

import copy
import time
import typing

import pytest
import yaml

from hpctrain import cli
from hpctrain.config import ConfigError, build_config, set_dotted
from hpctrain.launch.cli_status import rows
from hpctrain.plan import make_plan
from hpctrain.runstate import read_state
from hpctrain.sweep import SweepDir, _identity, expand, expand_grid, load_sweep, run_id_for


def big_config(folder, points_per_seed_axis=1000):
    """lr x hidden x seed: 5 x 4 x N points, on data the config makes itself."""
    raw = {"name": "big", "data": {"path": "data/big", "synth": {"rows": 100}},
           "grid": {"optim.lr": [0.1, 0.03, 0.01, 0.003, 0.001], "model.hidden": [[8], [16], [8, 8], [32, 16]],
                    "seed": list(range(points_per_seed_axis))}}
    path = folder / "big.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def full_build(raw: dict, params: dict):
    """A grid point validated the slow, plain way: the whole config built from scratch."""
    point = copy.deepcopy({k: v for k, v in raw.items() if k != "grid"})
    for key, value in params.items():
        set_dotted(point, key, value)
    return build_config(point)


GRIDS = [
    {"grid": {"optim.lr": [1, 0.1], "model.hidden": [[32], [64, 64]], "optim.betas": [[0.9, 0.99]]}},
    {"data": {"task": "regression"},
     "grid": {"seed": [0, 1], "zip": {"optim.name": ["sgd", "adam"], "optim.lr": [0.1, 1]},
              "data.synth.rows": [100, 200], "model.output": ["none", "positive"], "loss.name": ["mse", "huber"]}},
    {"optim": {"lr": 0.5, "weight_decay": 0.1},
     "grid": {"optim": [{"name": "sgd"}, {"name": "adam", "lr": 0.2}], "data.synth": [None, {"rows": 50}],
              "train.early_stopping.patience": [None, 3], "data.path": ["a b/c", "d"]}},
    {"grid": {"data.synth": [{"rows": 50}], "data.synth.rows": [10, 20], "model": [{"hidden": [4]}, {}],
              "model.dropout": [0.0, 0.5]}},  # keys inside swept sections
    {"data": {"task": "multiclass", "synth": {"classes": 4}},
     "grid": {"data.synth.classes": [3, 5], "train.monitor": ["val_loss", "val_accuracy"]}},
    # labels with "_" inside (ids join them with "-"), then labels the id substitution merges
    {"grid": {"optim.weight_decay": [0.1, 0.2], "model.activation": ["leaky_relu", "tanh"]}},
    {"grid": {"train.monitor": ["val__x_", "val_loss"], "data.path": ["_a", "b_"], "seed": [1]}},
]


@pytest.mark.parametrize("raw", GRIDS)
def test_each_point_is_what_validating_it_whole_gives(raw):
    specs = expand(raw, "c.yaml")
    assert [s.params for s in specs] == expand_grid(raw)
    for spec in specs:
        whole = full_build(raw, spec.params)
        assert spec.config == whole
        assert spec.run_id == run_id_for(spec.params, _identity(whole))


@pytest.mark.parametrize("grid, words", [
    ({"optim.lr": [0.1, 0.2], "model.dropout": [0.0, 1.5]},
     ["model.dropout: 1.5 is out of range", "grid point 1: optim.lr=0.1, model.dropout=1.5"]),
    ({"model.dropout": [0.0, 1.5], "optim.lr": [0.1, "x"]},
     ["optim.lr: expected a number, got 'x'", "grid point 1: model.dropout=0.0, optim.lr='x'"]),
    ({"data.task": ["binary", "regression"], "loss.name": ["bce", "mse"]},
     ["loss.name: 'mse' does not fit data.task 'binary'", "grid point 1"]),
    ({"data.task": ["multiclass"], "data.synth": [{"classes": 2}]},
     ["data.synth.classes: multiclass needs at least 3 classes", "grid point 0"]),
    ({"model": [{"hidden": [0]}]}, ["model.hidden[0]", "out of range", "grid point 0"]),
    ({"data.synth.rows": [5]}, ["data.synth.rows: 5 is out of range", "grid point 0"]),
])
def test_a_bad_grid_point_is_named(grid, words):
    with pytest.raises(ConfigError) as err:
        expand({"grid": grid}, "c.yaml")
    for word in words:
        assert word in str(err.value)


def test_type_hints_are_resolved_once_per_class(monkeypatch):
    calls = []
    real = typing.get_type_hints

    def counting(obj, *args, **kwargs):
        calls.append(obj)
        return real(obj, *args, **kwargs)
    monkeypatch.setattr(typing, "get_type_hints", counting)
    specs = expand({"grid": {"seed": list(range(200)), "optim.lr": [0.1, 0.01]}})
    assert [s.config.seed for s in specs[:3]] == [0, 0, 1]
    assert len(calls) == len(set(calls)), "a class's type hints were resolved again"


def test_layout_of_a_large_grid_makes_no_run_folders_and_shows_them_pending(tmp_path):
    raw, specs = load_sweep(big_config(tmp_path, 500))  # 10,000 points
    sweep = SweepDir(tmp_path / "sw")
    started = time.perf_counter()
    sweep.write(raw, specs)
    elapsed = time.perf_counter() - started
    assert elapsed < 10, f"laying out 10,000 points took {elapsed:.1f}s"
    assert sorted(p.name for p in sweep.root.iterdir()) == ["grid.jsonl", "sweep.yaml"]
    assert len(sweep.records()) == 10_000
    table = rows(str(sweep.root), slurm_states=False)
    assert len(table) == 10_000 and {r["status"] for r in table} == {"pending"}
    assert make_plan(sweep, raw, specs).indices == list(range(10_000))
    run = sweep.prepare_run(specs[1234])  # what a submission or the run's start does
    assert read_state(run).status == "pending" and read_state(run).index == 1234


def test_collect_reads_runs_without_a_folder_as_pending(tmp_path):
    from hpctrain.report.runs import read_sweep

    raw, specs = load_sweep(big_config(tmp_path, 2))
    SweepDir(tmp_path / "sw").write(raw, specs)
    data = read_sweep(tmp_path / "sw")
    assert [run.status for run in data.runs] == ["pending"] * 40 and not data.problems


def test_dry_run_of_a_large_grid_is_quick(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = big_config(tmp_path, 1000)  # 20,000 points
    started = time.perf_counter()
    code = cli.main(["submit", str(path), "--dry-run", "--executor", "local"])
    elapsed = time.perf_counter() - started
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.count("\n# run ") == 20_000 and "#SBATCH --array=0-19999%16" in out.out
    assert elapsed < 15, f"a dry run of 20,000 points took {elapsed:.1f}s"
    assert not (tmp_path / "sweeps").exists()