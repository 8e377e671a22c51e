"""Grid expansion, stable run ids, sweep folder layout and atomic state."""
import json
import textwrap

import pytest

from hpctrain.config import ConfigError
from hpctrain.runstate import read_state
from hpctrain.sweep import SweepDir, expand, expand_grid, iter_runs, load_sweep, run_id_for
from state_files import put_state


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return path


GRID_3x2 = """
name: g
grid:
  optim.lr: [1e-1, 1e-2, 1e-3]
  model.hidden: [[32], [64, 64]]
"""


def test_product_of_3x2_gives_6_stable_ids(tmp_path):
    path = write(tmp_path, GRID_3x2)
    _, a = load_sweep(path)
    _, b = load_sweep(path)
    assert len(a) == 6
    assert [s.run_id for s in a] == [s.run_id for s in b]
    assert len({s.run_id for s in a}) == 6
    assert [s.index for s in a] == list(range(6))
    # last axis varies fastest
    assert [s.params["model.hidden"] for s in a[:2]] == [[32], [64, 64]]
    assert a[0].config.optim.lr == 0.1 and a[5].config.model.hidden == [64, 64]
    assert a[0].run_id.startswith("lr0.1-hidden32_")


def test_run_id_depends_on_resolved_config_not_on_name_or_resources(tmp_path):
    _, a = load_sweep(write(tmp_path, GRID_3x2))
    _, b = load_sweep(write(tmp_path, GRID_3x2), ["name=other", "slurm.time_min=5", "data.loader_threads=4"])
    _, c = load_sweep(write(tmp_path, GRID_3x2), ["seed=1"])
    assert [s.run_id for s in a] == [s.run_id for s in b]
    assert not {s.run_id for s in a} & {s.run_id for s in c}


def test_zip_group_advances_together():
    raw = {"grid": {"seed": [0, 1], "zip": {"optim.name": ["sgd", "adam"], "optim.lr": [0.1, 0.001]}}}
    points = expand_grid(raw)
    assert points == [
        {"seed": 0, "optim.name": "sgd", "optim.lr": 0.1},
        {"seed": 0, "optim.name": "adam", "optim.lr": 0.001},
        {"seed": 1, "optim.name": "sgd", "optim.lr": 0.1},
        {"seed": 1, "optim.name": "adam", "optim.lr": 0.001},
    ]
    assert len(expand(raw)) == 4


def test_no_grid_is_one_point():
    specs = expand({})
    assert len(specs) == 1 and specs[0].params == {}


@pytest.mark.parametrize("grid, words", [
    ({"optim.lrr": [1]}, ["grid: optim.lrr: no such config key", "Did you mean 'optim.lr'"]),
    ({"optim.lr": []}, ["grid.optim.lr", "non-empty list"]),
    ({"optim.lr": 0.1}, ["grid.optim.lr", "non-empty list"]),
    ({"optim.lr": [0.1, "x"]}, ["optim.lr: expected a number, got 'x'", "grid point 1"]),
    ({"model.hidden": [[8], [0]]}, ["model.hidden[0]", "out of range", "grid point 1"]),
    ({"zip": {"optim.lr": [1, 2], "seed": [1]}}, ["grid.zip[0]", "equal lengths", "optim.lr: 2, seed: 1"]),
    ({"zip": [[1, 2]]}, ["grid.zip[0]", "mapping of dotted keys"]),
    ({"optim.lr": [1], "zip": {"optim.lr": [2]}}, ["optim.lr appears more than once"]),
    ({"slurm.nodes": [1, 2]}, ["slurm.nodes cannot be swept"]),
    ({"optim.lr": [0.1, 0.1]}, ["same config"]),
])
def test_grid_errors(grid, words):
    with pytest.raises(ConfigError) as err:
        expand({"grid": grid}, "c.yaml")
    for word in words:
        assert word in str(err.value)


def test_sweep_folder_layout_and_no_overwrite(tmp_path):
    raw, specs = load_sweep(write(tmp_path, GRID_3x2))
    sweep = SweepDir(tmp_path / "sweeps" / "g")
    sweep.write(raw, specs)
    assert (sweep.root / "sweep.yaml").exists()
    records = [json.loads(l) for l in (sweep.root / "grid.jsonl").read_text().splitlines()]
    assert [r["run_id"] for r in records] == [s.run_id for s in specs]
    assert records[3]["params"] == specs[3].params
    # Run folders are made when a run is submitted or starts, not for every grid point at once.
    assert not (sweep.root / "runs").exists()
    assert [state.status for _rec, state in iter_runs(sweep)] == ["pending"] * 6
    run = sweep.prepare_run(specs[0])
    assert (run / "config.yaml").exists() and (run / "checkpoints").is_dir()
    assert read_state(run).status == "pending" and read_state(run).index == 0
    # A finished run is never reset by writing the sweep again or preparing its run again.
    state = read_state(run)
    state.status, state.best_metric = "done", 0.25
    put_state(run, state)
    sweep.write(raw, specs)
    sweep.prepare_run(specs[0])
    assert read_state(run).status == "done" and read_state(run).best_metric == 0.25


def test_status_of_runs_without_a_folder_is_pending_and_a_lost_state_is_unknown(tmp_path):
    raw, specs = load_sweep(write(tmp_path, GRID_3x2))
    sweep = SweepDir(tmp_path / "s")
    sweep.write(raw, specs)
    (sweep.prepare_run(specs[1]) / "state.json").unlink()
    states = [state for _rec, state in iter_runs(sweep)]
    assert states[1] is None  # a folder whose state.json went missing: not known
    assert [s.status for i, s in enumerate(states) if i != 1] == ["pending"] * 5
    assert states[0].run_id == specs[0].run_id and states[0].index == 0 and states[0].params == specs[0].params


def test_run_ids_stay_what_they_were():
    # Resubmitting finds a sweep's runs by their ids: the ids of existing sweeps must never change.
    raw = {"name": "g", "grid": {"optim.lr": [0.1, 0.01, 0.001], "model.hidden": [[32], [64, 64]]}}
    assert [s.run_id for s in expand(raw)] == [
        "lr0.1-hidden32_d956c972", "lr0.1-hidden64x64_4fc0d502", "lr0.01-hidden32_259d739f",
        "lr0.01-hidden64x64_935a1990", "lr0.001-hidden32_8e5932c5", "lr0.001-hidden64x64_2f091313"]
    assert expand({})[0].run_id == "2f091313"
    zipped = {"data": {"task": "regression"},
              "grid": {"seed": [0, 1], "zip": {"optim.name": ["sgd", "adam"], "optim.lr": [0.1, 1]},
                       "data.synth.rows": [100, 200], "model.output": ["none", "positive"],
                       "loss.name": ["mse", "huber"]}}
    sections = {"grid": {"optim": [{"name": "sgd"}, {"name": "adam", "lr": 0.5}], "data.synth": [None, {"rows": 50}],
                         "train.early_stopping.patience": [None, 3], "model.activation": ["leaky_relu", "tanh"],
                         "data.path": ["a b/c", "d"]}}
    ids = [s.run_id for s in expand(zipped)]
    assert ids[:16:3] == ["seed0-namesgd-lr0.1-rows100-outputnone-namemse_59e35c14",
                        "seed0-namesgd-lr0.1-rows100-outputpositive-namehuber_314441f8",
                        "seed0-namesgd-lr0.1-rows200-outputpositive-namemse_a82e3d55",
                        "seed0-nameadam-lr1-rows100-outputnone-namehuber_cfd19385",
                        "seed0-nameadam-lr1-rows200-outputnone-namemse_81fe0219",
                        "seed0-nameadam-lr1-rows200-outputpositive-namehuber_562c9bb2"]
    assert _digest(ids) == "08c34794f0af2bc8"
    ids = [s.run_id for s in expand(sections)]
    assert ids[5] == "optim-name-sgd-synthNone-patience3-activationleaky-relu-path_f9e83a8f"
    assert _digest(ids) == "af843ffe71380957"


def _digest(ids):
    import hashlib
    return hashlib.sha256(" ".join(ids).encode()).hexdigest()[:16]


def test_run_id_is_filesystem_safe():
    rid = run_id_for({"model.activation": "leaky_relu", "data.path": "/a b/c"}, {"x": 1})
    assert "/" not in rid and " " not in rid


def test_folder_of_a_different_sweep_is_refused_not_overwritten(tmp_path):
    raw, specs = load_sweep(write(tmp_path, GRID_3x2))
    sweep = SweepDir(tmp_path / "s")
    sweep.write(raw, specs)
    before = (sweep.root / "grid.jsonl").read_text()
    raw2, specs2 = load_sweep(write(tmp_path, GRID_3x2), ["optim.lr=0.5"])
    with pytest.raises(ConfigError, match="already holds a different sweep"):
        sweep.write(raw2, specs2)
    assert (sweep.root / "grid.jsonl").read_text() == before
    sweep.write(raw, specs)  # the same sweep again is fine
