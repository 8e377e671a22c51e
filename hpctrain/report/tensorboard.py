"""TensorBoard event files of scalar curves, written without TensorBoard installed.

An event file is a TFRecord stream: each record is
``uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)``
(little endian), and each data block is a serialized ``tensorflow.Event`` protobuf.
Only the few protobuf fields needed for scalars are encoded here:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }

``read_events`` decodes what ``write_events`` wrote (and checks every checksum).
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from ..fsutil import atomic_write_bytes

FILE_VERSION = b"brain.Event:2"
# A fixed name (no creation time or host) keeps repeated collects identical.
EVENT_FILE = "events.out.tfevents.0000000000.hpctrain"

_CRC_TABLE = None


def _crc_table() -> np.ndarray:
    global _CRC_TABLE
    if _CRC_TABLE is None:
        poly = 0x82F63B78  # Castagnoli, reflected
        table = np.zeros(256, dtype=np.uint32)
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ poly if c & 1 else c >> 1
            table[i] = c
        _CRC_TABLE = table
    return _CRC_TABLE


def crc32c_many(blocks: list[bytes]) -> list[int]:
    """CRC-32C of each block. Blocks of equal length advance together, one byte position per
    numpy step, so thousands of small records cost a few hundred array operations."""
    table = _crc_table()
    out = [0] * len(blocks)
    by_length: dict[int, list[int]] = {}
    for i, block in enumerate(blocks):
        by_length.setdefault(len(block), []).append(i)
    for length, members in by_length.items():
        data = np.frombuffer(b"".join(blocks[i] for i in members), dtype=np.uint8).reshape(len(members), length)
        crc = np.full(len(members), 0xFFFFFFFF, dtype=np.uint32)
        for pos in range(length):
            crc = table[(crc ^ data[:, pos]) & 0xFF] ^ (crc >> np.uint32(8))
        for i, value in zip(members, crc ^ np.uint32(0xFFFFFFFF)):
            out[i] = int(value)
    return out


def crc32c(data: bytes) -> int:
    return crc32c_many([data])[0]


def mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --------------------------------------------------------------------------- protobuf


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 as protobuf encodes it (two's complement for negatives)
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def scalar_value(tag: str, value: float) -> bytes:
    return _bytes_field(1, tag.encode("utf-8")) + bytes([2 << 3 | 5]) + struct.pack("<f", value)


def event(wall_time: float, step: int, *, summary: Optional[bytes] = None,
          file_version: Optional[bytes] = None) -> bytes:
    out = bytes([1 << 3 | 1]) + struct.pack("<d", wall_time) + bytes([2 << 3 | 0]) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version)
    if summary is not None:
        out += _bytes_field(5, summary)
    return out


def records(payloads: list[bytes]) -> bytes:
    """TFRecord framing of the payloads."""
    headers = [struct.pack("<Q", len(p)) for p in payloads]
    crcs = crc32c_many(headers + payloads)
    n = len(payloads)
    parts = []
    for i, payload in enumerate(payloads):
        parts += [headers[i], struct.pack("<I", mask(crcs[i])), payload, struct.pack("<I", mask(crcs[n + i]))]
    return b"".join(parts)


def scalar_events(steps: Iterable[int], wall_times: Iterable[float],
                  scalars: list[tuple[str, np.ndarray]]) -> bytes:
    """One event per step holding every finite scalar of that step, after the version event."""
    steps, wall_times = list(steps), list(wall_times)
    payloads = [event(wall_times[0] if wall_times else 0.0, 0, file_version=FILE_VERSION)]
    for i, (step, wall) in enumerate(zip(steps, wall_times)):
        values = b"".join(_bytes_field(1, scalar_value(tag, float(col[i])))
                          for tag, col in scalars if np.isfinite(col[i]))
        if values:
            payloads.append(event(wall, int(step), summary=values))
    return records(payloads)


def write_events(folder: str | Path, steps, wall_times, scalars: list[tuple[str, np.ndarray]]) -> Path:
    path = Path(folder) / EVENT_FILE
    atomic_write_bytes(path, scalar_events(steps, wall_times, scalars))
    return path


# --------------------------------------------------------------------------- reading back


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def parse_event(data: bytes) -> dict:
    out: dict = {"wall_time": 0.0, "step": 0, "scalars": {}}
    for number, _, value in _fields(data):
        if number == 1:
            out["wall_time"] = struct.unpack("<d", value)[0]
        elif number == 2:
            out["step"] = value
        elif number == 3:
            out["file_version"] = value.decode()
        elif number == 5:
            for _, _, item in _fields(value):
                tag, scalar = None, None
                for n, _, v in _fields(item):
                    if n == 1:
                        tag = v.decode("utf-8")
                    elif n == 2:
                        scalar = struct.unpack("<f", v)[0]
                out["scalars"][tag] = scalar
    return out


def read_events(path: str | Path) -> list[dict]:
    """Every event of a file; ValueError on a bad length or checksum."""
    data = Path(path).read_bytes()
    events, pos = [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        payload = data[pos + 12:pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        if mask(crc32c(header)) != header_crc or mask(crc32c(payload)) != payload_crc:
            raise ValueError(f"{path}: bad checksum in the record at byte {pos}")
        events.append(parse_event(payload))
        pos += 16 + length
    return events


# --------------------------------------------------------------------------- a sweep


def tag_for(column: str) -> str:
    """train_loss -> train/loss, so TensorBoard groups the splits; lr stays lr."""
    split, _, name = column.partition("_")
    return f"{split}/{name}" if split in ("train", "val") and name else column


def run_folder_names(runs, param_keys: list[str]) -> dict[str, str]:
    """run_id -> sub-folder named by its hyperparameters (``lr=0.001,hidden=64x64``); full
    dotted keys when short names clash, the run id when there is no grid or names repeat."""
    from .plots import value_label

    def name(run, short: bool) -> str:
        parts = [f"{k.split('.')[-1] if short else k}={value_label(run.params[k])}"
                 for k in param_keys if k in run.params]
        text = ",".join(parts)
        return "".join(ch if ch.isalnum() or ch in "=,.+-_" else "_" for ch in text)[:200]

    short_names = [k.split(".")[-1] for k in param_keys]
    short = len(set(short_names)) == len(short_names)
    names = {run.run_id: name(run, short) for run in runs}
    if not param_keys or len(set(names.values())) != len(names) or not all(names.values()):
        return {run.run_id: run.run_id for run in runs}
    return names


def write_sweep_events(data, folder: str | Path) -> list[Path]:
    """One sub-folder of event files per run that has curves; steps are epochs."""
    from .runs import read_timing

    folder = Path(folder)
    names = run_folder_names(data.runs, data.param_keys)
    written = []
    for run in data.runs:
        curves = run.curves
        if curves is None or not len(curves.epochs):
            continue
        scalars = [(tag_for(c), curves.values[:, j]) for j, c in enumerate(curves.columns) if c != "step"]
        written.append(write_events(folder / names[run.run_id], curves.epochs.tolist(),
                                    _wall_times(run, curves.epochs, read_timing), scalars))
    return written


def _wall_times(run, epochs: np.ndarray, read_timing) -> list[float]:
    """started_at + elapsed_s of timing.csv when both are known; else the epoch number, which
    keeps TensorBoard's relative time axis meaningful and the files reproducible."""
    started = run.state.started_at if run.state is not None else None
    timing = read_timing(run.run_dir) if isinstance(started, (int, float)) else None
    if timing is None:
        return [float(e) for e in epochs]
    elapsed = dict(zip(timing[0].tolist(), timing[1].tolist()))
    if not all(e in elapsed and np.isfinite(elapsed[e]) for e in epochs.tolist()):
        return [float(e) for e in epochs]
    return [float(started) + elapsed[e] for e in epochs.tolist()]
