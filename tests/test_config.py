"""Config loading, overrides and every validation error path."""
import textwrap

import pytest

from hpctrain.config import (Config, ConfigError, apply_overrides, build_config, leaf_spec, load_raw,
                             parse_override, parse_yaml)


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def build(raw):
    return build_config(raw, "c.yaml")


def test_defaults_are_valid():
    cfg = build({})
    assert isinstance(cfg, Config)
    assert cfg.optim.name == "adam" and cfg.data.task == "binary" and cfg.grid == {}


def test_full_demo_config_loads(tmp_path):
    from pathlib import Path
    raw = load_raw(Path(__file__).parent.parent / "configs" / "demo.yaml")
    cfg = build(raw)
    assert cfg.name == "demo"
    assert set(cfg.grid) == {"optim.lr", "model.hidden"}


def test_exponent_floats_without_dot_are_numbers():
    # YAML 1.1 reads 1e-3 as a string; users write it that way all the time.
    assert parse_yaml("lr: 1e-3") == {"lr": 0.001}
    assert parse_yaml("lr: -2.5E+2") == {"lr": -250.0}
    assert build({"optim": {"lr": parse_yaml("1e-4")}}).optim.lr == pytest.approx(1e-4)


def test_int_is_accepted_for_float_and_converted():
    cfg = build({"optim": {"lr": 1}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("raw, key, words", [
    ({"optim": {"lrr": 0.1}}, "optim.lrr", ["unknown key", "Did you mean 'optim.lr'"]),
    ({"modle": {}}, "modle", ["unknown key", "Did you mean 'model'"]),
    ({"optim": {"lr": "foo"}}, "optim.lr", ["expected a number", "'foo'"]),
    ({"optim": {"lr": True}}, "optim.lr", ["expected a number"]),
    ({"optim": {"lr": 0}}, "optim.lr", ["out of range", "> 0"]),
    ({"optim": {"lr": float("nan")}}, "optim.lr", ["NaN"]),
    ({"data": {"batch_size": 1.5}}, "data.batch_size", ["expected an integer", "1.5"]),
    ({"data": {"batch_size": 0}}, "data.batch_size", ["out of range", ">= 1"]),
    ({"data": {"task": "binnary"}}, "data.task", ["not allowed", "binary, multiclass, regression", "did you mean 'binary'"]),
    ({"data": {"standardize": "yes"}}, "data.standardize", ["expected true or false"]),
    ({"model": {"hidden": 64}}, "model.hidden", ["expected a list of integers"]),
    ({"model": {"hidden": [64, 0]}}, "model.hidden[1]", ["out of range"]),
    ({"model": {"hidden": [64, "a"]}}, "model.hidden[1]", ["expected an integer"]),
    ({"model": {"dropout": 1.0}}, "model.dropout", ["out of range", "< 1.0"]),
    ({"model": {"activation": "rleu"}}, "model.activation", ["did you mean 'relu'"]),
    ({"optim": {"betas": [0.9]}}, "optim.betas", ["list of 2 values"]),
    ({"optim": "adam"}, "optim", ["expected a mapping"]),
    ({"train": {"early_stopping": {"patiense": 3}}}, "train.early_stopping.patiense", ["unknown key"]),
    ({"train": {"monitor": "loss"}}, "train.monitor", ["matching"]),
    ({"name": "my sweep"}, "name", ["not a valid value"]),
    ({"slurm": {"partition": "gpu; rm -rf /"}}, "slurm.partition", ["not a valid value"]),
    ({"slurm": {"setup": "module load x"}}, "slurm.setup", ["expected a list of strings"]),
    ({"seed": -1}, "seed", ["out of range"]),
    ({"grid": [1, 2]}, "grid", ["expected a mapping"]),
    ({"optim": {"lr": float("inf")}}, "optim.lr", ["expected a finite number", ".inf"]),
    ({"optim": {"weight_decay": float("inf")}}, "optim.weight_decay", ["expected a finite number", ".inf"]),
    ({"optim": {"max_norm": float("inf")}}, "optim.max_norm", ["expected a finite number"]),
    ({"optim": {"betas": [0.9, float("-inf")]}}, "optim.betas[1]", ["expected a finite number", "-.inf"]),
    ({"model": {"leaky_slope": float("inf")}}, "model.leaky_slope", ["expected a finite number"]),
    ({"slurm": {"mem_gb": float("inf")}}, "slurm.mem_gb", ["expected a finite number"]),
    ({"optim": {"lr": float("nan")}}, "optim.lr", ["expected a finite number", "NaN"]),
])
def test_validation_errors_name_key_value_and_expectation(raw, key, words):
    with pytest.raises(ConfigError) as err:
        build(raw)
    message = str(err.value)
    assert message.startswith(f"c.yaml: {key}:")
    for word in words:
        assert word in message


@pytest.mark.parametrize("raw, words", [
    ({"model": {"output": "positive"}}, ["model.output", "only to data.task: regression"]),
    ({"loss": {"name": "mse"}}, ["loss.name", "does not fit data.task 'binary'", "auto, bce"]),
    ({"data": {"task": "regression"}, "loss": {"name": "ce"}}, ["loss.name", "auto, mse, mae, huber"]),
    ({"data": {"task": "regression"}, "model": {"output": "bounded", "output_bounds": [1, 0]}},
     ["model.output_bounds", "low < high"]),
    ({"schedule": {"milestones": [5, 3]}}, ["schedule.milestones", "strictly increasing"]),
])
def test_cross_field_errors(raw, words):
    with pytest.raises(ConfigError) as err:
        build(raw)
    for word in words:
        assert word in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_raw(tmp_path / "nope.yaml")
    bad = write(tmp_path, "optim: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_raw(bad)
    scalar = write(tmp_path, "42\n", "s.yaml")
    with pytest.raises(ConfigError, match="expected a mapping of config sections"):
        load_raw(scalar)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# and another\n", "---\n", "{}\n"])
def test_empty_config_is_refused_naming_the_file_and_what_is_expected(tmp_path, text):
    empty = write(tmp_path, text, "e.yaml")
    with pytest.raises(ConfigError) as err:
        load_raw(empty)
    message = str(err.value)
    assert message.startswith(f"{empty}: ") and "empty" in message
    assert "data" in message and "path" in message  # what a config must at least say


def test_non_utf8_file_names_the_file_and_byte_offset(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: demo\noptim: {name: adam}  # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_raw(bad)
    message = str(err.value)
    offset = bad.read_bytes().index(b"\xe9")
    assert message.startswith(f"{bad}: ")
    assert f"byte {offset}" in message and "UTF-8" in message


def test_overrides_are_yaml_typed_lists_included():
    raw = apply_overrides({}, ["optim.lr=1e-2", "model.hidden=[128, 64]", "data.standardize=false",
                               "optim.name=sgd", "train.early_stopping.patience=3"])
    cfg = build(raw)
    assert cfg.optim.lr == 0.01 and cfg.model.hidden == [128, 64]
    assert cfg.data.standardize is False and cfg.optim.name == "sgd"
    assert cfg.train.early_stopping.patience == 3


def test_override_of_unknown_key_names_it():
    with pytest.raises(ConfigError) as err:
        apply_overrides({}, ["optim.lrr=0.1"])
    assert "optim.lrr" in str(err.value) and "Did you mean 'optim.lr'" in str(err.value)
    with pytest.raises(ConfigError, match="optim.lr.x: optim.lr has no sub-keys"):
        apply_overrides({}, ["optim.lr.x=1"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="key before '=' is empty"):
        parse_override("=3")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_override("model.hidden=[1, 2")


def test_override_does_not_mutate_input_and_fixes_swept_key():
    raw = {"optim": {"lr": 0.1}, "grid": {"optim.lr": [1, 2], "zip": [{"optim.lr": [1], "seed": [3]}]}}
    out = apply_overrides(raw, ["optim.lr=0.5"])
    assert raw["grid"]["optim.lr"] == [1, 2]
    assert "optim.lr" not in out["grid"] and out["grid"]["zip"] == [{"seed": [3]}]
    assert out["optim"]["lr"] == 0.5


def test_grid_override_sets_an_axis():
    out = apply_overrides({}, ["grid.optim.lr=[0.1, 0.01]"])
    assert out["grid"] == {"optim.lr": [0.1, 0.01]}


def test_leaf_spec_rejects_sections_beyond_leaves():
    tp, meta = leaf_spec("data.task")
    assert meta["choices"] == ("binary", "multiclass", "regression")
    with pytest.raises(ConfigError, match="no such config key"):
        leaf_spec("grid")


@pytest.mark.parametrize("raw, key", [
    ({"name": "abc\n"}, "name"),
    ({"slurm": {"partition": "debug\n"}}, "slurm.partition"),
    ({"slurm": {"account": "abc123\n"}}, "slurm.account"),
    ({"slurm": {"qos": "normal\n"}}, "slurm.qos"),
    ({"slurm": {"constraint": "a100\n"}}, "slurm.constraint"),
    ({"train": {"monitor": "val_loss\n"}}, "train.monitor"),
])
def test_patterns_match_the_whole_value_not_up_to_a_final_newline(raw, key):
    # `$` also matches just before a final newline: "abc\n" would make the folder sweeps/abc\n/
    # and "debug\n" a blank line in the #SBATCH header.
    with pytest.raises(ConfigError) as err:
        build(raw)
    assert str(err.value).startswith(f"c.yaml: {key}:") and "not a valid value" in str(err.value)


def test_infinite_floats_are_refused_in_files_overrides_and_grids(tmp_path):
    path = write(tmp_path, "optim:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=r"optim.lr: expected a finite number, got \.inf"):
        build(load_raw(path))
    with pytest.raises(ConfigError, match=r"optim.lr: expected a finite number, got -\.inf"):
        build(apply_overrides({}, ["optim.lr=-.inf"]))
    from hpctrain.sweep import expand
    with pytest.raises(ConfigError, match=r"optim.lr: expected a finite number.*grid point 1"):
        expand({"grid": {"optim.lr": [0.1, float("inf")]}}, "c.yaml")
