"""Checkpoint files: atomic writes, weights_only loading, corrupt and truncated files named, fallback."""
from __future__ import annotations

import pytest
import torch

from hpctrain.train.checkpoint import (CheckpointError, load_checkpoint, load_latest, save_checkpoint,
                                       serialize, write_checkpoint)


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
