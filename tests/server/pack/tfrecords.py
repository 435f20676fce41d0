"""A TFRecord writer for the tests, from the documented layout and protobuf wire format.

No TensorFlow: records are framed as TFRecord's docs draw them, with masked CRC-32C,
and ``tf.train.Example`` is encoded by hand (tag = field << 3 | wire type).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import google_crc32c

from batchd_server.pack.formats.tfrecord import masked_crc


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64s: ten bytes of two's complement, as protobuf does
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def ld(field: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def bytes_feature(*values: bytes) -> bytes:
    return ld(1, b"".join(ld(1, v) for v in values))


def int64_feature(*values: int, packed: bool = True) -> bytes:
    if packed:
        return ld(3, ld(1, b"".join(varint(v) for v in values)))
    return ld(3, b"".join(varint(1 << 3 | 0) + varint(v) for v in values))


def float_feature(*values: float, packed: bool = True) -> bytes:
    if packed:
        return ld(2, ld(1, struct.pack(f"<{len(values)}f", *values)))
    return ld(2, b"".join(varint(1 << 3 | 5) + struct.pack("<f", v) for v in values))


def example(features: Mapping[str, bytes]) -> bytes:
    entries = b"".join(ld(1, ld(1, k.encode()) + ld(2, v)) for k, v in features.items())
    return ld(1, entries)


def frame(data: bytes) -> bytes:
    head = struct.pack("<Q", len(data))
    return (
        head
        + struct.pack("<I", masked_crc(google_crc32c.value(head)))
        + data
        + struct.pack("<I", masked_crc(google_crc32c.value(data)))
    )


def write(path: Path, examples: Iterable[bytes]) -> Path:
    path.write_bytes(b"".join(frame(e) for e in examples))
    return path
