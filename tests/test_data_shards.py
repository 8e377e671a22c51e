"""The shard format: layout, meta.json, validation errors that name the file, synthetic data."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from hpctrain.config import DataConfig, SynthConfig
from hpctrain.data.loader import ShardLoader
from hpctrain.data.shards import FORMAT_VERSION, DatasetExists, inspect_shard, open_dataset
from hpctrain.data.synthetic import ensure_synthetic, make_synthetic
from hpctrain.errors import DataError, HpctrainError


@pytest.fixture
def ds(tmp_path):
    return make_synthetic(tmp_path / "ds", rows=2000, features=6, task="binary", shards=3, weights=True, seed=1)


def read_split(path, split):
    xs, ys = [], []
    for info in open_dataset(path).shards(split):
        with h5py.File(info.path, "r") as f:
            xs.append(f["x"][...])
            ys.append(f["y"][...])
    return np.concatenate(xs), np.concatenate(ys)


def test_layout_and_meta(ds):
    meta = open_dataset(ds).meta
    assert (meta.task, meta.n_features, meta.n_classes, meta.n_targets) == ("binary", 6, 2, 1)
    assert meta.rows == {"train": 1600, "val": 200, "test": 200}
    assert meta.format_version == FORMAT_VERSION and meta.has_weights
    assert len(meta.mean) == len(meta.std) == len(meta.feature_names) == 6
    raw = json.loads((ds / "meta.json").read_text())
    assert [s["file"] for s in raw["shards"]["train"]] == [f"train/part-0000{i}.h5" for i in range(3)]
    with h5py.File(ds / "train" / "part-00000.h5", "r") as f:
        assert f["x"].dtype == np.float32 and f["x"].chunks[1] == 6
        assert f["y"].dtype == np.int64 and f["w"].dtype == np.float32
        assert f.attrs["format_version"] == FORMAT_VERSION
    assert not [p for p in ds.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_mean_std_from_train_split_only(ds):
    meta = open_dataset(ds).meta
    train_x, _ = read_split(ds, "train")
    all_x = np.concatenate([train_x, read_split(ds, "val")[0], read_split(ds, "test")[0]])
    np.testing.assert_allclose(meta.mean, train_x.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(meta.std, train_x.astype(np.float64).std(0), rtol=1e-5)
    assert np.abs(np.asarray(meta.mean) - all_x.mean(0)).max() > 1e-4  # val/test rows would move it


def test_synthetic_structure_is_learnable(tmp_path):
    # A linear probe on standardised features beats chance clearly: the targets carry signal.
    path = make_synthetic(tmp_path / "m", rows=6000, features=8, task="multiclass", classes=4, shards=2, noise=0.1)
    x, y = read_split(path, "train")
    assert set(np.unique(y)) == {0, 1, 2, 3}
    xs = np.c_[(x - x.mean(0)) / x.std(0), np.ones(len(x))]
    w, *_ = np.linalg.lstsq(xs, np.eye(4)[y], rcond=None)
    assert np.mean((xs @ w).argmax(1) == y) > 0.5


def test_missing_meta_json(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty' / 'meta.json'}: not found"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="no such dataset folder"):
        open_dataset(tmp_path / "nothing")


def test_wrong_format_version(ds):
    raw = json.loads((ds / "meta.json").read_text())
    raw["format_version"] = 99
    (ds / "meta.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"meta.json: format_version 99 is not supported; expected 1"):
        open_dataset(ds)


def test_wrong_feature_count(ds):
    shard = ds / "train" / "part-00001.h5"
    with h5py.File(shard, "r+") as f:
        rows = f["x"].shape[0]
        del f["x"]
        f.create_dataset("x", data=np.zeros((rows, 7), np.float32))
    with pytest.raises(DataError, match=f"{shard}: x has 7 features; meta.json says n_features = 6"):
        open_dataset(ds)


def test_corrupt_shard(ds):
    shard = ds / "val" / "part-00002.h5"
    with open(shard, "r+b") as f:
        f.write(b"\0garbage" * 64)  # over the HDF5 superblock
    with pytest.raises(DataError, match=f"{shard}: cannot open the shard as HDF5"):
        open_dataset(ds)


def test_truncated_shard(ds):
    shard = ds / "train" / "part-00000.h5"
    os.truncate(shard, os.path.getsize(shard) // 2)
    with pytest.raises(DataError, match=str(shard)):
        open_dataset(ds)
    # a loader on an unchecked dataset fails on the first read of that shard, naming it
    ld = ShardLoader(open_dataset(ds, check=False), batch_size=100, prefetch=2)
    with pytest.raises(DataError, match=str(shard)):
        list(ld)


def test_missing_shard_file(ds):
    shard = ds / "test" / "part-00001.h5"
    shard.unlink()
    with pytest.raises(DataError, match=f"{shard}: shard file is missing"):
        open_dataset(ds)


def test_checksum_mismatch_found_by_inspect(ds):
    dataset = open_dataset(ds)
    info = dataset.shards("train")[2]
    with h5py.File(info.path, "r+") as f:  # valid HDF5, different data
        f["x"][0, 0] = 12345.0
    with pytest.raises(DataError, match=f"{info.path}: sha256 checksum mismatch"):
        inspect_shard(info, dataset.meta)
    inspect_shard(dataset.shards("train")[0], dataset.meta)  # the others are fine


def test_bad_labels_found_by_inspect(ds):
    dataset = open_dataset(ds)
    info = dataset.shards("val")[0]
    with h5py.File(info.path, "r+") as f:
        f["y"][3] = 7
    with pytest.raises(DataError, match=f"{info.path}: row 3: label 7 is outside 0..1"):
        inspect_shard(info, dataset.meta, checksum=False)


def test_errors_are_user_errors(tmp_path):
    with pytest.raises(HpctrainError):
        open_dataset(tmp_path)


def test_new_dataset_never_overwrites(ds):
    with pytest.raises(DatasetExists, match="already exists"):
        make_synthetic(ds, rows=100, features=2, task="binary")
    make_synthetic(ds, rows=100, features=2, task="regression", overwrite=True)
    assert open_dataset(ds).meta.task == "regression"


def _synth_cfg(path, rows=500):
    return DataConfig(path=str(path), task="binary", synth=SynthConfig(rows=rows, features=3, shards=2))


def test_ensure_synthetic_creates_once_and_checks_settings(tmp_path):
    path = tmp_path / "demo"
    assert ensure_synthetic(_synth_cfg(path)) == path
    stamp = (path / "meta.json").stat().st_mtime_ns
    ensure_synthetic(_synth_cfg(path))
    assert (path / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="rows: 500 there, 900 asked"):
        ensure_synthetic(_synth_cfg(path, rows=900))


RACER = """
import sys
from hpctrain.config import DataConfig, SynthConfig
from hpctrain.data.synthetic import ensure_synthetic
from hpctrain.data.shards import open_dataset
path = sys.argv[1]
ensure_synthetic(DataConfig(path=path, task="binary", synth=SynthConfig(rows=500, features=3, shards=2)))
print(open_dataset(path).meta.rows["train"])
"""


def test_ensure_synthetic_race_between_processes(tmp_path):
    path = tmp_path / "raced"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(path)], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert outputs == ["400"] * 3
    open_dataset(path)  # checks every shard
    assert [p.name for p in tmp_path.iterdir()] == ["raced"]  # the losers' copies are gone


def test_compressed_dataset_reads_through_hdf5(tmp_path):
    """Shards written by other tools may be compressed: no raw chunk offsets, HDF5 reads them."""
    import os

    import h5py

    from hpctrain.data.shards import RowSource

    rows = np.arange(5000 * 3, dtype=np.float32).reshape(5000, 3)
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("gz", data=rows, chunks=(256, 3), compression="gzip")
        f.create_dataset("raw", data=rows, chunks=(256, 3))
    fd = os.open(path, os.O_RDONLY)
    try:
        with h5py.File(path, "r") as f:
            for name, raw in (("gz", False), ("raw", True)):
                source = RowSource(f[name], fd)
                assert (source.offsets is not None) == raw
                out = np.zeros((1000, 3), np.float32)
                source.read(700, 1300, out[100:])
                assert np.array_equal(out[100:700], rows[700:1300]) and not out[:100].any()
    finally:
        os.close(fd)
