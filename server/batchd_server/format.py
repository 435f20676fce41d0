"""The pack format, version 1: write a dataset directory, open it, verify it.

A dataset is a directory; its name is the dataset's name::

    NAME/
    ├── batchd.header       magic, version, JSON (fields, count, checksums, ...), header checksum
    ├── <field>.raw         fixed-shape field: count x shape x dtype, C-contiguous, from byte 0
    ├── <field>.data        encoded field: the original JPEG/PNG bytes, back to back
    ├── <field>.offsets     encoded field: int64 LE, count + 1 entries; sample i is data[o[i]:o[i+1]]
    └── <field>.sizes       encoded field: int32 LE, count x 2 (height, width) of each decoded image

``batchd.header`` (all integers little-endian)::

    offset  size  content
    0       8     magic b"\\x89BATCHD\\n"  (the \\x89 and \\n catch 7-bit and newline mangling)
    8       4     uint32 format version (1)
    12      4     uint32 byte-order mark 0x01020304 (reads 0x04030201 on a big-endian writer)
    16      8     uint64 N, length of the JSON document
    24      N     JSON, UTF-8: version, count, classes, fields, chunk_size, files, packing, skipped
    24+N    8     uint64 xxh3_64 of bytes [0, 24+N)

Data files hold nothing but data, so every array starts at byte 0 (page aligned)
and ``np.memmap`` maps it with no copy. The header's ``files`` table gives, for each
data file, its size, its xxh3_64 and the xxh3_64 of each ``chunk_size`` (8 MiB)
chunk, all computed while writing; ``verify`` re-reads and names the first bad chunk.
The fingerprint is xxh3_128 of the canonical JSON (sorted keys, no spaces) of
``{version, count, classes, fields, chunk_size, files}``: it changes whenever any
byte of data changes, and not when only the packing notes (source path, time) do.

Writing is atomic: files go to ``.NAME.tmp-XXXXXXXX`` beside ``NAME`` (a name that
:func:`open_dataset` refuses), are fsynced, and the directory is renamed into place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import json
import math
import os
import re
import secrets
import shutil
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, cast

import numpy as np
import xxhash
from numpy.typing import NDArray

from batchd import __version__

from .errors import FormatError, PackError, StaleError

__all__ = [
    "CHUNK_SIZE",
    "FORMAT_VERSION",
    "HEADER_NAME",
    "Dataset",
    "DatasetWriter",
    "Encoded",
    "FieldSpec",
    "open_dataset",
    "verify",
]

FORMAT_VERSION: int = 1
HEADER_NAME = "batchd.header"
MAGIC = b"\x89BATCHD\n"
BOM = 0x01020304
CHUNK_SIZE = 8 << 20
_PREFIX = struct.Struct("<8sIIQ")
_SUFFIX = struct.Struct("<Q")
_MAX_JSON = 1 << 30
_MAX_BYTES = 1 << 62  # no real file is this big; larger means a lying header
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_RESERVED = frozenset({"index"})
# Only plain numeric dtypes can be mapped and sent on the wire; never parse an arbitrary dtype string.
_DTYPES = frozenset(
    {"|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8"}
)
_TEMP_MARK = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$")

Role = Literal["image", "mask", "value"]
Encoding = Literal["raw", "image"]


def _le_dtype(dtype: np.dtype[Any] | str | type) -> np.dtype[Any]:
    dt = np.dtype(dtype)
    return dt.newbyteorder("<") if dt.itemsize > 1 else dt


@dataclass(frozen=True, kw_only=True)
class FieldSpec:
    """One field of a dataset, as the header declares it.

    ``role``: ``image`` gets photometric and geometric augmentation, ``mask`` geometric
    only (nearest-neighbour), ``value`` is never augmented. ``encoding``: ``raw`` is a
    fixed-shape array in a flat file; ``image`` is JPEG/PNG bytes decoded at serve time
    to RGB ``uint8 HxWx3`` (``channels=3``) or ``uint8 HxW`` (``channels=1``, masks).
    ``channels`` is also set for raw image (3) and mask (1) fields; ``None`` for values.
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
        if not isinstance(self.dtype, np.dtype) or self.dtype.str not in _DTYPES:
            return f"dtype {self.dtype} is not one of {sorted(_DTYPES)}"
        if self.encoding == "image":
            if self.role == "value":
                return "an encoded image field has role image or mask"
            if self.shape is not None or self.dtype != np.uint8:
                return "an encoded image field has shape None and dtype uint8"
            if self.channels != (3 if self.role == "image" else 1):
                return "encoded images decode to 3 channels (RGB), masks to 1"
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
        if obj["dtype"] not in _DTYPES:
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


@dataclass(frozen=True)
class Encoded:
    """One encoded image for the writer: its bytes and decoded size."""

    data: bytes | memoryview
    height: int
    width: int


# --------------------------------------------------------------------------- reading


def _content(header: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("version", "count", "classes", "fields", "chunk_size", "files")
    return {k: header[k] for k in keys}


def _fingerprint(header: Mapping[str, Any]) -> str:
    canon = json.dumps(_content(header), sort_keys=True, separators=(",", ":"))
    return xxhash.xxh3_128_hexdigest(canon.encode())


def _read_header(path: Path) -> dict[str, Any]:
    hpath = path / HEADER_NAME
    try:
        raw = hpath.read_bytes()
    except FileNotFoundError:
        raise FormatError(
            hpath, "missing: not a batchd dataset (pack one with `batchd pack`)"
        ) from None
    except OSError as exc:
        raise FormatError(hpath, f"cannot be read: {exc.strerror}") from None
    if len(raw) < _PREFIX.size + _SUFFIX.size:
        raise FormatError(hpath, f"{len(raw)} bytes is too short for a batchd header (truncated)")
    magic, version, bom, n = _PREFIX.unpack_from(raw)
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
    end = _PREFIX.size + n
    if n > _MAX_JSON or len(raw) != end + _SUFFIX.size:
        raise FormatError(
            hpath, f"size {len(raw)} does not match its JSON length {n}: truncated or corrupt"
        )
    (stored,) = _SUFFIX.unpack_from(raw, end)
    if xxhash.xxh3_64_intdigest(raw[:end]) != stored:
        raise FormatError(
            hpath, "header checksum mismatch: the header is corrupt; repack the dataset"
        )
    try:
        header = json.loads(raw[_PREFIX.size : end].decode("utf-8"))
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
    if not 0 < h["count"] < _MAX_BYTES:
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
            return f"files entry {name!r}: {len(rec['chunks'])} chunk checksums for {rec['size']} bytes"
    return None


class Dataset:
    """An open, validated dataset: raw fields memory-mapped, encoded fields indexable.

    Build it with :func:`open_dataset`. Arrays stay mapped for the Dataset's life;
    call :meth:`check` before reading if the files could have changed since open.
    """

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.name = path.name
        self.header = header
        self.count: int = header["count"]
        self.classes: list[str] | None = header.get("classes")
        self.fingerprint = _fingerprint(header)
        self.fields: dict[str, FieldSpec] = {}
        self._files: dict[str, IO[bytes]] = {}
        self._stats: dict[str, tuple[int, int, int]] = {}
        self._maps: dict[str, np.ndarray[Any, Any]] = {}
        try:
            self._open_all()
        except BaseException:
            self.close()
            raise

    def _open_all(self) -> None:
        hpath = self.path / HEADER_NAME
        names: list[str] = []
        for obj in self.header["fields"]:
            try:
                spec = FieldSpec.from_json(obj)
            except (ValueError, TypeError) as exc:
                raise FormatError(hpath, f"bad field entry: {exc}") from None
            if spec.name in self.fields:
                raise FormatError(hpath, f"field {spec.name!r} is declared twice")
            if spec.name in _RESERVED:
                raise FormatError(hpath, f"field name {spec.name!r} is reserved for sample ids")
            self.fields[spec.name] = spec
            names.extend(spec.files())
        if sorted(names) != sorted(self.header["files"]):
            raise FormatError(
                hpath,
                f"the files table {sorted(self.header['files'])} does not match the fields {sorted(names)}",
            )
        n = self.count
        for spec in self.fields.values():
            if spec.encoding == "raw":
                assert spec.shape is not None
                fname = spec.files()[0]
                self._map(fname, spec.dtype, (n, *spec.shape))
                continue
            data, offs, sizes = spec.files()
            # Small index files are read into memory, not mapped: the server then never
            # touches a mapping of them (see _read_at on why mappings are dangerous).
            o = self._map(offs, np.dtype("<i8"), (n + 1,), load=True)
            dsize = self.header["files"][data]["size"]
            if o[0] != 0 or o[-1] != dsize:
                raise FormatError(
                    self.path / offs,
                    f"offsets run from {o[0]} to {o[-1]}, not from 0 to the data size {dsize}",
                )
            steps = np.diff(o)
            if (steps < 0).any():
                i = int(np.argmax(steps < 0))
                raise FormatError(
                    self.path / offs, f"offsets decrease at sample {i} ({o[i]} > {o[i + 1]})"
                )
            self._map(data, np.dtype("u1"), (dsize,))
            s = self._map(sizes, np.dtype("<i4"), (n, 2), load=True)
            if (s <= 0).any():
                raise FormatError(self.path / sizes, "an image size is zero or negative")

    def _map(
        self, fname: str, dtype: np.dtype[Any], shape: tuple[int, ...], *, load: bool = False
    ) -> np.ndarray[Any, Any]:
        fpath = self.path / fname
        want = math.prod(shape) * dtype.itemsize
        if want > _MAX_BYTES:
            raise FormatError(fpath, f"the header implies {want} bytes, which no file can hold")
        if self.header["files"][fname]["size"] != want:
            raise FormatError(
                self.path / HEADER_NAME,
                f"{fname}: the files table says {self.header['files'][fname]['size']} bytes, the fields imply {want}",
            )
        try:
            f = open(fpath, "rb")  # noqa: SIM115 - kept open for check()
        except FileNotFoundError:
            raise FormatError(fpath, "missing: the dataset is incomplete; repack it") from None
        except OSError as exc:
            raise FormatError(fpath, f"cannot be opened: {exc.strerror}") from None
        self._files[fname] = f
        st = os.fstat(f.fileno())
        self._stats[fname] = (st.st_dev, st.st_ino, st.st_size)
        if st.st_size != want:
            raise FormatError(
                fpath, f"is {st.st_size} bytes, the header implies {want} (truncated or replaced)"
            )
        arr: np.ndarray[Any, Any]
        if want == 0:
            arr = np.zeros(shape, dtype)
        elif load:
            arr = np.empty(shape, dtype)
            self._read_at(fname, arr.reshape(-1).view(np.uint8).data, 0)
        else:
            arr = np.memmap(f, dtype=dtype, mode="r", shape=shape)
        self._maps[fname] = arr
        return arr

    def _spec(self, name: str, encoding: Encoding) -> FieldSpec:
        spec = self.fields.get(name)
        if spec is None:
            raise KeyError(
                f"dataset {self.name!r} has no field {name!r} (fields: {sorted(self.fields)})"
            )
        if spec.encoding != encoding:
            raise ValueError(f"field {name!r} is {spec.encoding}-encoded, not {encoding}")
        return spec

    def array(self, name: str) -> np.ndarray[Any, Any]:
        """A raw field as a read-only ``np.memmap`` of shape ``(count, *shape)``."""
        spec = self._spec(name, "raw")
        return self._maps[spec.files()[0]]

    # --- reads that cannot SIGBUS (the server's path) ----------------------------
    # Touching a mapped page past the end of a file truncated since it was mapped is a
    # SIGBUS, which kills the whole server; check() narrows the window but cannot close
    # it. os.preadv of the same bytes into our own buffer turns a truncation into a
    # short read, reported as StaleError. The server reads samples only this way;
    # array() stays for tools and tests that own their files.

    def _read_at(self, fname: str, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from ``fname`` at ``offset``; StaleError on a short read."""
        f = self._files.get(fname)
        if f is None:
            raise FormatError(self.path, "the dataset is closed")
        want = len(buf)
        done = 0
        while done < want:
            try:
                n = os.preadv(f.fileno(), [buf[done:]], offset + done)
            except (OSError, ValueError) as exc:  # ValueError: closed by another thread
                raise StaleError(
                    self.path / fname, f"read at byte {offset + done} failed: {exc}"
                ) from None
            if n == 0:
                raise StaleError(
                    self.path / fname,
                    f"short read at byte {offset + done} ({done} of {want} bytes): the file was "
                    "truncated since it was opened; reopen the dataset",
                )
            done += n

    def read_rows(self, name: str, ids: NDArray[np.integer], out: NDArray[Any]) -> None:
        """Copy samples ``ids`` of raw field ``name`` into ``out`` (C-contiguous ``(len(ids), *shape)``).

        Consecutive ids are read with one call; a truncated file is a StaleError.
        """
        spec = self._spec(name, "raw")
        assert spec.shape is not None
        if out.shape != (len(ids), *spec.shape) or out.dtype != spec.dtype:
            raise ValueError(
                f"out is {out.dtype} {out.shape}, field {name!r} needs {spec.dtype} {(len(ids), *spec.shape)}"
            )
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
        if len(ids) == 0:
            return
        if int(ids.min()) < 0 or int(ids.max()) >= self.count:
            raise IndexError(f"sample ids out of range for {self.count} samples")
        row = spec.dtype.itemsize * math.prod(spec.shape)
        flat = out.reshape(-1).view(np.uint8).data
        fname = spec.files()[0]
        # Runs of consecutive ids (natural order) become one read each.
        starts = [0, *(np.flatnonzero(np.diff(ids) != 1) + 1).tolist(), len(ids)]
        for a, b in itertools.pairwise(starts):
            self._read_at(fname, flat[a * row : b * row], int(ids[a]) * row)

    def read_row(self, name: str, i: int, out: NDArray[Any] | None = None) -> NDArray[Any]:
        """Sample ``i`` of raw field ``name``, read into ``out`` (or a fresh array) and returned.

        Never a view of the mapping. Pass a reused ``out`` on hot paths: a fresh 200 KB
        array per sample costs more (allocation and page faults) than the read itself.
        """
        spec = self._spec(name, "raw")
        assert spec.shape is not None
        i = self._index(i)
        if out is None:
            out = np.empty(spec.shape, spec.dtype)
        elif out.shape != spec.shape or out.dtype != spec.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous {spec.dtype} {spec.shape}")
        row = out.nbytes
        self._read_at(spec.files()[0], out.reshape(-1).view(np.uint8).data, i * row)
        return out

    def _index(self, i: int) -> int:
        if not -self.count <= i < self.count:
            raise IndexError(f"sample {i} out of range for {self.count} samples")
        return i % self.count

    def encoded(self, name: str, i: int) -> memoryview:
        """The stored bytes of sample ``i`` of an encoded field (a fresh copy, read with pread)."""
        spec = self._spec(name, "image")
        data, offs, _ = spec.files()
        i = self._index(i)
        o = self._maps[offs]  # in memory (loaded at open)
        buf = memoryview(bytearray(int(o[i + 1]) - int(o[i])))
        self._read_at(data, buf, int(o[i]))
        return buf

    def sizes(self, name: str) -> NDArray[np.int32]:
        """``(count, 2)`` heights and widths of an encoded field's decoded images."""
        return cast("NDArray[np.int32]", self._maps[self._spec(name, "image").files()[2]])

    def decode(self, name: str, i: int) -> NDArray[np.uint8]:
        """Sample ``i`` of an encoded field, decoded: RGB ``HxWx3`` or ``HxW`` (masks)."""
        spec = self._spec(name, "image")
        i = self._index(i)
        img = decode_image(self.encoded(name, i), spec.channels or 3)
        if img is None or img.shape[:2] != tuple(self.sizes(name)[i]):
            raise FormatError(
                self.path / spec.files()[0],
                f"field {name!r} sample {i} does not decode to the recorded size; run `batchd verify`",
            )
        return img

    def check(self) -> None:
        """Raise FormatError if any file was truncated or replaced since open (fstat only).

        Reading a mapped page past a truncated file's end is a SIGBUS; this is
        the guard the server runs before it touches the mappings.
        """
        if not self._files:
            raise FormatError(self.path, "the dataset is closed")
        for fname, f in self._files.items():
            dev, ino, size = self._stats[fname]
            st = os.fstat(f.fileno())
            if st.st_size != size:
                raise FormatError(
                    self.path / fname,
                    f"changed size since open ({size} -> {st.st_size} bytes); reopen",
                )
            try:
                now = os.stat(self.path / fname)
            except OSError:
                raise FormatError(
                    self.path / fname, "removed since open; reopen the dataset"
                ) from None
            if (now.st_dev, now.st_ino) != (dev, ino):
                raise FormatError(
                    self.path / fname, "replaced since open (new inode); reopen the dataset"
                )

    def close(self) -> None:
        """Drop the mappings and close the files (arrays handed out stay valid until freed)."""
        self._maps.clear()
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r}, count={self.count}, fields={list(self.fields)})"


def _view(buf: bytes | memoryview | NDArray[Any]) -> memoryview:
    # numpy's stubs do not declare the buffer protocol on ndarray; it has it.
    return memoryview(cast(bytes, buf))


def decode_image(
    buf: bytes | bytearray | memoryview | NDArray[np.uint8], channels: int
) -> NDArray[np.uint8] | None:
    """Decode JPEG/PNG bytes to RGB HxWx3 (channels=3) or single-channel uint8 HxW (1).

    Returns None if the bytes are not an image of that kind (a mask must be 8-bit
    single-channel). The caller knows the file and says so in its error.
    """
    import cv2

    arr = np.frombuffer(buf, np.uint8)
    if arr.size == 0:
        return None
    if channels == 3:
        img = cv2.imdecode(arr, cv2.IMREAD_COLOR)
        if img is None:
            return None
        return cast("NDArray[np.uint8]", cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    img = cv2.imdecode(arr, cv2.IMREAD_UNCHANGED)
    if img is None or img.ndim != 2 or img.dtype != np.uint8:
        return None
    return cast("NDArray[np.uint8]", img)


def open_dataset(path: str | Path) -> Dataset:
    """Open and validate a dataset directory; FormatError naming the bad file otherwise.

    Checks magic, version, header checksum, each file's presence and exact size,
    and encoded fields' offsets (from 0, monotonic, to the data size). Data
    checksums are :func:`verify`'s job (a full read).
    """
    p = Path(path)
    if _TEMP_MARK.match(p.name):
        raise FormatError(p, "an unfinished pack's temporary directory, not a dataset; delete it")
    if not p.is_dir():
        raise FormatError(p, "not a directory (a dataset is a directory made by `batchd pack`)")
    return Dataset(p, _read_header(p))


def verify(path: str | Path, *, progress: bool = False) -> None:
    """Re-read every data file and compare each chunk's checksum; FormatError on the first bad one."""
    with open_dataset(path) as ds:
        chunk = ds.header["chunk_size"]
        files = ds.header["files"]
        total = sum(rec["size"] for rec in files.values())
        bar = _progress_bar(total, "verify", "B", progress)
        try:
            for fname in sorted(files):
                _verify_file(ds.path / fname, files[fname], chunk, bar.update)
        finally:
            bar.close()


def _verify_file(fpath: Path, rec: Mapping[str, Any], chunk: int, advance: Any) -> None:
    whole = xxhash.xxh3_64()
    n = len(rec["chunks"])
    # Plain reads, not the mapping: a file truncated under us is a short read, never a SIGBUS.
    with open(fpath, "rb") as f:
        for k, want in enumerate(rec["chunks"]):
            lo = k * chunk
            hi = min(lo + chunk, rec["size"])
            buf = f.read(hi - lo)
            if len(buf) != hi - lo:
                raise FormatError(fpath, f"chunk {k}/{n} (bytes {lo}-{hi}) is short: truncated")
            if xxhash.xxh3_64_hexdigest(buf) != want:
                raise FormatError(
                    fpath,
                    f"chunk {k}/{n} (bytes {lo}-{hi}) does not match its checksum: corrupt; repack the dataset",
                )
            whole.update(buf)
            advance(len(buf))
        if f.read(1):
            raise FormatError(fpath, f"longer than the {rec['size']} bytes the header records")
    if whole.hexdigest() != rec["xxh3_64"]:
        raise FormatError(
            fpath, "whole-file checksum mismatch (chunks agree): corrupt header entry"
        )


class _Bar:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def update(self, n: int) -> None:
        if self.inner is not None:
            self.inner.update(n)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


def _progress_bar(total: int, desc: str, unit: str, enabled: bool | None) -> _Bar:
    """A tqdm bar on stderr; None means on when stderr is a TTY."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _Bar(None)
    from tqdm import tqdm

    return _Bar(
        tqdm(
            total=total,
            desc=desc,
            unit=unit,
            unit_scale=unit == "B",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.2,
        )
    )


# --------------------------------------------------------------------------- writing


class _HashingFile:
    """A write-only file that checksums per chunk and whole as the bytes go by."""

    def __init__(self, path: Path, chunk: int) -> None:
        self.path = path
        self.f = open(path, "xb", buffering=1 << 20)  # noqa: SIM115 - closed in finish()
        self.chunk = chunk
        self.whole = xxhash.xxh3_64()
        self.part = xxhash.xxh3_64()
        self.in_part = 0
        self.size = 0
        self.chunks: list[str] = []

    def write(self, data: bytes | memoryview | NDArray[Any]) -> None:
        mv = _view(data).cast("B")
        self.f.write(mv)
        self.whole.update(mv)
        self.size += len(mv)
        while len(mv):
            take = min(len(mv), self.chunk - self.in_part)
            self.part.update(mv[:take])
            self.in_part += take
            mv = mv[take:]
            if self.in_part == self.chunk:
                self.chunks.append(self.part.hexdigest())
                self.part = xxhash.xxh3_64()
                self.in_part = 0

    def finish(self) -> dict[str, Any]:
        if self.in_part:
            self.chunks.append(self.part.hexdigest())
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"size": self.size, "xxh3_64": self.whole.hexdigest(), "chunks": self.chunks}

    def close(self) -> None:
        self.f.close()


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the libc or the filesystem lacks it (caller falls back)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists() and not out.is_symlink():
        if not out.parent.is_dir():
            raise PackError(f"{out}: the parent folder {out.parent} does not exist")
        return
    if not overwrite:
        raise PackError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    if not out.is_dir() or out.is_symlink():
        raise PackError(f"{out} exists and is not a directory; refusing to replace it")
    if not (out / HEADER_NAME).exists() and any(out.iterdir()):
        raise PackError(f"{out} exists and is not a batchd dataset; refusing to replace it")


class DatasetWriter:
    """Stream samples into a new dataset; nothing is visible at ``out`` until :meth:`commit`.

    Use as a context manager: leaving the block without commit (an exception,
    a KeyboardInterrupt) removes the temporary directory.
    """

    def __init__(
        self,
        out: str | Path,
        fields: Sequence[FieldSpec],
        *,
        classes: Sequence[str] | None = None,
        overwrite: bool = False,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self.out = Path(out).absolute()
        if not fields:
            raise PackError("a dataset needs at least one field")
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise PackError(f"field names repeat: {names}")
        for f in fields:
            if f.name in _RESERVED:
                raise PackError(
                    f"field name {f.name!r} is reserved (batches carry sample ids under it); rename it"
                )
        _check_target(self.out, overwrite)
        self.fields = list(fields)
        self.classes = None if classes is None else [str(c) for c in classes]
        self.overwrite = overwrite
        self.chunk = chunk_size
        self.count = 0
        self.skipped: list[dict[str, Any]] = []
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{secrets.token_hex(4)}"
        self.tmp.mkdir()
        self._done = False
        self._w: dict[str, _HashingFile] = {}
        self._offset: dict[str, int] = {}
        try:
            for spec in self.fields:
                for fname in spec.files():
                    self._w[fname] = _HashingFile(self.tmp / fname, chunk_size)
                if spec.encoding == "image":
                    self._offset[spec.name] = 0
                    self._w[f"{spec.name}.offsets"].write(np.zeros(1, "<i8"))
        except BaseException:
            self.abort()
            raise

    def append(self, sample: Mapping[str, Any]) -> None:
        """One sample: a raw field's array (exactly its shape and dtype), an encoded field's :class:`Encoded`."""
        block: dict[str, Any] = {}
        for spec in self.fields:
            if spec.encoding == "raw":
                block[spec.name] = np.asarray(sample[spec.name])[None]
            else:
                block[spec.name] = [sample[spec.name]]
        self.append_block(block, 1)

    def append_block(self, block: Mapping[str, Any], n: int) -> None:
        """``n`` samples: raw fields as ``(n, *shape)`` arrays, encoded fields as ``n`` :class:`Encoded`."""
        if set(block) != {f.name for f in self.fields}:
            raise PackError(
                f"a block has fields {sorted(block)}, the dataset {sorted(f.name for f in self.fields)}"
            )
        for spec in self.fields:
            v = block[spec.name]
            if spec.encoding == "raw":
                assert spec.shape is not None
                arr = np.asarray(v)
                if arr.shape != (n, *spec.shape) or arr.dtype != spec.dtype:
                    raise PackError(
                        f"field {spec.name!r}: got {arr.dtype} {arr.shape[1:]}, the dataset holds {spec.dtype} {spec.shape}"
                    )
                self._w[f"{spec.name}.raw"].write(np.ascontiguousarray(arr))
                continue
            if len(v) != n:
                raise PackError(f"field {spec.name!r}: {len(v)} images for {n} samples")
            offs = np.empty(n, "<i8")
            sizes = np.empty((n, 2), "<i4")
            data = self._w[f"{spec.name}.data"]
            pos = self._offset[spec.name]
            for j, e in enumerate(v):
                if not isinstance(e, Encoded) or len(e.data) == 0:
                    raise PackError(
                        f"field {spec.name!r}: expected non-empty Encoded images, got {type(e).__name__}"
                    )
                data.write(e.data)
                pos += len(e.data)
                offs[j] = pos
                sizes[j] = (e.height, e.width)
            self._offset[spec.name] = pos
            self._w[f"{spec.name}.offsets"].write(offs)
            self._w[f"{spec.name}.sizes"].write(sizes)
        self.count += n

    def skip(self, source: str, reason: str, row: int | None = None) -> None:
        """Record an input left out (``--on-error skip``); it lands in the header."""
        self.skipped.append({"source": source, "row": row, "reason": reason})

    def commit(self, packing: Mapping[str, Any] | None = None) -> Path:
        """Finish the files, write the header, fsync, and rename into place."""
        if self._done:
            raise PackError("this writer is already committed or aborted")
        try:
            if self.count == 0:
                raise PackError(
                    "nothing to pack: no sample was written (all skipped or an empty input)"
                )
            files = {fname: w.finish() for fname, w in self._w.items()}
            header = {
                "version": FORMAT_VERSION,
                "count": self.count,
                "classes": self.classes,
                "fields": [f.to_json() for f in self.fields],
                "chunk_size": self.chunk,
                "files": files,
                "packing": {"batchd": __version__, **(packing or {})},
                "skipped": self.skipped,
            }
            body = json.dumps(header, indent=1).encode()
            head = _PREFIX.pack(MAGIC, FORMAT_VERSION, BOM, len(body)) + body
            with open(self.tmp / HEADER_NAME, "xb") as f:
                f.write(head + _SUFFIX.pack(xxhash.xxh3_64_intdigest(head)))
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(self.tmp)
            self._publish()
            self._done = True
            _fsync_dir(self.out.parent)
            return self.out
        except BaseException:
            self.abort()
            raise

    def _publish(self) -> None:
        out = self.out
        if not (out.exists() or out.is_symlink()):
            try:
                if _renameat2(self.tmp, out, _RENAME_NOREPLACE):
                    return
            except FileExistsError:
                raise PackError(
                    f"{out} appeared while packing; pass --overwrite to replace it"
                ) from None
            if out.exists():
                raise PackError(f"{out} appeared while packing; pass --overwrite to replace it")
            os.rename(self.tmp, out)
            return
        _check_target(out, self.overwrite)
        # Swap in one step where the kernel allows: readers see old or new, never nothing.
        if _renameat2(self.tmp, out, _RENAME_EXCHANGE):
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.rename(out, old)
        os.rename(self.tmp, out)
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Drop everything written so far (idempotent)."""
        for w in self._w.values():
            with contextlib.suppress(OSError):
                w.close()
        if not self._done:
            self._done = True
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None or not self._done:
            self.abort()
