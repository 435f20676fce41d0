"""The ``batchd.header`` file: the layout constants, :class:`FieldSpec`, and reading the header.

The byte layout of the header, and of the data files it describes, and what the
fingerprint covers are drawn in :mod:`batchd_server.format`.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

import numpy as np
import xxhash

from batchd.wire import ALLOWED_DTYPES

from ..errors import FormatError

__all__ = [
    "CHUNK_SIZE",
    "FORMAT_VERSION",
    "HEADER_NAME",
    "FieldSpec",
]

FORMAT_VERSION: int = 1
HEADER_NAME = "batchd.header"
MAGIC = b"\x89BATCHD\n"
BOM = 0x01020304
CHUNK_SIZE = 8 << 20
PREFIX = struct.Struct("<8sIIQ")
SUFFIX = struct.Struct("<Q")
_MAX_JSON = 1 << 30
MAX_BYTES = 1 << 62  # no real file is this big; larger means a lying header
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
RESERVED = frozenset({"index"})

Role = Literal["image", "mask", "value"]
Encoding = Literal["raw", "image"]


def le_dtype(dtype: np.dtype[Any] | str | type) -> np.dtype[Any]:
    dt = np.dtype(dtype)
    return dt.newbyteorder("<") if dt.itemsize > 1 else dt


@dataclass(frozen=True, kw_only=True)
class FieldSpec:
    """One field of a dataset, as the header declares it.

    ``role``: ``image`` gets photometric and geometric augmentation, ``mask`` geometric
    only (nearest-neighbour), ``value`` is never augmented. ``encoding``: ``raw`` is a
    fixed-shape array in a flat file; ``image`` is JPEG/PNG bytes decoded at serve time
    to the shape a raw field of its role has: an image ``uint8 HxWx3`` (RGB,
    ``channels=3``) or ``HxWx1`` (grey, ``channels=1``), a mask ``uint8 HxW``
    (``channels=1``). ``channels`` is also set for raw images and masks; ``None`` for values.
    """

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...] | None
    role: Role
    encoding: Encoding
    channels: int | None

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise ValueError(f"field {self.name!r}: {problem}")

    def _problem(self) -> str | None:
        if not isinstance(self.name, str) or not _FIELD_NAME.match(self.name):
            return "a field name is a letter or _, then letters, digits or _ (at most 64)"
        if self.role not in ("image", "mask", "value"):
            return f"role must be image, mask or value, not {self.role!r}"
        if not isinstance(self.dtype, np.dtype) or self.dtype.str not in ALLOWED_DTYPES:
            return f"dtype {self.dtype} is not one of {sorted(ALLOWED_DTYPES)}"
        if self.encoding == "image":
            if self.role == "value":
                return "an encoded image field has role image or mask"
            if self.shape is not None or self.dtype != np.uint8:
                return "an encoded image field has shape None and dtype uint8"
            if self.channels not in ((1, 3) if self.role == "image" else (1,)):
                return "encoded images decode to 3 channels (RGB) or 1 (grey), masks to 1"
            return None
        encoding: str = self.encoding  # typed Literal, but built from untrusted JSON too
        if encoding != "raw":
            return f"encoding must be raw or image, not {encoding!r}"
        if self.shape is None or not all(isinstance(d, int) and d > 0 for d in self.shape):
            return f"a raw field has a fixed shape of positive ints, not {self.shape!r}"
        if self.role == "image" and (
            self.dtype != np.uint8 or len(self.shape) != 3 or self.shape[2] not in (1, 3)
        ):
            return f"a raw image is uint8 HxWx3 (or HxWx1), not {self.dtype} {self.shape}"
        if self.role == "mask" and (self.dtype != np.uint8 or len(self.shape) != 2):
            return f"a raw mask is uint8 HxW, not {self.dtype} {self.shape}"
        want = None if self.role == "value" else (1 if self.role == "mask" else self.shape[-1])
        if self.channels != want:
            return f"channels must be {want} for a raw {self.role} field"
        return None

    def files(self) -> tuple[str, ...]:
        """The data files this field owns, in a fixed order."""
        if self.encoding == "raw":
            return (f"{self.name}.raw",)
        return (f"{self.name}.data", f"{self.name}.offsets", f"{self.name}.sizes")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype.str,
            "shape": None if self.shape is None else list(self.shape),
            "role": self.role,
            "encoding": self.encoding,
            "channels": self.channels,
        }

    @classmethod
    def from_json(cls, obj: Any) -> FieldSpec:
        """Build from header JSON; ValueError (never KeyError/TypeError) on anything odd."""
        if not isinstance(obj, dict) or set(obj) != {
            "name",
            "dtype",
            "shape",
            "role",
            "encoding",
            "channels",
        }:
            raise ValueError(
                f"a field entry has keys name, dtype, shape, role, encoding, channels: {obj!r}"
            )
        if obj["dtype"] not in ALLOWED_DTYPES:
            raise ValueError(f"field {obj.get('name')!r}: unsupported dtype {obj['dtype']!r}")
        shape = obj["shape"]
        if shape is not None and not (
            isinstance(shape, list) and all(type(d) is int for d in shape)
        ):
            raise ValueError(f"field {obj['name']!r}: shape must be a list of ints or null")
        channels = obj["channels"]
        if channels is not None and type(channels) is not int:
            raise ValueError(f"field {obj['name']!r}: channels must be an int or null")
        return cls(
            name=obj["name"],
            dtype=np.dtype(obj["dtype"]),
            shape=None if shape is None else tuple(shape),
            role=obj["role"],
            encoding=obj["encoding"],
            channels=channels,
        )


def _content(header: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("version", "count", "classes", "fields", "chunk_size", "files")
    return {k: header[k] for k in keys}


def fingerprint_of(header: Mapping[str, Any]) -> str:
    canon = json.dumps(_content(header), sort_keys=True, separators=(",", ":"))
    return xxhash.xxh3_128_hexdigest(canon.encode())


def open_in(path: Path, dir_fd: int | None) -> BinaryIO:
    """``path`` opened for reading; with ``dir_fd``, its name is looked up in that directory."""
    if dir_fd is None:
        return open(path, "rb")
    return open(path.name, "rb", opener=lambda name, flags: os.open(name, flags, dir_fd=dir_fd))


def read_header(path: Path, dir_fd: int | None = None) -> dict[str, Any]:
    """The header of the dataset at ``path`` (read from the directory ``dir_fd`` if given)."""
    hpath = path / HEADER_NAME
    try:
        with open_in(hpath, dir_fd) as f:
            raw = f.read()
    except FileNotFoundError:
        raise FormatError(
            hpath, "missing: not a batchd dataset (pack one with `batchd pack`)"
        ) from None
    except OSError as exc:
        raise FormatError(hpath, f"cannot be read: {exc.strerror}") from None
    if len(raw) < PREFIX.size + SUFFIX.size:
        raise FormatError(hpath, f"{len(raw)} bytes is too short for a batchd header (truncated)")
    magic, version, bom, n = PREFIX.unpack_from(raw)
    if magic != MAGIC:
        raise FormatError(hpath, f"bad magic {magic!r}: not a batchd header")
    if bom != BOM:
        raise FormatError(hpath, f"byte-order mark {bom:#010x} is not {BOM:#010x}: corrupt header")
    if version > FORMAT_VERSION:
        raise FormatError(
            hpath, f"written by a newer batchd (format v{version}); upgrade batchd to read it"
        )
    if version != FORMAT_VERSION:
        raise FormatError(
            hpath,
            f"format version {version} is not supported (this batchd reads v{FORMAT_VERSION})",
        )
    end = PREFIX.size + n
    if n > _MAX_JSON or len(raw) != end + SUFFIX.size:
        raise FormatError(
            hpath, f"size {len(raw)} does not match its JSON length {n}: truncated or corrupt"
        )
    (stored,) = SUFFIX.unpack_from(raw, end)
    if xxhash.xxh3_64_intdigest(raw[:end]) != stored:
        raise FormatError(
            hpath, "header checksum mismatch: the header is corrupt; repack the dataset"
        )
    try:
        header = json.loads(raw[PREFIX.size : end].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(hpath, f"header JSON does not parse: {exc}") from None
    problem = _header_problem(header)
    if problem:
        raise FormatError(hpath, problem)
    return cast("dict[str, Any]", header)


def _header_problem(h: Any) -> str | None:
    if not isinstance(h, dict):
        return "header JSON is not an object"
    for key, typ in (
        ("version", int),
        ("count", int),
        ("fields", list),
        ("chunk_size", int),
        ("files", dict),
        ("packing", dict),
        ("skipped", list),
    ):
        if type(h.get(key)) is not typ:
            return f"header key {key!r} is missing or not a {typ.__name__}"
    if h["version"] != FORMAT_VERSION:
        return f"header JSON says version {h['version']}, the prefix {FORMAT_VERSION}"
    if not 0 < h["count"] < MAX_BYTES:
        return f"count {h['count']} is out of range (a dataset holds at least one sample)"
    if not 0 < h["chunk_size"] <= 1 << 34:
        return f"chunk_size {h['chunk_size']} is out of range"
    classes = h.get("classes")
    if classes is not None and not (
        isinstance(classes, list) and all(isinstance(c, str) for c in classes)
    ):
        return "classes must be a list of strings or null"
    if not h["fields"]:
        return "the header declares no fields"
    for name, rec in h["files"].items():
        if not (
            isinstance(rec, dict)
            and type(rec.get("size")) is int
            and isinstance(rec.get("xxh3_64"), str)
            and isinstance(rec.get("chunks"), list)
            and all(isinstance(c, str) for c in rec["chunks"])
        ):
            return f"files entry {name!r} needs size (int), xxh3_64 (str), chunks (list of str)"
        if len(rec["chunks"]) != -(-rec["size"] // h["chunk_size"]):
            return (
                f"files entry {name!r}: {len(rec['chunks'])} chunk checksums "
                f"for {rec['size']} bytes"
            )
    return None
