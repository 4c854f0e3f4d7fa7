"""The TensorBoard event writer: CRCs, the byte layout, and a write/read round trip."""

import math
import os
import re
import struct

import pytest

from gptjax import tensorboard
from gptjax.tensorboard import SummaryWriter, crc32c, masked_crc32c, read_scalars


def test_crc32c_check_values():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 (iSCSI) test vector: 32 zero bytes


def test_file_layout(tmp_path):
    with SummaryWriter(str(tmp_path)) as tb:
        tb.scalars(7, {"loss": 1.5})
    (name,) = os.listdir(tmp_path)
    assert re.fullmatch(r"events\.out\.tfevents\.\d{10}\..+", name)
    blob = (tmp_path / name).read_bytes()
    # First record: its length, the masked CRC of the length, an Event with wall_time and file_version.
    (length,) = struct.unpack("<Q", blob[:8])
    assert struct.unpack("<I", blob[8:12])[0] == masked_crc32c(blob[:8])
    data = blob[12:12 + length]
    assert struct.unpack("<I", blob[12 + length:16 + length])[0] == masked_crc32c(data)
    assert data[0] == 0x09 and data[9:] == b"\x1a\x0dbrain.Event:2"  # wall_time (field 1, double), then field 3
    # Second record: wall_time, step=7 as a varint, summary {value {tag "loss", simple_value 1.5}}.
    second = blob[16 + length + 12:-4]
    assert second[9:] == (b"\x10\x07" + b"\x2a\x0d" + b"\x0a\x0b" + b"\x0a\x04loss" + b"\x15"
                          + struct.pack("<f", 1.5))


def test_round_trip(tmp_path):
    logged = {0: {"train/loss": 6.25, "train/lr": 0.0}, 1: {"train/loss": 5.5, "lr": 3e-4, "skip": None},
              2**40: {"eval/loss": -1.0, "tag with spaces/ünïcode": 1e30}, -3: {"big": 1e40, "nan": math.nan}}
    with SummaryWriter(str(tmp_path / "tb")) as tb:
        for step, values in logged.items():
            tb.scalars(step, values)
    got = read_scalars(str(tmp_path / "tb"))
    want = [(step, tag, struct.unpack("<f", struct.pack("<f", value))[0])
            for step, values in logged.items() for tag, value in values.items()
            if value is not None and tag not in ("big", "nan")]
    assert got[:len(want)] == want
    (big, nan) = got[len(want):]
    assert big == (-3, "big", math.inf)  # beyond float32: infinite rather than an error
    assert nan[:2] == (-3, "nan") and math.isnan(nan[2])


def test_flush_makes_records_readable_before_close(tmp_path):
    tb = SummaryWriter(str(tmp_path))
    tb.scalars(1, {"a": 2.0})
    tb.flush()
    assert read_scalars(tb.path) == [(1, "a", 2.0)]
    tb.scalars(2, {"a": 3.0})
    tb.close()
    assert read_scalars(tb.path) == [(1, "a", 2.0), (2, "a", 3.0)]


def test_writers_in_the_same_second_get_their_own_files(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorboard.time, "time", lambda: 1700000000.0)
    first, second = SummaryWriter(str(tmp_path)), SummaryWriter(str(tmp_path))
    first.scalars(1, {"x": 1.0})
    second.scalars(1, {"y": 2.0})
    first.close()
    second.close()
    assert first.path != second.path
    assert sorted(read_scalars(str(tmp_path))) == [(1, "x", 1.0), (1, "y", 2.0)]


@pytest.mark.parametrize("where", ["length", "data", "data crc", "truncated"])
def test_corruption_is_detected(tmp_path, where):
    with SummaryWriter(str(tmp_path)) as tb:
        tb.scalars(1, {"loss": 1.0})
    blob = bytearray(open(tb.path, "rb").read())
    first_len = struct.unpack("<Q", blob[:8])[0] + 16
    if where == "truncated":
        blob = blob[:-3]
    else:
        offset = {"length": first_len + 1, "data": first_len + 20, "data crc": len(blob) - 1}[where]
        blob[offset] ^= 0x01
    open(tb.path, "wb").write(bytes(blob))
    with pytest.raises(ValueError, match="corrupt|cut off"):
        read_scalars(tb.path)
