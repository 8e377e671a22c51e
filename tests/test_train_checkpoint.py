"""Checkpoint files: atomic writes, weights_only loading, corrupt and truncated files named, fallback,
rotation that never demotes a good file, temp files of dead writers removed."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from hpctrain.fsutil import atomic_write, atomic_write_bytes, temp_writer
from hpctrain.tempfiles import remove_stale_temp_files
from hpctrain.train.checkpoint import (BEST, LAST, PREVIOUS, CheckpointError, load_checkpoint, load_latest,
                                       save_checkpoint, serialize, write_checkpoint)

ROOT = Path(__file__).resolve().parent.parent


def payload(value=1.0):
    return {"model": {"w": torch.full((64, 32), value)}, "epoch": 2, "step": 10, "rng": [{"python": [1, 2, 3],
            "gauss": None}], "config": {"optim": {"lr": 0.1}}, "metrics": [{"epoch": 1, "val_loss": 0.5}]}


def test_round_trip_with_plain_torch_load(tmp_path):
    save_checkpoint(tmp_path / "last.pt", payload())
    raw = torch.load(tmp_path / "last.pt", weights_only=True)
    assert raw["format"] == "hpctrain-checkpoint-1" and len(raw["digest"]) == 64
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(loaded["model"]["w"], payload()["model"]["w"]) and loaded["metrics"][0]["val_loss"] == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]   # no temp file left behind


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "last.pt"
    data = serialize(payload())
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"last\.pt: not a readable checkpoint \(truncated or corrupt\)"):
        load_checkpoint(path)


def test_altered_tensor_bytes_fail_the_digest(tmp_path):
    path = tmp_path / "best.pt"
    data = bytearray(serialize(payload(1.0)))
    marker = torch.full((64, 32), 1.0).numpy().tobytes()[:64]
    at = bytes(data).find(marker)
    assert at > 0
    data[at + 2] ^= 0x40                                           # one flipped bit in the weights
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"best\.pt: .*digest"):
        load_checkpoint(path)


def test_other_files_are_rejected_by_name(tmp_path):
    torch.save({"model": {}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"x\.pt: not an hpctrain checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_keep_previous_and_fallback_order(tmp_path):
    write_checkpoint(tmp_path / "last.pt", serialize(payload(1.0)), keep_previous=True)
    write_checkpoint(tmp_path / "last.pt", serialize(payload(2.0)), keep_previous=True)
    assert load_checkpoint(tmp_path / "previous.pt")["model"]["w"][0, 0] == 1.0
    (tmp_path / "last.pt").write_bytes(b"garbage")
    messages = []
    name, loaded, problems = load_latest(tmp_path, log=messages.append)
    assert name == "previous.pt" and loaded["model"]["w"][0, 0] == 1.0
    assert len(problems) == 1 and "last.pt" in problems[0] and "last.pt" in messages[0]
    (tmp_path / "previous.pt").unlink()
    assert load_latest(tmp_path, log=messages.append)[:2] == (None, None)


# ---------------------------------------------------------------------------- rotation


def test_a_truncated_last_pt_never_becomes_previous(tmp_path):
    # Resume from previous.pt past a truncated last.pt, then save: the good previous.pt stays.
    write_checkpoint(tmp_path / "last.pt", serialize(payload(1.0)), keep_previous=True)
    write_checkpoint(tmp_path / "last.pt", serialize(payload(2.0)), keep_previous=True)
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    assert load_latest(tmp_path, log=lambda m: None)[0] == "previous.pt"
    messages = []
    write_checkpoint(last, serialize(payload(3.0)), keep_previous=True, log=messages.append)
    assert load_checkpoint(tmp_path / "previous.pt")["model"]["w"][0, 0] == 1.0
    assert load_checkpoint(last)["model"]["w"][0, 0] == 3.0
    assert (tmp_path / "last.pt.corrupt").stat().st_size == 1000
    assert len(messages) == 1 and "last.pt" in messages[0] and "last.pt.corrupt" in messages[0]
    write_checkpoint(last, serialize(payload(4.0)), keep_previous=True, log=messages.append)
    assert load_checkpoint(tmp_path / "previous.pt")["model"]["w"][0, 0] == 3.0   # a good one rotates


def test_an_altered_last_pt_is_set_aside_not_rotated(tmp_path):
    write_checkpoint(tmp_path / "last.pt", serialize(payload(1.0)), keep_previous=True)
    write_checkpoint(tmp_path / "last.pt", serialize(payload(2.0)), keep_previous=True)
    data = bytearray((tmp_path / "last.pt").read_bytes())
    at = bytes(data).find(torch.full((64, 32), 2.0).numpy().tobytes()[:64])
    data[at + 2] ^= 0x40                                   # same size, digest no longer matches
    (tmp_path / "last.pt").write_bytes(bytes(data))
    write_checkpoint(tmp_path / "last.pt", serialize(payload(3.0)), keep_previous=True, log=lambda m: None)
    assert load_checkpoint(tmp_path / "previous.pt")["model"]["w"][0, 0] == 1.0
    assert (tmp_path / "last.pt.corrupt").exists()


def test_trainer_keeps_the_good_previous_after_resuming_past_a_truncated_last(tmp_path):
    from test_train_loop import StopAfterSteps, make_cfg, make_trainer

    cfg = make_cfg(train={"epochs": 3, "checkpoint_min_interval_s": 0})  # last.pt at every epoch's end
    flag = StopAfterSteps(14)
    trainer, _ = make_trainer(cfg, tmp_path, stop_flag=flag)
    flag.trainer = trainer
    trainer.fit()                                  # last.pt at step 14, previous.pt at step 12
    folder = tmp_path / "checkpoints"
    last = folder / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    trainer, logs = make_trainer(cfg, tmp_path)
    result = trainer.fit()
    assert result.status == "done" and result.resumed_from == "previous.pt"
    assert load_checkpoint(folder / "previous.pt")["step"] == 12
    assert load_checkpoint(last)["step"] == 18 and (folder / "last.pt.corrupt").exists()


# ---------------------------------------------------------------------------- stale temp files


WRITER = textwrap.dedent("""
    import sys, time
    from hpctrain.fsutil import atomic_write

    def write(f):
        f.write(b"x" * 150_000)
        f.flush()
        print("writing", flush=True)
        time.sleep(600)

    atomic_write(sys.argv[1], write)
""")


def start_writer(path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def temps(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_temp_files_of_writers_killed_mid_write_are_removed_at_the_next_start(tmp_path):
    from test_train_loop import make_cfg, make_trainer

    folder = tmp_path / "checkpoints"
    for _ in range(3):                                  # kill -9 during a checkpoint write, three times
        proc = start_writer(folder / "last.pt")
        proc.kill()
        proc.wait()
    live = start_writer(folder / "best.pt")             # a writer still at work (another process)
    try:
        assert len(temps(folder)) == 4
        trainer, logs = make_trainer(make_cfg(train={"epochs": 1}), tmp_path)
        assert trainer.fit().status == "done"
        left = temps(folder)
        assert len(left) == 1 and left[0].startswith(f".best.pt.{live.pid}@")
        assert any("removed 3 temp files" in m for m in logs)
    finally:
        live.kill()
        live.wait()


def test_stale_judgement_by_pid_host_and_age(tmp_path):
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - 2 * 3600
    files = {
        f".last.pt.{dead.pid}@{host}.abc123_x.tmp": None,          # dead writer here: stale
        f".last.pt.{os.getpid()}@{host}.k2j3h4g5.tmp": old,        # live writer, however old: kept
        ".best.pt.4242@other-node.cluster.q1w2e3r4.tmp": None,    # another host, fresh: kept
        ".best.pt.4243@other-node.cluster.z9x8c7v6.tmp": old,     # another host, untouched an hour: stale
        ".last.pt.a1b2c3d4.tmp": None,                             # no writer in the name, fresh: kept
        ".last.pt.e5f6g7h8.tmp": old,                              # no writer in the name, old: stale
        ".keep.me": old, "last.pt": old,                           # not temp files
    }
    for name, mtime in files.items():
        (tmp_path / name).write_bytes(b"x")
        if mtime is not None:
            os.utime(tmp_path / name, (mtime, mtime))
    removed = remove_stale_temp_files(tmp_path, log=lambda m: None)
    assert sorted(p.name for p in removed) == sorted([
        f".last.pt.{dead.pid}@{host}.abc123_x.tmp", ".best.pt.4243@other-node.cluster.z9x8c7v6.tmp",
        ".last.pt.e5f6g7h8.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(files) - {p.name for p in removed})


def test_temp_names_carry_pid_and_host(tmp_path):
    names = []
    atomic_write_bytes(tmp_path / "f.json", b"{}")
    atomic_write(tmp_path / "g.pt", lambda f: names.extend(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"))
    assert len(names) == 1 and temp_writer(names[0]) == (os.getpid(), socket.gethostname())
    assert temp_writer(".last.pt.a1b2c3d4.tmp") is None and temp_writer("last.pt") is None


def _manager(run_dir):
    from types import SimpleNamespace

    from hpctrain.train.checkpoint import CheckpointManager

    every = SimpleNamespace(checkpoint_every_s=300.0, checkpoint_every_epochs=1, checkpoint_every_steps=None,
                            checkpoint_min_interval_s=60.0)
    return CheckpointManager(run_dir, SimpleNamespace(is_root=True, size=1), every, log=lambda m: None)


def test_background_writes_land_in_order_and_wait_makes_them_visible(tmp_path):
    manager = _manager(tmp_path)
    for i in range(3):
        manager.save(lambda i=i: {"model": {"w": torch.full((2,), float(i))}}, last=True, best=i == 1)
    manager.wait()
    folder = tmp_path / "checkpoints"
    assert load_checkpoint(folder / LAST)["model"]["w"].tolist() == [2.0, 2.0]
    assert load_checkpoint(folder / PREVIOUS)["model"]["w"].tolist() == [1.0, 1.0]
    assert load_checkpoint(folder / BEST)["model"]["w"].tolist() == [1.0, 1.0]
    assert manager.best_weights()["w"].tolist() == [1.0, 1.0]


def test_a_failed_background_write_is_raised_by_wait(tmp_path):
    (tmp_path / "blocker").write_text("a file where the run folder should be")
    manager = _manager(tmp_path / "blocker")
    manager.save(lambda: {"model": {}}, last=True)
    with pytest.raises(OSError):
        manager.wait()
    manager.wait()  # reported once
