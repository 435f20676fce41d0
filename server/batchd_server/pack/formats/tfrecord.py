"""TFRecord files of ``tf.train.Example``, read without TensorFlow.

A TFRecord file (optionally GZIP-compressed as a whole, told by its magic bytes) is
records one after another, each (little-endian)::

    uint64  length
    uint32  masked_crc32c(the 8 bytes of length)
    byte    data[length]               a serialized tf.train.Example
    uint32  masked_crc32c(data)

    masked_crc32c(x) = ((c >> 15 | c << 17) + 0xA282EAD8) mod 2**32,  c = CRC-32C(x)

Both checksums are verified. A length whose checksum fails is fatal (the records
after it cannot be found); a record whose data checksum fails, and a file cut short,
are errors naming the file and the record number (``--on-error skip`` records them).

The Example is read by a small reader of the protobuf wire format (tag = field << 3 |
wire type; 0 varint, 1 64-bit, 2 length-delimited, 5 32-bit)::

    Example   { Features features = 1; }
    Features  { map<string, Feature> feature = 1; }   entries: { key = 1; value = 2; }
    Feature   { oneof { BytesList bytes_list = 1; FloatList float_list = 2;
                        Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }
    FloatList { repeated float value = 1; }   packed (wire type 2) or not (5)
    Int64List { repeated int64 value = 1; }   packed (wire type 2) or not (0)

Why hand-written, not ``protobuf``: the three messages above are the whole schema,
the reader is ~100 lines with no generated code or version coupling to a protobuf
runtime, and it reads image bytes as slices without building message objects.
The CRC-32C is ``google-crc32c`` (the ``batchd[tfrecord]`` extra): Google's C library
with hardware CRC instructions, wheels for the common platforms, the checksum that
Google's own storage clients use: 7 GB/s here. A table-driven CRC in Python is a
byte-at-a-time loop (2.4 MB/s measured; numpy cannot vectorise its carried state),
which would make checking, not decoding, the cost of a pack of JPEGs.

Features become fields (named after their keys, or picked with ``--field``): a
``bytes`` feature whose first record holds a JPEG, PNG or WebP is the image (decoded
with ``--mode raw``, kept with ``--mode encoded``); other ``bytes`` are raw uint8
(``--feature-shape image_raw=28,28,1`` reshapes them, and a uint8 HxWx1|3 field is
the image); ``int64`` and ``float`` features are int64 and float32 targets.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import PackError
from ..packer import PackOptions, PackSummary
from ..stream import Record, pack_records
from . import require
from ._fields import SourceBase, check_shapes_used, choose, reshaped, shape_for

__all__ = ["frames", "masked_crc", "pack_source", "parse_example"]

_HEAD = struct.Struct("<QI")
_CRC = struct.Struct("<I")
_MAX_RECORD = 1 << 31  # a length past 2 GiB in a record is a corrupt header, not a sample


def masked_crc(crc: int) -> int:
    """TFRecord's mask of a CRC-32C (so a CRC of data holding CRCs stays well mixed)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _open(path: Path) -> Any:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")  # closed by frames


def frames(
    path: Path, crc32c: Callable[[bytes], int]
) -> Iterator[tuple[int, bytes | None, str | None]]:
    """``(record number, data, None)`` per record, or ``(n, None, reason)`` for a record
    whose data checksum fails or that the file's end cut short (the last one yielded);
    PackError for a length whose checksum fails (nothing after it can be found)."""
    n = 0
    offset = 0
    with _open(path) as f:
        while True:
            try:
                head = f.read(_HEAD.size)
                if not head:
                    return
                if len(head) < _HEAD.size:
                    yield n, None, f"truncated: the file ends {len(head)} bytes into its header"
                    return
                length, lcrc = _HEAD.unpack(head)
                if masked_crc(crc32c(head[:8])) != lcrc or length > _MAX_RECORD:
                    raise PackError(
                        f"{path} record {n} (byte {offset}): the length's CRC-32C does not "
                        "match: the file is corrupt here (or is not a TFRecord), and the "
                        "records after it cannot be found; nothing was written"
                    )
                body = f.read(length + _CRC.size)
            except (EOFError, OSError, zlib.error) as exc:  # gzip: a cut or damaged stream
                yield n, None, f"the GZIP stream is damaged or cut short: {exc}"
                return
            if len(body) < length + _CRC.size:
                yield (
                    n,
                    None,
                    f"truncated: the record needs {length + _CRC.size} bytes after its "
                    f"header and the file holds {len(body)}",
                )
                return
            data = body[:length]
            if masked_crc(crc32c(data)) != _CRC.unpack_from(body, length)[0]:
                yield n, None, "the data's CRC-32C does not match: a corrupt record"
            else:
                yield n, data, None
            n += 1
            offset += _HEAD.size + length + _CRC.size


# --------------------------------------------------------------------------- protobuf


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("a varint runs past the end")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one message: an int, or a (start, end) slice."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise ValueError(f"field {number} runs past its message")
            yield number, wire, (pos, pos + size)
            pos += size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > end:
                raise ValueError(f"field {number} runs past its message")
            yield number, wire, (pos, pos + width)
            pos += width
        else:
            raise ValueError(f"wire type {wire} (groups) is not used by tf.train.Example")
    if pos != end:
        raise ValueError("a field runs past its message")


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _feature(buf: bytes, start: int, end: int) -> tuple[str, Any]:
    """A Feature: ("bytes", [bytes, ...]), ("float", float32 array), ("int64", int64 array)."""
    kind: str = "none"
    values: Any = None
    for number, wire, val in _fields(buf, start, end):
        if number not in (1, 2, 3) or wire != 2:
            continue
        s, e = val
        if number == 1:
            out = [buf[a:b] for n, w, (a, b) in _fields(buf, s, e) if n == 1 and w == 2]
            kind, values = "bytes", out
        elif number == 2:
            parts = []
            for n, w, v in _fields(buf, s, e):
                if n == 1 and w in (2, 5):
                    parts.append(np.frombuffer(buf, "<f4", (v[1] - v[0]) // 4, v[0]))
            kind, values = "float", np.concatenate(parts) if parts else np.empty(0, "<f4")
        else:
            ints: list[int] = []
            for n, w, v in _fields(buf, s, e):
                if n == 1 and w == 0:
                    ints.append(_signed(v))
                elif n == 1 and w == 2:
                    p = v[0]
                    while p < v[1]:
                        x, p = _varint(buf, p)
                        ints.append(_signed(x))
            kind, values = "int64", np.asarray(ints, np.int64)
    return kind, values


def parse_example(data: bytes) -> dict[str, tuple[str, Any]]:
    """A serialized ``tf.train.Example`` as ``{feature key: (kind, values)}``.

    Raises ValueError if it is malformed.
    """
    out: dict[str, tuple[str, Any]] = {}
    for number, wire, val in _fields(data, 0, len(data)):
        if number != 1 or wire != 2:
            continue
        for n, w, (es, ee) in _fields(data, *val):
            if n != 1 or w != 2:
                continue
            key, feature = None, ("none", None)
            for kn, kw, kv in _fields(data, es, ee):
                if kn == 1 and kw == 2:
                    key = data[kv[0] : kv[1]].decode("utf-8", "strict")
                elif kn == 2 and kw == 2:
                    feature = _feature(data, *kv)
            if key is None:
                raise ValueError("a feature map entry without a key")
            out[key] = feature
    return out


_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


def is_image(b: bytes) -> bool:
    """JPEG, PNG or WebP by their first bytes."""
    return b.startswith(_MAGIC) or (b[:4] == b"RIFF" and b[8:12] == b"WEBP")


# --------------------------------------------------------------------------- the source


class _Source(SourceBase):
    kind = "tfrecord"

    def __init__(self, paths: list[Path], opts: PackOptions) -> None:
        super().__init__(paths, opts)
        self.crc32c: Callable[[bytes], int] = require("tfrecord", "google_crc32c").value
        self.images: set[str] = set()

    def _setup(self, feats: dict[str, tuple[str, Any]], where: str) -> dict[str, str]:
        names, notes = choose(list(feats), self.opts, where)
        check_shapes_used(names, self.opts, where)
        for key in names:
            kind, values = feats[key]
            if kind == "bytes" and len(values) == 1 and is_image(values[0]):
                self.images.add(key)
        self.notes.extend(notes)
        self.extra["fields"] = {n: k for k, n in names.items()}
        return names

    def _value(self, key: str, name: str, feature: tuple[str, Any], where: str) -> Any:
        kind, values = feature
        if kind == "none" or values is None or len(values) == 0:
            raise PackError(
                f"{where}: feature {key!r} holds no value; a field holds at least one value "
                "per record (leave it out with --field NAME=KEY for the others)"
            )
        if kind == "bytes":
            if len(values) != 1:
                raise PackError(
                    f"{where}: feature {key!r} holds {len(values)} byte strings; batchd packs "
                    "one per record (leave it out with --field NAME=KEY for the others)"
                )
            if key in self.images:
                return bytes(values[0])
            arr = np.frombuffer(values[0], np.uint8)
        else:
            arr = values
        target = shape_for(name, key, self.opts)
        if target is None:
            return arr[0] if arr.shape == (1,) and kind != "bytes" else arr
        return arr.reshape(reshaped(name, arr.shape, target, where))

    def records(self) -> Iterator[Record]:
        for path in self.paths:
            for n, data, error in frames(path, self.crc32c):
                where = f"{path} record {n}"
                if data is None:
                    yield Record(where, {}, error)
                    continue
                try:
                    feats = parse_example(data)
                except (ValueError, UnicodeDecodeError) as exc:
                    yield Record(where, {}, f"not a tf.train.Example: {exc}")
                    continue
                if self.names is None:
                    self.names = self._setup(feats, where)
                yield Record(
                    where,
                    {
                        name: self._value(key, name, feats[key], where)
                        for key, name in self.names.items()
                        if key in feats
                    },
                )


def pack_source(paths: list[Path], out: Path, opts: PackOptions) -> PackSummary:
    """Pack TFRecord files of ``tf.train.Example`` (see the module docstring)."""
    return pack_records(out, _Source(paths, opts), opts)
