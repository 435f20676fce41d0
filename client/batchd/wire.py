"""The wire contract between client and server: one module both sides import.

It holds everything a batchd client and server must agree on, written once:

* the protocol version and the media types (``application/msgpack`` bodies, and the
  ``application/x-batchd-shm+json`` answer with its request header ``X-Batchd-Shm``);
* the ranges of the request parameters (:data:`MAX_SEED`, :data:`MAX_WORLD_SIZE`) and
  the one integer check both sides use (:func:`check_int`);
* the grammar of a split expression (:func:`parse_split`, :func:`format_split`): the
  client refuses a malformed one before sending it, the server before resolving it;
* who may be handed a shared-memory body (:func:`is_loopback_host`, under /dev/shm);
* the dtypes that may cross the wire (:data:`ALLOWED_DTYPES`) and the body layout:
  :func:`layout` (the server writes a body) and :func:`decode_batch` (the client reads one).

The batch body: a msgpack map whose arrays are raw little-endian bytes.

Layout of one response body (``application/msgpack``, see docs/protocol.md)::

    map {
      "v":           1                      protocol version
      "dataset":     str
      "fingerprint": str                    the pack's content hash
      "epoch":       int
      "batch":       int                    batch index within this rank's epoch
      "index":       ARRAY                  int64 sample ids, one per row
      "fields":      map { name: ARRAY, ... }
    }
    ARRAY = map {
      "dtype": str                          numpy dtype string, always little-endian ("<f4", "|u1")
      "shape": [int, ...]                   first axis is the batch axis
      "pad":   bin (0..63 bytes)            ignore; aligns "data" to 64 bytes in the body
      "data":  bin                          C-contiguous bytes, prod(shape) * itemsize long
    }

Any msgpack reader decodes it. The client does not use a generic reader: it walks the
map once and hands out ``np.frombuffer`` views at the offsets of each ``data`` bin, so
a 38 MB batch is never copied after it has been received. The server does the
mirror image: :func:`layout` writes every header byte up front and returns writable
views where the gather writes the pixels, so a batch is built in its final buffer.
"""

from __future__ import annotations

import ipaddress
import math
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import msgpack
import numpy as np
from numpy.typing import NDArray

from ._exceptions import WireError

__all__ = [
    "ALIGN",
    "ALLOWED_DTYPES",
    "CLIENT_HEADER",
    "MAX_SEED",
    "MAX_SHM_RELEASES",
    "MAX_SPLIT_CHARS",
    "MAX_SPLIT_PARTS",
    "MAX_WORLD_SIZE",
    "MSGPACK_MEDIA",
    "PROTOCOL_VERSION",
    "SHM_HEADER",
    "SHM_MEDIA",
    "SHM_RELEASE_HEADER",
    "SHM_ROOT",
    "WAIT_HEADER",
    "Batch",
    "Layout",
    "SplitBound",
    "SplitSlice",
    "check_int",
    "decode_batch",
    "format_split",
    "is_int",
    "is_loopback_host",
    "layout",
    "parse_split",
    "wire_dtype",
]

#: The ``"v"`` of every body; a client refuses a body of another version.
PROTOCOL_VERSION = 1
#: Every array's data starts at a multiple of this many bytes in the body.
ALIGN = 64
#: The media type of a batch body.
MSGPACK_MEDIA = "application/msgpack"
#: The media type of a same-host answer naming the shared-memory file holding the body.
SHM_MEDIA = "application/x-batchd-shm+json"
#: The request header (value ``1``) by which a same-host client asks for that answer.
SHM_HEADER = "X-Batchd-Shm"
#: The request header by which a same-host client gives back shared-memory bodies it no
#: longer maps: the ``release`` tokens of earlier answers, space-separated, at most
#: ``MAX_SHM_RELEASES``. Only then may the server rewrite a file (recycle it).
SHM_RELEASE_HEADER = "X-Batchd-Shm-Release"
MAX_SHM_RELEASES = 32
#: The optional request header naming one trainer process (1-64 of ``A-Za-z0-9._-``), so
#: the server can tell how many trainers share a job; generic clients leave it out.
CLIENT_HEADER = "X-Batchd-Client"
#: The optional request header giving the seconds that trainer has spent, in all, waiting
#: for batches (a decimal, non-decreasing): the server turns it into each job's data stall.
WAIT_HEADER = "X-Batchd-Wait"
#: Where shared-memory bodies live; a client maps nothing outside it.
SHM_ROOT = "/dev/shm/"
#: ``seed`` and ``epoch`` are 0..MAX_SEED: they must fit a signed 64-bit integer.
MAX_SEED = 2**63 - 1
#: ``world_size`` is 1..MAX_WORLD_SIZE, which keeps sample positions inside int64.
MAX_WORLD_SIZE = 1 << 24

#: A split expression is at most this many characters ...
MAX_SPLIT_CHARS = 256
#: ... and a union of at most this many slices.
MAX_SPLIT_PARTS = 32

#: Every dtype that may cross the wire. Anything else is refused on both ends.
ALLOWED_DTYPES: frozenset[str] = frozenset(
    {"|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8"}
)

_BIN32 = b"\xc6"
_MAX_DEPTH = 8  # a batch nests 4 deep; anything deeper is not a batch


def is_int(value: object) -> TypeGuard[int | np.integer[Any]]:
    """Whether ``value`` is an int (a numpy integer too) and not a bool.

    bool is refused although it is an int: ``batch_size=True`` is a mistake, not 1.
    """
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``low..high`` (:func:`is_int`), or ValueError naming ``name``."""
    if not is_int(value):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


@dataclass(frozen=True, slots=True)
class SplitBound:
    """One end of a slice: ``value`` percent of the samples, or ``value`` samples."""

    value: int
    percent: bool

    def __str__(self) -> str:
        return f"{self.value}%" if self.percent else str(self.value)


@dataclass(frozen=True, slots=True)
class SplitSlice:
    """``[start:stop]`` of the split order; ``None`` is the start or the end of the pack."""

    start: SplitBound | None
    stop: SplitBound | None

    def __str__(self) -> str:
        return f"[{self.start or ''}:{self.stop or ''}]"


_SLICE = re.compile(r"\[\s*(?:(\d+)\s*(%)?)?\s*:\s*(?:(\d+)\s*(%)?)?\s*\]")
_SPLIT_EXAMPLES = "e.g. '[:80%]', '[80%:]', '[10%:20%]', '[:1000]' or '[:20%]+[40%:]'"


def _bound(digits: str | None, percent: str | None, what: str) -> SplitBound | None:
    if digits is None:
        return None
    value = int(digits)
    if percent and value > 100:
        raise ValueError(f"{what} is {value}%: a percent bound is 0% .. 100%")
    if value > MAX_SEED:
        raise ValueError(f"{what} is {value} samples: at most {MAX_SEED}")
    return SplitBound(value, bool(percent))


def _slice_problem(part: str) -> str:
    """Why ``part`` is not a slice, in words a user can act on."""
    if re.search(r"-\s*\d", part):
        return "negative bounds are not supported: write '[80%:]' for the last 20%"
    if re.search(r"\d[.,]\d", part):
        return "percents are whole numbers: use a sample count for a finer cut, e.g. '[:1234]'"
    named = re.fullmatch(r"\s*([A-Za-z_][\w-]*)\s*(\[.*)", part)
    if named:
        return f"a pack is one split: drop the name {named.group(1)!r} and write {named.group(2)!r}"
    if re.search(r"\]\s*\[", part):
        return "join slices with '+', e.g. '[:20%]+[40%:]'"
    if "[" in part and ":" not in part:
        return "a slice needs a ':', e.g. '[:1000]' for the first 1000 samples"
    return (
        "write [start:stop] with whole percents ('80%') or sample counts ('1000'), "
        + _SPLIT_EXAMPLES
    )


def parse_split(text: str) -> tuple[SplitSlice, ...]:
    """The slices of a split expression (the tfds / Hugging Face ``datasets`` syntax).

    ``EXPR = SLICE ("+" SLICE)*``, ``SLICE = "[" [BOUND] ":" [BOUND] "]"``,
    ``BOUND = digits ["%"]``: whole percents 0..100 or sample counts, blanks allowed
    between tokens. Bounds are positions in the split order, which only the server can
    resolve (the pack's count); what can be told without it is checked here: ValueError
    saying what is wrong and how to write it. A start of 0 and a stop of 100% come back
    as ``None`` (the same slice), so equal splits format equally (:func:`format_split`).
    """
    if not isinstance(text, str):
        raise ValueError(f"split must be a string such as '[:80%]', got {text!r}")
    if len(text) > MAX_SPLIT_CHARS:
        raise ValueError(f"split is {len(text)} characters; at most {MAX_SPLIT_CHARS}")
    if not text.strip():
        raise ValueError(f"split is empty: write a slice, {_SPLIT_EXAMPLES}")
    pieces = text.split("+")
    if len(pieces) > MAX_SPLIT_PARTS:
        raise ValueError(f"split has {len(pieces)} slices; at most {MAX_SPLIT_PARTS}")
    out: list[SplitSlice] = []
    for i, piece in enumerate(pieces, 1):
        where = f"slice {i} ({piece.strip()!r})" if len(pieces) > 1 else repr(piece.strip())
        m = _SLICE.fullmatch(piece.strip())
        if m is None:
            raise ValueError(f"split {where}: {_slice_problem(piece)}")
        start = _bound(m.group(1), m.group(2), f"split {where}: the start")
        stop = _bound(m.group(3), m.group(4), f"split {where}: the stop")
        if start is not None and start.value == 0:
            start = None
        if stop is not None and stop.percent and stop.value == 100:
            stop = None
        if start is not None and stop is not None and start.percent == stop.percent:
            if start.value >= stop.value:
                raise ValueError(
                    f"split {where} is empty: its start is not before its stop "
                    f"('[20%:80%]', not '[80%:20%]')"
                )
        elif stop is not None and stop.value == 0:
            raise ValueError(f"split {where} is empty: it stops at 0")
        out.append(SplitSlice(start, stop))
    return tuple(out)


def format_split(parts: Sequence[SplitSlice]) -> str:
    """The canonical text of a split: no blanks, ``[:80%]`` rather than ``[0%:80%]``."""
    return "+".join(str(p) for p in parts)


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1).

    Only peers on such an address (or a unix socket) can be on the server's host, so
    only they are handed shared-memory bodies (docs/protocol.md).
    """
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def wire_dtype(dtype: np.dtype[Any] | str) -> str:
    """The wire spelling of a dtype (little-endian ``str``), or ValueError if not allowed."""
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
    name = dt.str
    if name not in ALLOWED_DTYPES:
        raise ValueError(
            f"dtype {np.dtype(dtype)} cannot cross the wire; allowed: {sorted(ALLOWED_DTYPES)}"
        )
    return name


@dataclass(frozen=True, slots=True)
class Layout:
    """A body with every header byte written and the array regions left to fill."""

    body: NDArray[np.uint8]
    """The whole response body; send it as it is once the arrays are filled."""
    index: NDArray[np.int64]
    """View of the ``index`` array's data."""
    fields: dict[str, NDArray[Any]]
    """View of each field's data, shaped and typed as declared."""


def layout(
    *,
    dataset: str,
    fingerprint: str,
    epoch: int,
    batch: int,
    rows: int,
    fields: Mapping[str, tuple[np.dtype[Any] | str, Sequence[int]]],
    alloc: Callable[[int], NDArray[np.uint8]] | None = None,
) -> Layout:
    """Plan a batch body of ``rows`` samples; ``fields`` maps name -> (dtype, per-sample shape).

    Returns writable views into one freshly allocated buffer: ``alloc(nbytes)`` (a
    writable, C-contiguous uint8 array of exactly that length, e.g. in shared memory)
    or else ``np.empty``, so large bodies get transparent huge pages. ``Layout.body``
    is the very array ``alloc`` returned. Nothing but the array regions is left to write.
    """
    packer = msgpack.Packer(use_bin_type=True)
    pieces: list[bytes | tuple[str, str, tuple[int, ...]]] = []
    pieces.append(packer.pack_map_header(7))
    for key, value in (
        ("v", PROTOCOL_VERSION),
        ("dataset", dataset),
        ("fingerprint", fingerprint),
        ("epoch", epoch),
        ("batch", batch),
    ):
        pieces.append(packer.pack(key) + packer.pack(value))
    pieces.append(packer.pack("index"))
    pieces.append(("index", "<i8", (rows,)))
    pieces.append(packer.pack("fields") + packer.pack_map_header(len(fields)))
    for name, (dtype, shape) in fields.items():
        pieces.append(packer.pack(name))
        pieces.append((name, wire_dtype(dtype), (rows, *(int(s) for s in shape))))

    # Header bytes, each followed by the data region of the array it introduces (or none).
    # The pad before each region depends on where it lands, so offsets are computed in order.
    chunks: list[tuple[bytes, int]] = []
    regions: dict[str, tuple[int, str, tuple[int, ...]]] = {}
    offset = 0
    for piece in pieces:
        if isinstance(piece, bytes):
            chunks.append((piece, 0))
            offset += len(piece)
            continue
        name, dt, shape = piece
        nbytes = math.prod(shape) * np.dtype(dt).itemsize
        head = (
            packer.pack_map_header(4)
            + packer.pack("dtype")
            + packer.pack(dt)
            + packer.pack("shape")
            + packer.pack(list(shape))
            + packer.pack("pad")
        )
        tail = packer.pack("data") + _BIN32 + struct.pack(">I", nbytes)
        pad = (-(offset + len(head) + 2 + len(tail))) % ALIGN  # 2: the bin8 header of "pad"
        chunk = head + b"\xc4" + bytes([pad]) + bytes(pad) + tail
        chunks.append((chunk, nbytes))
        offset += len(chunk)
        regions[name] = (offset, dt, shape)
        offset += nbytes

    body = np.empty(offset, dtype=np.uint8) if alloc is None else alloc(offset)
    if body.shape != (offset,) or body.dtype != np.uint8 or not body.flags.writeable:
        raise ValueError(f"alloc({offset}) must return a writable uint8 array of that length")
    pos, raw = 0, memoryview(body).cast("B")  # type: ignore[arg-type]
    for chunk, skip in chunks:
        raw[pos : pos + len(chunk)] = chunk
        pos += len(chunk) + skip
    views: dict[str, NDArray[Any]] = {}
    for name, (start, dt, shape) in regions.items():
        nbytes = math.prod(shape) * np.dtype(dt).itemsize
        views[name] = body[start : start + nbytes].view(dt).reshape(shape)
    index = views.pop("index")
    return Layout(body=body, index=index, fields=views)


@dataclass(frozen=True, slots=True)
class Batch:
    """A decoded batch: metadata plus arrays that view the received buffer."""

    dataset: str
    fingerprint: str
    epoch: int
    batch: int
    index: NDArray[np.int64]
    fields: dict[str, NDArray[Any]]


class _Reader:
    """A cursor over a msgpack buffer for the subset a batch uses.

    ``bin`` values come back as (offset, length), never copied.
    """

    __slots__ = ("buf", "depth", "pos")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0
        self.depth = 0

    def _take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise WireError(f"body truncated at byte {self.pos}: needs {n} more bytes")
        view = self.buf[self.pos : end]
        self.pos = end
        return view

    def _uint(self, n: int) -> int:
        return int.from_bytes(self._take(n), "big")

    def value(self) -> Any:
        if self.depth > _MAX_DEPTH:
            raise WireError(f"nesting deeper than {_MAX_DEPTH} at byte {self.pos}")
        self.depth += 1
        try:
            return self._value()
        finally:
            self.depth -= 1

    def _value(self) -> Any:
        b = self._take(1)[0]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self._map(b & 0x0F)
        if 0x90 <= b <= 0x9F:
            return [self.value() for _ in range(b & 0x0F)]
        if 0xA0 <= b <= 0xBF:
            return self._str(b & 0x1F)
        match b:
            case 0xC0:
                return None
            case 0xC2:
                return False
            case 0xC3:
                return True
            case 0xC4 | 0xC5 | 0xC6:
                n = self._uint(1 << (b - 0xC4))
                start = self.pos
                self._take(n)
                return _Bin(start, n)
            case 0xCA:
                return struct.unpack(">f", self._take(4))[0]
            case 0xCB:
                return struct.unpack(">d", self._take(8))[0]
            case 0xCC | 0xCD | 0xCE | 0xCF:
                return self._uint(1 << (b - 0xCC))
            case 0xD0 | 0xD1 | 0xD2 | 0xD3:
                return int.from_bytes(self._take(1 << (b - 0xD0)), "big", signed=True)
            case 0xD9 | 0xDA | 0xDB:
                return self._str(self._uint(1 << (b - 0xD9)))
            case 0xDC | 0xDD:
                return [self.value() for _ in range(self._uint(2 if b == 0xDC else 4))]
            case 0xDE | 0xDF:
                return self._map(self._uint(2 if b == 0xDE else 4))
        raise WireError(f"unsupported msgpack type byte 0x{b:02x} at byte {self.pos - 1}")

    def _str(self, n: int) -> str:
        try:
            return bytes(self._take(n)).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireError(f"invalid UTF-8 string at byte {self.pos - n}") from exc

    def _map(self, n: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for _ in range(n):
            key = self.value()
            if not isinstance(key, str):
                raise WireError(f"map key {key!r} is not a string")
            out[key] = self.value()
        return out


@dataclass(frozen=True, slots=True)
class _Bin:
    start: int
    length: int


def _array(buf: Any, spec: Any, what: str, rows: int | None) -> NDArray[Any]:
    if not isinstance(spec, dict) or not {"dtype", "shape", "data"} <= spec.keys():
        raise WireError(f"{what}: expected a map with dtype, shape and data")
    dtype, shape, data = spec["dtype"], spec["shape"], spec["data"]
    if dtype not in ALLOWED_DTYPES:
        raise WireError(
            f"{what}: dtype {dtype!r} is not allowed; allowed: {sorted(ALLOWED_DTYPES)}"
        )
    if not isinstance(shape, list) or not shape or not all(is_int(s) and s >= 0 for s in shape):
        raise WireError(f"{what}: shape {shape!r} is not a list of non-negative ints")
    if not isinstance(data, _Bin):
        raise WireError(f"{what}: data is not a bin")
    if rows is not None and shape[0] != rows:
        raise WireError(f"{what}: {shape[0]} rows, but the batch has {rows}")
    count = 1
    for s in shape:
        count *= s
    itemsize = np.dtype(dtype).itemsize
    if count * itemsize != data.length:
        raise WireError(
            f"{what}: shape {shape} x {dtype} is {count * itemsize} bytes, data holds {data.length}"
        )
    return np.frombuffer(buf, dtype=dtype, count=count, offset=data.start).reshape(shape)


def decode_batch(buf: bytes | bytearray | memoryview | NDArray[np.uint8]) -> Batch:
    """Decode a batch body without copying its arrays.

    The arrays view ``buf``: they are writable exactly when ``buf`` is, and keep it alive.
    Raises :class:`WireError` naming what is wrong for anything but a well-formed batch.
    """
    view = memoryview(buf).cast("B")  # type: ignore[arg-type]  # ndarray is a Buffer
    reader = _Reader(view)
    top = reader.value()
    if reader.pos != len(view):
        raise WireError(f"{len(view) - reader.pos} trailing bytes after the batch map")
    if not isinstance(top, dict):
        raise WireError("body is not a msgpack map")
    if top.get("v") != PROTOCOL_VERSION:
        raise WireError(
            f"protocol version {top.get('v')!r}; this client speaks {PROTOCOL_VERSION}: "
            "upgrade the client or the server so they match"
        )
    for key, kind in (("dataset", str), ("fingerprint", str), ("epoch", int), ("batch", int)):
        if not isinstance(top.get(key), kind):
            raise WireError(f"field {key!r} missing or not {kind.__name__}")
    index = _array(buf, top.get("index"), "index", None)
    if index.dtype != np.dtype("<i8") or index.ndim != 1:
        raise WireError("index must be a 1-d <i8 array")
    fields_spec = top.get("fields")
    if not isinstance(fields_spec, dict):
        raise WireError("fields is not a map")
    rows = len(index)
    fields = {
        name: _array(buf, spec, f"field {name!r}", rows) for name, spec in fields_spec.items()
    }
    return Batch(
        dataset=top["dataset"],
        fingerprint=top["fingerprint"],
        epoch=top["epoch"],
        batch=top["batch"],
        index=index,
        fields=fields,
    )
