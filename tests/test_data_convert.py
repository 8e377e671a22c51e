"""hpctrain data convert: CSV, NPY, NPZ and HDF5 inputs, seeded and stratified splits, streaming."""
from __future__ import annotations

from collections import Counter

import h5py
import numpy as np
import pytest

from hpctrain.data import convert as convert_module
from hpctrain.data.convert import convert
from hpctrain.data.shards import open_dataset
from hpctrain.errors import DataError

N = 600


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The same table in every input format; sorted by label, as real exports often are."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    y = np.sort(rng.choice(3, N, p=[0.6, 0.3, 0.1]))
    x = rng.normal(size=(N, 4)) + y[:, None]
    x[:, 0] = np.arange(N)  # a row id, to follow rows through the conversion
    w = rng.uniform(0.5, 2.0, N)
    with open(folder / "t.csv", "w") as f:
        f.write("id,b,c,label,d,weight\n")
        for i in range(N):
            f.write(f"{x[i, 0]:.0f},{float(x[i, 1])!r},{float(x[i, 2])!r},{y[i]},{float(x[i, 3])!r},{float(w[i])!r}\n")
    np.save(folder / "t.npy", np.column_stack([x, w, y]))
    np.savez(folder / "t.npz", x=x, y=y, w=w)
    with h5py.File(folder / "t.h5", "w") as f:
        f["x"], f["y"], f["w"] = x, y, w
    return folder, x, y, w


def rows_of(path, split):
    """{row id: (features, label, weight)} of a converted split."""
    out = {}
    for info in open_dataset(path).shards(split):
        with h5py.File(info.path, "r") as f:
            for xr, yr, wr in zip(f["x"][...], f["y"][...], f["w"][...]):
                out[int(xr[0])] = (tuple(xr.tolist()), int(yr), float(wr))
    return out


ARGS = {"t.csv": dict(target="label", weights="weight"), "t.npy": dict(target="-1", weights="4"),
        "t.npz": dict(weights="w"), "t.h5": dict(weights="w")}


@pytest.mark.parametrize("name", list(ARGS))
def test_every_format_gives_the_same_dataset(source, tmp_path, name):
    folder, x, y, w = source
    path = convert(folder / name, tmp_path / "out", task="multiclass", shards=3, seed=4, stratify=True, **ARGS[name])
    meta = open_dataset(path).meta
    assert (meta.n_features, meta.n_classes, meta.has_weights) == (4, 3, True)
    assert sum(meta.rows.values()) == N  # stratified: each class split on its own, +-1 row per class
    assert all(abs(meta.rows[s] - n) <= 3 for s, n in (("train", 480), ("val", 60), ("test", 60)))
    reference = convert(folder / "t.h5", tmp_path / "ref", task="multiclass", shards=3, seed=4, stratify=True,
                        weights="w")
    for split in ("train", "val", "test"):
        got = rows_of(path, split)
        assert got.keys() == rows_of(reference, split).keys()
        for i, (xr, yr, wr) in got.items():
            np.testing.assert_allclose(xr, x[i].astype(np.float32), rtol=1e-6)
            assert yr == y[i] and wr == pytest.approx(w[i], rel=1e-6)
    if name == "t.csv":
        assert meta.feature_names == ["id", "b", "c", "d"]


def test_stratified_split_keeps_class_proportions(source, tmp_path):
    folder, _, y, _ = source
    path = convert(folder / "t.h5", tmp_path / "s", task="multiclass", stratify=True, seed=1, split=(0.6, 0.2, 0.2))
    total = Counter(y.tolist())
    for split, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        counts = Counter(label for _, label, _ in rows_of_no_w(path, split))
        for c in range(3):
            assert abs(counts[c] - frac * total[c]) <= 1, (split, c, counts)


def rows_of_no_w(path, split):
    for info in open_dataset(path).shards(split):
        with h5py.File(info.path, "r") as f:
            yield from zip(f["x"][:, 0].tolist(), f["y"][...].tolist(), [None] * info.rows)


def test_split_is_seeded(source, tmp_path):
    folder = source[0]
    ids = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        path = convert(folder / "t.npz", tmp_path / name, task="multiclass", seed=seed)
        ids[name] = sorted(i for i, _, _ in rows_of_no_w(path, "val"))
    assert ids["a"] == ids["b"] != ids["c"]


def test_sorted_input_is_mixed_within_shards(source, tmp_path):
    path = convert(source[0] / "t.npz", tmp_path / "m", task="multiclass", shards=2)
    for info in open_dataset(path).shards("train"):
        with h5py.File(info.path, "r") as f:
            labels = f["y"][...]
        assert len(set(labels[:40].tolist())) > 1  # the input's first rows are all class 0


def test_streaming_in_small_chunks_gives_the_same_result(source, tmp_path, monkeypatch):
    folder = source[0]
    whole = convert(folder / "t.csv", tmp_path / "whole", task="multiclass", target="label", seed=2)
    monkeypatch.setattr(convert_module, "CHUNK_ROWS", 37)  # input read 37 rows at a time
    for name, kw in (("t.csv", {"target": "label"}), ("t.npz", {}), ("t.h5", {}), ("t.npy", {})):
        small = convert(folder / name, tmp_path / f"chunked-{name}", task="multiclass", seed=2, **kw)
        for split in ("train", "val", "test"):
            assert sorted(i for i, _, _ in rows_of_no_w(small, split)) == \
                sorted(i for i, _, _ in rows_of_no_w(whole, split))


def test_standardization_uses_train_rows_only(source, tmp_path):
    folder, x, _, _ = source
    path = convert(folder / "t.h5", tmp_path / "st", task="multiclass", seed=3)
    meta = open_dataset(path).meta
    train_ids = sorted(int(i) for i, _, _ in rows_of_no_w(path, "train"))
    train = x[train_ids].astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(meta.mean, train.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(meta.std, train.std(0), rtol=1e-9)
    assert abs(meta.mean[0] - x[:, 0].mean()) > 1e-3  # the row-id column differs over all rows


def test_text_labels_are_numbered_in_sorted_order(tmp_path):
    csv = tmp_path / "r.csv"
    csv.write_text("a,kind,t1,t2\n" + "".join(f"{i},{'cat' if i % 3 else 'dog'},{i * 0.5},{-i}\n" for i in range(40)))
    path = convert(csv, tmp_path / "bin", task="binary", target="kind")
    meta = open_dataset(path).meta
    assert meta.class_names == ["cat", "dog"] and meta.n_features == 3
    with h5py.File(open_dataset(path).shards("train")[0].path, "r") as f:
        a, y = f["x"][:, 0], f["y"][...]
    assert (y == (a % 3 == 0)).all()  # "dog" (every third row) is class 1


def test_regression_multi_target(tmp_path):
    csv = tmp_path / "r.csv"
    csv.write_text("a,b,t1,t2\n" + "".join(f"{i},{i % 5},{i * 0.5},{-i}\n" for i in range(40)))
    path = convert(csv, tmp_path / "reg", task="regression", target="t1,t2")
    meta = open_dataset(path).meta
    assert (meta.n_targets, meta.target_names, meta.feature_names) == (2, ["t1", "t2"], ["a", "b"])
    with h5py.File(open_dataset(path).shards("train")[0].path, "r") as f:
        x, y = f["x"][...], f["y"][...]
    np.testing.assert_allclose(y[:, 0], x[:, 0] * 0.5)
    np.testing.assert_allclose(y[:, 1], -x[:, 0])


def test_bad_inputs_name_the_file_and_row(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,y\n1,2,0\n3,nan,1\n")
    with pytest.raises(DataError, match=rf"{bad}: data row 2: feature 'b' is nan"):
        convert(bad, tmp_path / "o1", task="binary")
    three = tmp_path / "three.csv"
    three.write_text("a,y\n1,0\n2,1\n3,2\n")
    with pytest.raises(DataError, match=rf"{three}: a binary target needs labels 0/1"):
        convert(three, tmp_path / "o2", task="binary")
    with pytest.raises(DataError, match=rf"{three}: no column 'z' for --target; columns are: a, y"):
        convert(three, tmp_path / "o3", task="binary", target="z")
    text = tmp_path / "text.csv"
    text.write_text("a,y\n1,0\nx1,1\n")
    with pytest.raises(DataError, match=rf"{text}: data row 2 \(line 3\): could not convert string 'x1'"):
        convert(text, tmp_path / "o4", task="binary")
    with pytest.raises(DataError, match="input file not found"):
        convert(tmp_path / "none.csv", tmp_path / "o5", task="binary")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-built dataset left
