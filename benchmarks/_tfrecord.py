"""One TFRecord record of a PNG and its label, by the documented layout (no TensorFlow)."""

from __future__ import annotations

import struct
from collections.abc import Callable

from batchd_server.pack.formats.tfrecord import masked_crc


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def example_png(png: bytes, label: int, crc32c: Callable[[bytes], int]) -> bytes:
    """A framed tf.train.Example {image/encoded: bytes, image/class/label: int64}."""
    feats = {
        "image/encoded": _ld(1, _ld(1, png)),
        "image/class/label": _ld(3, _ld(1, _varint(label))),
    }
    data = _ld(1, b"".join(_ld(1, _ld(1, k.encode()) + _ld(2, v)) for k, v in feats.items()))
    head = struct.pack("<Q", len(data))
    return (
        head
        + struct.pack("<I", masked_crc(crc32c(head)))
        + data
        + struct.pack("<I", masked_crc(crc32c(data)))
    )
