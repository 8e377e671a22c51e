"""``hpctrain data synth | convert | inspect`` through the real command line."""
from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np

from hpctrain.cli import main


def test_synth_then_inspect(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["data", "synth", str(out), "--rows", "3000", "--features", "5", "--task", "multiclass",
                 "--classes", "4", "--shards", "2", "--seed", "3"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "multiclass, 4 classes" in text and "features  5" in text
    assert "train             2400       2" in text
    assert "checked   6 shards: all good" in text


def test_inspect_exit_code_names_the_first_bad_file(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["data", "synth", str(out), "--rows", "800", "--features", "3", "--task", "binary"]) == 0
    victim = out / "val" / "part-00001.h5"
    with h5py.File(victim, "r+") as f:
        f["x"][0] = [1.0, 2.0, 3.0]
    capsys.readouterr()
    assert main(["data", "inspect", str(out)]) == 2
    captured = capsys.readouterr()
    assert f"hpctrain data: error: {victim}: sha256 checksum mismatch" in captured.err
    assert "Traceback" not in captured.err
    assert main(["data", "inspect", str(tmp_path / "missing")]) == 2


def test_convert_cli_and_exit_code_of_a_real_process(tmp_path):
    table = np.column_stack([np.random.default_rng(0).normal(size=(200, 3)), np.arange(200) % 2])
    np.save(tmp_path / "t.npy", table)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    run = [sys.executable, "-m", "hpctrain", "data"]
    done = subprocess.run(run + ["convert", str(tmp_path / "t.npy"), str(tmp_path / "ds"), "--task", "binary",
                                 "--shards", "2", "--split", "0.5,0.25,0.25", "--stratify", "--seed", "9"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "train 100 rows, val 50 rows, test 50 rows" in done.stdout
    os.truncate(tmp_path / "ds" / "train" / "part-00000.h5", 500)
    done = subprocess.run(run + ["inspect", str(tmp_path / "ds")], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert f"{tmp_path / 'ds' / 'train' / 'part-00000.h5'}: cannot open the shard as HDF5" in done.stderr
    bad = subprocess.run(run + ["convert", str(tmp_path / "t.npy"), str(tmp_path / "ds2"), "--task", "binary",
                                "--split", "0.5,0.6,0.1"], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "summing to 1" in bad.stderr
