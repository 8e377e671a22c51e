"""ShardLoader on real HDF5 shards: the global order, shuffling, resume, prefetch, errors."""
from __future__ import annotations

import io
import os
import threading
import time
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from hpctrain.config import DataConfig
from hpctrain.data import loader as loader_module
from hpctrain.data.loader import ORDER_VERSION, Batch, ShardLoader
from hpctrain.data.shards import DatasetWriter, Meta, open_dataset
from hpctrain.errors import ConfigError, DataError

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


@pytest.fixture(autouse=True, params=["files", "resident"])
def reading(request, monkeypatch):
    """Every test twice: epochs read from the files (prefetch threads), and from the split kept in memory."""
    monkeypatch.setattr(loader_module, "RESIDENT_BYTES", -1 if request.param == "files" else 1 << 40)
    return request.param


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ids_dataset(tmp_path_factory.mktemp("ids") / "ds")


def loader(path, **kw):
    args = dict(batch_size=20, block_rows=16, buffer_blocks=8, standardize=False, prefetch=0)
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


def rank_epochs(path, world, epoch=2, **kw):
    """Every rank's batches of one epoch (row ids), by rank."""
    per_rank = []
    for rank in range(world):
        ld = loader(path, rank=rank, world_size=world, **kw)
        ld.set_epoch(epoch)
        per_rank.append(epoch_ids(ld))
        assert len(per_rank[-1]) == len(ld)
    return per_rank


def global_batches(per_rank):
    """Global batch k: the ranks' batch k side by side, in rank order."""
    return [sum((batches[k] for batches in per_rank), []) for k in range(len(per_rank[0]))]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_every_train_row_once_per_epoch_across_ranks(data, world, remainder):
    streams = 12
    per_rank = rank_epochs(data, world, remainder=remainder, seed=3, streams=streams)
    # same number of batches, and the same batch sizes, on every rank
    sizes = [[len(b) for b in batches] for batches in per_rank]
    assert all(s == sizes[0] for s in sizes)
    assert all(n == 20 for n in sizes[0][:-1]) and 0 < sizes[0][-1] <= 20
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    if remainder == "drop":  # fewer than `streams` rows left out
        assert all(c == 1 for c in seen.values())
        assert 0 <= N_TRAIN - len(seen) < streams
    else:  # fewer than `streams` rows read twice
        assert set(seen) == set(range(N_TRAIN))
        assert 0 <= sum(c - 1 for c in seen.values()) < streams


@pytest.mark.parametrize("remainder", ["drop", "pad"])
@pytest.mark.parametrize("global_batch", [40, 44, 64])
def test_global_batches_are_the_same_for_every_world_size(data, remainder, global_batch):
    # 8 streams do not divide 44: streams then give 5 or 6 rows to each global batch
    reference = None
    for world in (1, 2, 4):
        per_rank = rank_epochs(data, world, batch_size=global_batch // world, remainder=remainder, seed=3,
                               streams=8, prefetch=world % 2 * 2)
        batches = global_batches(per_rank)
        if reference is None:
            reference = batches
            assert len({i for b in batches for i in b}) > N_TRAIN - 8
        assert batches == reference, world  # the same rows, in the same order


def test_eight_ranks_serve_the_same_global_batches(data):
    one = global_batches(rank_epochs(data, 1, batch_size=64, seed=1))
    eight = global_batches(rank_epochs(data, 8, batch_size=8, seed=1))
    assert one == eight
    assert [len(b) for b in one] == [64] * 8 + [48]  # 567 - 512 = 55 rows left: 48, a multiple of 8 streams


def test_each_rank_reads_only_its_streams(data):
    # Rank r of 4 reads streams 2r, 2r+1 of 8: contiguous runs of the block sequence, pieces of blocks.
    plans = [loader(data, rank=r, world_size=4, batch_size=10).plan(0) for r in range(4)]
    assert [list(p.streams) for p in plans] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    rows = []
    for plan in plans:
        segments = np.concatenate([plan.round(j).segments for j in range(plan.rounds)])
        assert ((segments[:, 2] - segments[:, 1]) <= 16).all()
        rows += [(s, i) for s, a, b in segments.tolist() for i in range(a, b)]
    assert len(rows) == len(set(rows)) == N_TRAIN // 8 * 8  # disjoint, all but fewer than 8 rows


def test_world_size_must_divide_the_streams(data):
    with pytest.raises(ConfigError, match=r"data.streams: 8 streams cannot be shared by 3 ranks.* such as 24"):
        loader(data, rank=0, world_size=3)
    assert len(loader(data, rank=2, world_size=3, streams=6)) > 0


def test_shuffle_mixes_more_blocks_per_batch_than_one_buffer(tmp_path):
    # Sorted rows (the id is the position in the file): a batch's rows should come from many
    # places of the dataset. One shuffle buffer of buffer_blocks blocks, the former design,
    # gave at most buffer_blocks + 1 source blocks per batch.
    path = ids_dataset(tmp_path / "ds", train_shards=[4000] * 4, val_rows=0)
    ld = ShardLoader(path, batch_size=256, block_rows=256, buffer_blocks=8, standardize=False, prefetch=0)
    sources = []
    for epoch in range(3):
        ld.set_epoch(epoch)
        sources += [len(np.unique(ids // 4000 * 100 + ids % 4000 // 256)) for ids in map(np.array, epoch_ids(ld))]
    assert np.mean(sources) >= 8 + 1


def test_same_seed_same_order_new_epoch_new_order(data):
    a, b = loader(data, seed=7), loader(data, seed=7)
    first = epoch_ids(a)
    assert first == epoch_ids(b)
    assert first != epoch_ids(loader(data, seed=8))
    a.set_epoch(1)
    second = epoch_ids(a)
    assert first != second
    assert len(set(sum(first, [])) ^ set(sum(second, []))) < 2 * 8  # only the few dropped rows differ
    a.set_epoch(0)
    assert epoch_ids(a) == first  # the plan depends on (seed, epoch) only


def test_rows_are_mixed_within_buffers(data):
    flat = sum(epoch_ids(loader(data, seed=1)), [])
    # consecutive rows of one block would give differences of exactly 1
    assert np.mean(np.diff(flat) == 1) < 0.2


def test_dropped_rows_change_between_epochs(data):
    # 567 rows, global batch 80: 7 full batches, the 7 rows left are fewer than the 8 streams
    dropped = []
    for epoch in range(4):
        seen = {i for batches in rank_epochs(data, 4, epoch=epoch, seed=0) for b in batches for i in b}
        dropped.append(frozenset(set(range(N_TRAIN)) - seen))
    assert all(len(d) == 7 for d in dropped)
    assert len(set(dropped)) > 1


@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize("stop_after", [0, 1, 2, 3, 12, 13, 14])
def test_resume_mid_epoch_continues_with_the_rows_left(data, prefetch, stop_after):
    # Rounds of 3 global batches of 40 rows, 14 batches of 20 rows on this rank: stops fall
    # before, inside and at the end of rounds, and at the very end of the epoch.
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


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("saved_world, world", [(2, 1), (1, 4), (4, 2), (8, 2)])
def test_resume_on_another_world_size_continues_the_global_batches(data, saved_world, world, prefetch):
    expected = global_batches(rank_epochs(data, 1, epoch=1, batch_size=40, seed=2))
    first = loader(data, world_size=saved_world, rank=0, batch_size=40 // saved_world if saved_world < 8 else 5,
                   seed=2)
    first.set_epoch(1)
    it = iter(first)
    for _ in range(4):  # of 14 global batches, inside the second round of 3
        next(it)
    state = first.state_dict()
    it.close()
    tails = []
    for rank in range(world):
        ld = loader(data, world_size=world, rank=rank, batch_size=40 // world, seed=2, prefetch=prefetch)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an exact continuation, no fallback
            ld.load_state_dict(state, strict=True)
        ld.set_epoch(1)
        tails.append(epoch_ids(ld))
    assert global_batches(tails) == expected[4:]


def test_resume_under_other_order_settings(data):
    ld = loader(data, world_size=2, rank=0)
    it = iter(ld)
    for _ in range(6):  # of 14 batches
        next(it)
    state = ld.state_dict()
    it.close()
    other = loader(data, world_size=2, rank=0, batch_size=30)  # global batch 60: 10 batches per epoch
    with pytest.raises(DataError, match="global_batch 40 saved, 60 now"):
        other.load_state_dict(state, strict=True)
    with pytest.warns(UserWarning, match="resuming at batch 4 of 10"):
        other.load_state_dict(state)  # the same fraction of the epoch
    assert other.state_dict()["batches_done"] == 4 and len(list(other)) == 6


def test_a_position_saved_under_the_numpy_drawn_order_is_not_continued_as_exact(data):
    """States saved before the shuffles came from torch generators carry no order_version:
    their rows after the position would differ, so an exact resume is refused by name."""
    ld = loader(data, world_size=2, rank=0)
    it = iter(ld)
    for _ in range(6):
        next(it)
    state = ld.state_dict()
    it.close()
    assert state["order_version"] == ORDER_VERSION
    del state["order_version"]
    other = loader(data, world_size=2, rank=0)
    with pytest.raises(DataError, match=f"order_version None saved, {ORDER_VERSION} now"):
        other.load_state_dict(state, strict=True)
    with pytest.warns(UserWarning, match="resuming at batch 6 of 14"):
        other.load_state_dict(state)


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
    assert ld.rows == 100 and sum(len(b.x) for b in batches) == 96  # the last batch: a multiple of 8 streams


def test_from_config(data):
    cfg = DataConfig(path=str(data), batch_size=11, block_rows=8, buffer_blocks=2, remainder="pad",
                     prefetch=0, standardize=False, limit_rows=500, streams=4)
    train = ShardLoader.from_config(cfg, "train", rank=1, world_size=2, seed=4)
    assert (train.shuffle, train.batch_size, train.remainder, train.rows) == (True, 11, "pad", 500)
    assert (train.streams, train.global_batch) == (4, 22)
    fixed = DataConfig(path=str(data), global_batch_size=24, streams=4)
    assert ShardLoader.from_config(fixed, "train", rank=3, world_size=4, seed=4).batch_size == 6
    with pytest.raises(ConfigError, match="global_batch_size: 24 is not a multiple of the world size 5"):
        ShardLoader.from_config(fixed, "train", rank=0, world_size=5, seed=4)
    val = ShardLoader.from_config(cfg, "val", rank=0, world_size=2, seed=4)
    assert val.shuffle is False and val.partition == "contiguous"
    # eval batches are larger than train batches where rows are small: this val split is one batch
    row_bytes = 4 * (3 + 2 + 1)  # 3 features, an int64 label, a weight
    assert val.batch_size == min(loader_module.EVAL_BATCH_ROWS, loader_module.EVAL_BATCH_BYTES // row_bytes)
    assert len(val) == 1 and len(next(iter(val)).x) == 53 // 2  # rank 0's share of 53 rows
    wide = DataConfig(path=str(data), batch_size=10_000)
    assert ShardLoader.from_config(wide, "val", rank=0, world_size=1, seed=0).batch_size == 10_000
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
@pytest.mark.parametrize("threads", [1, 4])
def test_unreadable_shard_during_epoch_names_the_file(tmp_path, prefetch, threads, monkeypatch):
    monkeypatch.setattr(loader_module._Pieces, "MIN_PIECE_BYTES", 1)  # these shards are tiny
    path = ids_dataset(tmp_path / "ds")
    ld = loader(path, prefetch=prefetch, seed=2, threads=threads)
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
    path = ids_dataset(tmp_path / "ds", train_shards=[7], val_rows=1)
    with pytest.raises(DataError, match=r"has 7 rows; expected at least one per stream \(data.streams = 8\)"):
        loader(path, world_size=2, rank=0)


def test_a_batch_kept_by_the_caller_is_never_overwritten(data):
    # Buffers are reused once no batch refers to them; one still referenced must stay intact.
    ld = loader(data, prefetch=2, batch_size=8, block_rows=4, buffer_blocks=2)
    it = iter(ld)
    kept = next(it)
    copy = kept.x.clone()
    rest = [b.x[:, 0].clone() for b in it]
    assert torch.equal(kept.x, copy)
    assert len(rest) == len(ld) - 1


@pytest.mark.parametrize("holder", ["targets only", "autograd graph only"])
def test_a_buffer_is_not_refilled_while_anything_still_refers_to_its_rows(data, holder):
    # The caller keeps only y, or only the graph that saved x for backward (no Python
    # reference to x at all): the rows must stay as they were until that reference is gone.
    ld = loader(data, prefetch=2, batch_size=8, block_rows=4, buffer_blocks=2, limit_rows=None)
    it = iter(ld)
    first = next(it)
    if holder == "targets only":
        kept, want = first.y, first.y.clone()
    else:
        weight = torch.ones(first.x.shape[1], requires_grad=True)
        kept = (first.x * weight).sum()  # saves x for the gradient of weight
        want = first.x.sum(dim=0).clone()
    del first
    for _ in it:  # many rounds later: every other buffer has been refilled
        pass
    if holder == "targets only":
        assert torch.equal(kept, want)
    else:
        kept.backward()
        assert torch.equal(weight.grad, want)


def test_a_small_split_is_read_from_its_files_once(data, reading, monkeypatch):
    opened = []
    real = loader_module.ShardReader.read
    monkeypatch.setattr(loader_module.ShardReader, "read", lambda self, *a: opened.append(a[0]) or real(self, *a))
    loader = ShardLoader(data, "train", batch_size=16, prefetch=2)
    epochs = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        epochs.append(torch.cat([b.x[:, 0] for b in loader]))
    reads_per_epoch = len(opened) / 3
    assert loader.resident == (reading == "resident")
    if reading == "resident":
        assert sorted(opened) == list(range(len(TRAIN_SHARDS)))  # each shard once, whole
    else:
        assert reads_per_epoch >= len(TRAIN_SHARDS)
    assert not torch.equal(epochs[0], epochs[1])


def test_resident_and_file_reading_give_the_same_batches(data, monkeypatch):
    def epoch_rows(limit):
        monkeypatch.setattr(loader_module, "RESIDENT_BYTES", limit)
        loader = ShardLoader(data, "train", batch_size=24, world_size=2, rank=1, seed=3, prefetch=2)
        loader.set_epoch(5)
        return [(b.x, b.y, b.w) for b in loader]
    files, resident = epoch_rows(-1), epoch_rows(1 << 40)
    assert len(files) == len(resident) > 0
    assert all(torch.equal(a, b) for fb, rb in zip(files, resident) for a, b in zip(fb, rb))


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("threads", [2, 5])
def test_reading_in_pieces_on_several_threads_gives_the_same_batches(data, monkeypatch, prefetch, shuffle, threads):
    monkeypatch.setattr(loader_module._Pieces, "MIN_PIECE_BYTES", 1)  # these shards are tiny: cut them anyway

    def batches(n_threads, resume_at=None):
        ld = ShardLoader(data, batch_size=24, world_size=2, rank=1, seed=3, prefetch=prefetch, shuffle=shuffle,
                         block_rows=16, buffer_blocks=4, standardize=True, threads=n_threads)
        if resume_at is not None:
            first = ShardLoader(data, batch_size=24, world_size=2, rank=1, seed=3, prefetch=prefetch,
                                shuffle=shuffle, block_rows=16, buffer_blocks=4, threads=n_threads)
            first.set_epoch(4)
            it = iter(first)
            for _ in range(resume_at):
                next(it)
            ld.load_state_dict(first.state_dict())
            it.close()
        ld.set_epoch(4)
        return [(b.x.clone(), b.y.clone(), b.w.clone()) for b in ld]

    workers = {"read": set(), "gather": set()}  # names of the threads that did each stage's work

    def watched(stage, method):
        def call(*args, **kw):
            workers[stage].add(threading.current_thread().name.split("_")[0])
            return method(*args, **kw)
        return call
    for cls in (loader_module.ShardReader, loader_module.ResidentReader):
        monkeypatch.setattr(cls, "read", watched("read", cls.read))
    monkeypatch.setattr(loader_module._BatchProducer, "_take",
                        staticmethod(watched("gather", loader_module._BatchProducer._take)))
    one = batches(1)
    assert "hpctrain-pieces" not in workers["read"] | workers["gather"]
    many = batches(threads)
    assert "hpctrain-pieces" in workers["read"]
    assert "hpctrain-pieces" in workers["gather"]  # rank 1 of 2 serves 4 streams: batches are gathered
    assert len(one) == len(many) > 0
    assert all(torch.equal(a, b) for ob, mb in zip(one, many) for a, b in zip(ob, mb))
    resumed = batches(threads, resume_at=3)
    assert all(torch.equal(a, b) for ob, rb in zip(one[3:], resumed) for a, b in zip(ob, rb))
    assert len(resumed) == len(one) - 3


def test_loader_threads_default_to_one_on_the_cpu_and_more_for_a_gpu(data):
    cpus = len(os.sched_getaffinity(0))
    assert ShardLoader(data).threads == 1
    assert loader_module.auto_threads(torch.device("cuda")) == min(loader_module.AUTO_GPU_THREADS, cpus)
    assert ShardLoader(data, threads=3).threads == 3
    cfg = DataConfig(path=str(data), loader_threads=2)
    assert ShardLoader.from_config(cfg, "train", rank=0, world_size=1, seed=0).threads == 2
    with pytest.raises(ValueError, match="threads"):
        ShardLoader(data, threads=-1)
