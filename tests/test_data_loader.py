"""ShardLoader on real HDF5 shards: partition, shuffling, resume, prefetch, errors."""
from __future__ import annotations

import io
import os
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch

from hpctrain.config import DataConfig
from hpctrain.data.loader import Batch, ShardLoader
from hpctrain.data.shards import DatasetWriter, Meta, open_dataset
from hpctrain.errors import DataError

# Uneven shards, none a multiple of the block size, one of a single row.
TRAIN_SHARDS = [301, 47, 128, 1, 90]
N_TRAIN = sum(TRAIN_SHARDS)


def ids_dataset(folder, train_shards=TRAIN_SHARDS, val_rows=53, test_rows=0, weights=True, features=3):
    """x[:, 0] is the row's id within its split; y and w derive from it, so every field can be checked."""
    rows = {"train": sum(train_shards), "val": val_rows, "test": test_rows}
    meta = Meta(task="binary", n_features=features, n_classes=2, n_targets=1,
                feature_names=[f"f{i}" for i in range(features)], mean=[], std=[], rows=rows, has_weights=weights)
    with DatasetWriter(folder, meta, shard_rows={"train": list(train_shards), "val": [val_rows] if val_rows else []}) \
            as writer:
        for split, n in rows.items():
            ids = np.arange(n, dtype=np.float32)
            x = np.stack([ids, 2 * ids] + [np.full(n, 5.0, np.float32)] * (features - 2), axis=1)
            writer.append(split, x, ids.astype(np.int64) % 2, ids + 0.5)
        return writer.finish()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ids_dataset(tmp_path_factory.mktemp("ids") / "ds")


def loader(path, **kw):
    args = dict(batch_size=20, block_rows=16, buffer_blocks=3, standardize=False, prefetch=0)
    args.update(kw)
    return ShardLoader(path, **args)


def epoch_ids(ld):
    batches = list(ld)
    for b in batches:  # every field of a row travels together
        ids = b.x[:, 0]
        assert torch.equal(b.x[:, 1], 2 * ids)
        assert torch.equal(b.y, ids.long() % 2)
        assert torch.equal(b.w, ids + 0.5)
    return [b.x[:, 0].long().tolist() for b in batches]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_every_train_row_once_per_epoch_across_ranks(data, world, remainder):
    per_rank = []
    for rank in range(world):
        ld = loader(data, rank=rank, world_size=world, remainder=remainder, seed=3)
        ld.set_epoch(2)
        batches = epoch_ids(ld)
        assert len(batches) == len(ld)
        per_rank.append(batches)
    # same number of batches, and the same batch sizes, on every rank
    sizes = [[len(b) for b in batches] for batches in per_rank]
    assert all(s == sizes[0] for s in sizes)
    assert all(n == 20 for n in sizes[0][:-1]) and 0 < sizes[0][-1] <= 20
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    if remainder == "drop":
        assert all(c == 1 for c in seen.values())
        assert sum(seen.values()) == N_TRAIN - N_TRAIN % world
        assert N_TRAIN - len(seen) == N_TRAIN % world <= world - 1
    else:
        assert set(seen) == set(range(N_TRAIN))
        assert sum(seen.values()) == -(-N_TRAIN // world) * world
        assert sum(c - 1 for c in seen.values()) == (-N_TRAIN) % world


def test_each_rank_reads_a_contiguous_share_of_blocks(data):
    # A rank's rows come from whole blocks of the epoch's block order, about N/R of them.
    ld = loader(data, rank=1, world_size=4)
    plan = ld.plan(0)
    assert plan.rows == N_TRAIN // 4
    assert int((plan.segments[:, 2] - plan.segments[:, 1]).sum()) == N_TRAIN // 4
    assert ((plan.segments[:, 2] - plan.segments[:, 1]) <= 16).all()


def test_same_seed_same_order_new_epoch_new_order(data):
    a, b = loader(data, seed=7), loader(data, seed=7)
    first = epoch_ids(a)
    assert first == epoch_ids(b)
    assert first != epoch_ids(loader(data, seed=8))
    a.set_epoch(1)
    second = epoch_ids(a)
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, []))
    a.set_epoch(0)
    assert epoch_ids(a) == first  # the plan depends on (seed, epoch) only


def test_rows_are_mixed_within_buffers(data):
    flat = sum(epoch_ids(loader(data, seed=1)), [])
    # consecutive rows of one block would give differences of exactly 1
    assert np.mean(np.diff(flat) == 1) < 0.2


def test_dropped_rows_change_between_epochs(data):
    world = 4  # N_TRAIN % 4 == 3 rows dropped per epoch
    dropped = []
    for epoch in range(4):
        seen = set()
        for rank in range(world):
            ld = loader(data, rank=rank, world_size=world, seed=0)
            ld.set_epoch(epoch)
            seen.update(i for b in epoch_ids(ld) for i in b)
        dropped.append(frozenset(set(range(N_TRAIN)) - seen))
    assert all(len(d) == 3 for d in dropped)
    assert len(set(dropped)) > 1


@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize("stop_after", [0, 1, 2, 3, 12, 14, 15])
def test_resume_mid_epoch_continues_with_the_rows_left(data, prefetch, stop_after):
    # 48 rows per buffer, 20 per batch, 283 rows (15 batches) on this rank: stops fall before,
    # across and after buffer boundaries, and at the very end of the epoch.
    full = loader(data, world_size=2, rank=1, seed=5, prefetch=prefetch)
    full.set_epoch(3)
    expected = epoch_ids(full)
    assert stop_after <= len(expected)

    first = loader(data, world_size=2, rank=1, seed=5, prefetch=prefetch)
    first.set_epoch(3)
    it = iter(first)
    head = [next(it).x[:, 0].long().tolist() for _ in range(stop_after)]
    state = first.state_dict()
    it.close()
    assert state["epoch"] == 3 and state["batches_done"] == stop_after

    buffer = io.BytesIO()
    torch.save({"loader": state}, buffer)  # the trainer's checkpoint holds it
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)["loader"]

    resumed = loader(data, world_size=2, rank=1, seed=5, prefetch=prefetch)
    resumed.load_state_dict(restored)
    resumed.set_epoch(3)  # the trainer's epoch loop calls this again: the position stays
    tail = epoch_ids(resumed)
    assert head + tail == expected
    assert resumed.state_dict()["batches_done"] == len(expected)
    resumed.set_epoch(4)
    assert resumed.state_dict()["batches_done"] == 0


def test_resume_under_other_plan_settings(data):
    ld = loader(data, world_size=2, rank=0)
    it = iter(ld)
    for _ in range(6):  # of 15 batches
        next(it)
    state = ld.state_dict()
    it.close()
    other = loader(data, world_size=3, rank=0)  # 10 batches per epoch
    with pytest.raises(DataError, match="world_size 2 saved, 3 now"):
        other.load_state_dict(state, strict=True)
    with pytest.warns(UserWarning, match="resuming at batch 4 of 10"):
        other.load_state_dict(state)  # a requeued job on other ranks: the same fraction of the epoch
    assert other.state_dict()["batches_done"] == 4 and len(list(other)) == 6


def test_eval_split_contiguous_shares_all_rows(data):
    shares = []
    for rank in range(3):
        ld = loader(data, split="val", shuffle=False, rank=rank, world_size=3, batch_size=7)
        shares.append(sum(epoch_ids(ld), []))
    assert sum(shares, []) == list(range(53))  # in order, nothing dropped
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_standardize_from_meta_and_constant_feature(tmp_path):
    path = ids_dataset(tmp_path / "ds", train_shards=[40, 24], val_rows=10)
    meta = open_dataset(path).meta
    assert meta.std[2] == 0.0  # constant feature
    ld = ShardLoader(path, batch_size=64, shuffle=False, prefetch=0)
    b = next(iter(ld))
    ids = torch.arange(64, dtype=torch.float32)
    mean, std = torch.tensor(meta.mean[0], dtype=torch.float32), torch.tensor(meta.std[0], dtype=torch.float32)
    assert torch.allclose(b.x[:, 0], (ids - mean) / std, atol=1e-5)
    assert torch.equal(b.x[:, 2], torch.zeros(64))  # (5 - 5) / 1, not a division by zero


def test_batch_types_and_limit_rows(tmp_path):
    from hpctrain.data.synthetic import make_synthetic

    path = make_synthetic(tmp_path / "reg", rows=300, features=4, task="regression", targets=2, shards=2)
    ld = ShardLoader(path, batch_size=32, limit_rows=100, prefetch=2)
    batches = list(ld)
    assert isinstance(batches[0], Batch)
    assert batches[0].x.dtype == torch.float32 and batches[0].x.shape == (32, 4)
    assert batches[0].y.dtype == torch.float32 and batches[0].y.shape == (32, 2)
    assert batches[0].w is None
    assert sum(len(b.x) for b in batches) == 100 == ld.rows


def test_from_config(data):
    cfg = DataConfig(path=str(data), batch_size=11, block_rows=8, buffer_blocks=2, remainder="pad",
                     prefetch=0, standardize=False, limit_rows=500)
    train = ShardLoader.from_config(cfg, "train", rank=1, world_size=2, seed=4)
    assert (train.shuffle, train.batch_size, train.remainder, train.rows) == (True, 11, "pad", 500)
    val = ShardLoader.from_config(cfg, "val", rank=0, world_size=2, seed=4)
    assert val.shuffle is False and val.partition == "contiguous"
    assert train.meta.n_features == 3


def test_break_and_close_stop_the_prefetch_thread(data):
    ld = loader(data, prefetch=2)
    for _ in ld:
        break
    ld.close()
    deadline = time.time() + 5
    while any(t.name == "hpctrain-prefetch" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "hpctrain-prefetch" for t in threading.enumerate())


@pytest.mark.parametrize("prefetch", [0, 2])
def test_unreadable_shard_during_epoch_names_the_file(tmp_path, prefetch):
    path = ids_dataset(tmp_path / "ds")
    ld = loader(path, prefetch=prefetch, seed=2)
    victim = ld.shards[2].path
    with open(victim, "r+b") as f:  # truncated after the dataset was opened and checked
        f.truncate(1000)
    start = time.time()
    with pytest.raises(DataError, match=str(victim)):
        for _ in ld:
            pass
    assert time.time() - start < 10


def test_missing_shard_during_epoch_names_the_file(tmp_path):
    path = ids_dataset(tmp_path / "ds")
    ld = loader(path, prefetch=2)
    victim = ld.shards[0].path
    os.remove(victim)
    with pytest.raises(DataError, match=f"{victim}: shard file is missing"):
        list(ld)


def test_too_few_rows_for_the_ranks(tmp_path):
    path = ids_dataset(tmp_path / "ds", train_shards=[2], val_rows=1)
    with pytest.raises(DataError, match="expected at least one per rank"):
        loader(path, world_size=3, rank=0)


def test_a_batch_kept_by_the_caller_is_never_overwritten(data):
    # Buffers are reused once no batch refers to them; one still referenced must stay intact.
    ld = loader(data, prefetch=2, batch_size=8, block_rows=4, buffer_blocks=2)
    it = iter(ld)
    kept = next(it)
    copy = kept.x.clone()
    rest = [b.x[:, 0].clone() for b in it]
    assert torch.equal(kept.x, copy)
    assert len(rest) == len(ld) - 1
