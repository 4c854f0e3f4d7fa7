"""TensorBoard scalars without TensorFlow: an event file writer and reader in plain Python.

    with SummaryWriter("runs/x/tb") as tb:
        tb.scalars(step, {"train/loss": 2.31, "train/lr": 3e-4})
    read_scalars("runs/x/tb")  # [(step, "train/loss", 2.31...), (step, "train/lr", 0.0003...)]

An event file is a sequence of TFRecords, each framing one serialized `Event` protobuf:
    uint64 length | uint32 masked crc32c(length) | data | uint32 masked crc32c(data)
(all little-endian). The first event carries file_version "brain.Event:2"; every later one a
wall time, a step and a Summary of {tag, simple_value} pairs. The few protobuf fields needed are
encoded by hand, so neither tensorflow nor tensorboard is needed to write or read them.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time

# --- crc32c (Castagnoli), reflected polynomial 0x82F63B78; a table is fast enough for one call per record.
_CRC_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord stores the CRC rotated and offset, so a CRC of data holding CRCs stays well mixed."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- protobuf wire format: a field is varint(number << 3 | wire type) followed by its value.
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # int64 fields: negative numbers are sent as 10-byte two's complement
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    if wire_type == _BYTES:
        payload = _varint(len(payload)) + payload
    return _varint(number << 3 | wire_type) + payload


def _float32(value: float) -> bytes:
    try:
        return struct.pack("<f", value)
    except OverflowError:  # beyond float32's range: TensorBoard shows it as infinite
        return struct.pack("<f", math.copysign(math.inf, value))


def _event(wall_time: float, step: int | None = None, file_version: str | None = None,
           values: dict | None = None) -> bytes:
    """Event: wall_time=1 (double), step=2 (int64), file_version=3 (string), summary=5 (Summary)."""
    out = _field(1, _FIXED64, struct.pack("<d", wall_time))
    if step is not None:
        out += _field(2, _VARINT, _varint(step))
    if file_version is not None:
        out += _field(3, _BYTES, file_version.encode())
    if values is not None:
        # Summary.value=1 (repeated Value); Value.tag=1 (string), Value.simple_value=2 (float)
        summary = b"".join(
            _field(1, _BYTES, _field(1, _BYTES, tag.encode()) + _field(2, _FIXED32, _float32(value)))
            for tag, value in values.items())
        out += _field(5, _BYTES, summary)
    return out


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


class SummaryWriter:
    """Appends scalar summaries to a new events.out.tfevents.<time>.<hostname> file in `logdir`.

    Only one process of a multi-process run should write (TensorBoard would show each file as
    a duplicate of the same run otherwise).
    """

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        base = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
        self.path, n = base, 0
        while True:  # two writers started in the same second must not share a file
            try:
                self._file = open(self.path, "xb")
                break
            except FileExistsError:
                n += 1
                self.path = f"{base}.{n}"
        self._file.write(_record(_event(time.time(), file_version="brain.Event:2")))
        self._file.flush()

    def scalars(self, step: int, values: dict) -> None:
        """One event holding every {tag: number} of `values` at `step`; None values are skipped."""
        values = {str(tag): float(v) for tag, v in values.items() if v is not None}
        if values:
            self._file.write(_record(_event(time.time(), step=int(step), values=values)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- reading, for tests and for users who want the numbers back without TensorBoard.

def _read_records(path: str):
    """Yields the data of every record of one file; a bad CRC or a cut-off record raises ValueError."""
    with open(path, "rb") as f:
        blob = f.read()
    pos = 0
    while pos < len(blob):
        if pos + 12 > len(blob):
            raise ValueError(f"{path}: record header cut off at byte {pos}")
        header = blob[pos:pos + 8]
        (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", blob[pos + 8:pos + 12])
        if masked_crc32c(header) != header_crc:
            raise ValueError(f"{path}: corrupt record length at byte {pos} (CRC mismatch)")
        end = pos + 12 + length + 4
        if end > len(blob):
            raise ValueError(f"{path}: record at byte {pos} cut off")
        data = blob[pos + 12:pos + 12 + length]
        if masked_crc32c(data) != struct.unpack("<I", blob[end - 4:end])[0]:
            raise ValueError(f"{path}: corrupt record at byte {pos} (CRC mismatch)")
        yield data
        pos = end


def _fields(buf: bytes):
    """Yields (field number, wire type, value) of one protobuf message; bytes fields as bytes."""
    pos = 0

    def varint():
        nonlocal pos
        result = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while pos < len(buf):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value = varint()
        elif wire_type == _FIXED64:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire_type == _BYTES:
            n = varint()
            value, pos = buf[pos:pos + n], pos + n
        elif wire_type == _FIXED32:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        yield number, wire_type, value


def _event_files(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(os.path.join(path, name) for name in os.listdir(path) if ".tfevents." in name)
    return [path]


def read_scalars(path: str) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every simple_value in an event file, or in every event file of a folder."""
    out = []
    for file in _event_files(path):
        for data in _read_records(file):
            step, summaries = 0, []
            for number, _, value in _fields(data):
                if number == 2:
                    step = value - (1 << 64) if value >= 1 << 63 else value
                elif number == 5:
                    summaries.append(value)
            for summary in summaries:
                for number, _, value_msg in _fields(summary):
                    if number != 1:
                        continue
                    tag, simple = None, None
                    for n, wire_type, v in _fields(value_msg):
                        if n == 1:
                            tag = v.decode()
                        elif n == 2 and wire_type == _FIXED32:
                            simple = struct.unpack("<f", v)[0]
                    if tag is not None and simple is not None:
                        out.append((step, tag, simple))
    return out
