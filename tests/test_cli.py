"""The ``hpctrain`` command as a user meets it: help, and errors without tracebacks."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpctrain.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent


def hpctrain(*args, cwd=None, timeout=120):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "hpctrain", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_subcommand():
    out = hpctrain("--help")
    assert out.returncode == 0, out.stderr
    for name in ("run", "submit", "sbatch", "status", "collect", "data", "lr-find"):
        assert name in out.stdout
    assert set(COMMANDS) == {"run", "submit", "sbatch", "status", "collect", "data", "lr-find"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_subcommand_has_help(name):
    out = hpctrain(name, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: hpctrain " + name in out.stdout


def test_bad_override_value_is_one_paragraph_without_traceback(tmp_path):
    out = hpctrain("run", "configs/demo.yaml", "optim.lr=foo", "--sweep-dir", str(tmp_path / "s"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "optim.lr" in out.stderr and "expected a number" in out.stderr and "'foo'" in out.stderr
    assert not (tmp_path / "s").exists(), "nothing may be written for an invalid config"


def test_misspelt_key_in_file_names_key_path(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text((ROOT / "configs" / "demo.yaml").read_text().replace("  batch_size:", "  batch_sise:"))
    out = hpctrain("run", str(cfg), "--sweep-dir", str(tmp_path / "s"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "data.batch_sise: unknown key" in out.stderr and "data.batch_size" in out.stderr
    assert str(cfg) in out.stderr
    assert not (tmp_path / "s").exists()


def test_index_out_of_range(tmp_path):
    out = hpctrain("run", "configs/demo.yaml", "--index", "99", "--sweep-dir", str(tmp_path / "s"))
    assert out.returncode == 2 and "--index 99 is out of range" in out.stderr and "Traceback" not in out.stderr


def test_non_utf8_config_is_an_error_naming_the_file_and_byte(tmp_path):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes(b"name: caf\xe9\n")
    out = hpctrain("submit", str(cfg), "--dry-run", "--executor", "local")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert str(cfg) in out.stderr and "byte 9" in out.stderr and "UTF-8" in out.stderr


def test_empty_config_is_refused_not_run_with_defaults(tmp_path):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("# nothing here yet\n")
    out = hpctrain("run", str(cfg), "--sweep-dir", str(tmp_path / "s"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert str(cfg) in out.stderr and "empty" in out.stderr and "data" in out.stderr
    assert not (tmp_path / "s").exists()


def test_overrides_may_follow_the_options():
    from hpctrain.cli import build_parser, parse

    parser = build_parser()
    args = parse(parser, ["run", "c.yaml", "optim.lr=0.1", "--index", "2", "train.epochs=200", "--max-steps", "5"])
    assert args.overrides == ["optim.lr=0.1", "train.epochs=200"] and args.index == 2 and args.max_steps == 5
    with pytest.raises(SystemExit):
        parse(parser, ["run", "c.yaml", "--index", "2", "--no-such-option"])
    with pytest.raises(SystemExit):
        parse(parser, ["status", "sweeps/x", "a=b"])  # status takes no overrides
