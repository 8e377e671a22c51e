"""Shard checksums verified before training: hashed once, then a stamp while nothing changed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from hpctrain.data import integrity
from hpctrain.data.integrity import verify_dataset, verify_on_root
from hpctrain.data.synthetic import make_synthetic
from hpctrain.errors import DataError

ROOT = Path(__file__).resolve().parent.parent


def age(folder: Path, seconds: float = 3600) -> None:
    """Date every file of a dataset back, as for one converted earlier (not written just now)."""
    for path in folder.rglob("*"):
        if path.is_file():
            st = path.stat()
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def ds(tmp_path, cache):
    path = make_synthetic(tmp_path / "ds", rows=3000, features=5, task="binary", shards=3, seed=2)
    age(path)
    return path


def flip_byte(path: Path) -> None:
    """Change one byte of the features in place: same size, same inode, the header still valid;
    only the bytes (and the mtime) change."""
    import h5py

    with h5py.File(path, "r") as f:
        at = f["x"].id.get_chunk_info(0).byte_offset + 17
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def sha_of(ds: Path, file: str) -> str:
    meta = json.loads((ds / "meta.json").read_text())
    return next(s["sha256"] for split in meta["shards"].values() for s in split if s["file"] == file)


# ---------------------------------------------------------------------------- one process


def test_hashes_once_then_trusts_the_stamp(ds):
    logs = []
    assert verify_dataset(ds, log=logs.append) == "hashed"
    assert any("verified" in m and "sha256" in m for m in logs)
    assert (ds / integrity.STAMP).is_file()
    assert verify_dataset(ds, log=logs.append) == "stamp"


def test_a_changed_shard_is_a_data_error_naming_file_and_both_sums(ds):
    verify_dataset(ds)
    shard = ds / "train" / "part-00001.h5"
    expected = sha_of(ds, "train/part-00001.h5")
    size = shard.stat().st_size
    flip_byte(shard)
    assert shard.stat().st_size == size
    with pytest.raises(DataError) as err:
        verify_dataset(ds)
    msg = str(err.value)
    actual = integrity.file_sha256(shard)
    assert str(shard) in msg and expected in msg and actual in msg and actual != expected
    assert "hpctrain data inspect" in msg and "re-create" in msg.lower()


def test_a_rewrite_keeping_size_mtime_and_inode_needs_the_stamp_deleted(ds):
    # What a stamp cannot see (docs/data.md): bytes changed with size, mtime and inode kept.
    verify_dataset(ds)
    shard = ds / "val" / "part-00000.h5"
    st = shard.stat()
    flip_byte(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert integrity.stat_key(shard) == [st.st_size, st.st_mtime_ns, st.st_ino]
    assert verify_dataset(ds) == "stamp"
    # ... and deleting the stamp makes the next run hash again
    (ds / integrity.STAMP).unlink()
    with pytest.raises(DataError, match="sha256 mismatch"):
        verify_dataset(ds)


def test_a_failure_is_recorded_so_the_next_process_fails_without_hashing(ds, monkeypatch):
    flip_byte(ds / "test" / "part-00000.h5")
    age(ds)
    with pytest.raises(DataError) as first:
        verify_dataset(ds)
    monkeypatch.setattr(integrity, "hash_files", lambda *a, **k: pytest.fail("hashed again"))
    with pytest.raises(DataError) as second:
        verify_dataset(ds)
    assert str(first.value) == str(second.value)


def test_a_new_meta_json_invalidates_the_stamp(ds):
    verify_dataset(ds)
    meta = json.loads((ds / "meta.json").read_text())
    meta["shards"]["train"][0]["sha256"] = "0" * 64
    (ds / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"part-00000\.h5: sha256 mismatch: meta\.json expects 0{64}"):
        verify_dataset(ds)


def test_a_replaced_shard_invalidates_the_stamp(ds):
    # A copy with the old size and mtime (cp -p, rsync -t of another version) differs in inode.
    verify_dataset(ds)
    shard = ds / "train" / "part-00002.h5"
    st = shard.stat()
    copy = shard.with_name("copy.h5")
    copy.write_bytes(shard.read_bytes())
    flip_byte(copy)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(copy, shard)
    with pytest.raises(DataError, match="part-00002.h5: sha256 mismatch"):
        verify_dataset(ds)


def test_a_freshly_written_dataset_is_not_stamped_until_settled(tmp_path, cache):
    # A shard written in the same clock tick as the hash could change again unseen: no stamp yet.
    path = make_synthetic(tmp_path / "fresh", rows=500, features=3, task="binary", shards=2)
    assert verify_dataset(path) == "hashed"
    assert not (path / integrity.STAMP).exists()
    age(path)
    assert verify_dataset(path) == "hashed" and verify_dataset(path) == "stamp"


def test_read_only_dataset_keeps_its_stamp_in_the_user_cache(ds, cache, monkeypatch):
    real_open = os.open

    def no_write_beside(path, flags, *args):
        if Path(path).parent == ds and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(integrity.os, "open", no_write_beside)
    assert verify_dataset(ds) == "hashed"
    assert not (ds / integrity.STAMP).exists()
    assert len(list((cache / "verified").glob("*.json"))) == 1
    assert verify_dataset(ds) == "stamp"


def test_no_temp_or_partial_stamp_is_left(ds):
    verify_dataset(ds)
    assert sorted(p.name for p in ds.iterdir() if p.name.startswith(".")) == sorted([integrity.LOCK, integrity.STAMP])
    stamp = json.loads((ds / integrity.STAMP).read_text())
    assert stamp["problem"] is None and len(stamp["key"]["shards"]) == 9


# ---------------------------------------------------------------------------- several processes


def test_concurrent_verifiers_hash_once(ds, monkeypatch):
    # Threads stand in for array elements: each opens the lock file on its own, so flock
    # excludes them as it excludes processes. Hashing is slowed so that all of them overlap.
    hashed = []
    real = integrity.hash_files

    def slow_hash(*args, **kw):
        hashed.append(1)
        time.sleep(0.3)
        return real(*args, **kw)

    monkeypatch.setattr(integrity, "hash_files", slow_hash)
    results = []
    threads = [threading.Thread(target=lambda: results.append(verify_dataset(ds, log=lambda m: None)))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["hashed"] + ["stamp"] * 5 and len(hashed) == 1


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from hpctrain.data.integrity import verify_dataset
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.002)
    print(verify_dataset(sys.argv[1], log=lambda m: None))
""")


def test_array_elements_started_together_hash_once(ds, tmp_path):
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(ds), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(6)]
    time.sleep(1.0)       # let them all reach the start line
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    assert sorted(o[0].strip() for o in outs) == ["hashed"] + ["stamp"] * 5


# ---------------------------------------------------------------------------- ranks


class FakeBackend:
    def __init__(self, rank, size, told=None):
        self.rank, self.size, self.told, self.sent = rank, size, told, []

    @property
    def is_root(self):
        return self.rank == 0

    def broadcast_object(self, obj):
        self.sent.append(obj)
        return obj if self.rank == 0 else self.told


def test_only_rank_0_verifies_and_every_rank_raises_its_message(ds, monkeypatch):
    flip_byte(ds / "train" / "part-00000.h5")
    root = FakeBackend(0, 2)
    with pytest.raises(DataError, match="sha256 mismatch") as err:
        verify_on_root(ds, root)
    monkeypatch.setattr(integrity, "hash_files", lambda *a, **k: pytest.fail("rank 1 hashed"))
    monkeypatch.setattr(integrity, "verify_dataset", lambda *a, **k: pytest.fail("rank 1 verified"))
    with pytest.raises(DataError) as other:
        verify_on_root(ds, FakeBackend(1, 2, told=root.sent[0]))
    assert str(other.value) == str(err.value)
    verify_on_root(ds, FakeBackend(1, 2, told=None))      # rank 0 found nothing: the others go on


# ---------------------------------------------------------------------------- hpctrain run


def test_run_on_a_changed_shard_fails_naming_it(ds, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(textwrap.dedent(f"""
        name: integrity
        data: {{path: {ds}, task: binary, batch_size: 64}}
        model: {{hidden: [8]}}
        train: {{epochs: 1}}
    """))
    shard = ds / "train" / "part-00000.h5"
    flip_byte(shard)
    out = subprocess.run([sys.executable, "-m", "hpctrain", "run", str(cfg), "--sweep-dir", str(tmp_path / "sw")],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"{shard}: sha256 mismatch" in out.stderr and sha_of(ds, "train/part-00000.h5") in out.stderr
    state = json.loads(next((tmp_path / "sw" / "runs").glob("*/state.json")).read_text())
    assert state["status"] == "failed" and "sha256 mismatch" in state["message"]
