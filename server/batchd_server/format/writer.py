"""Writing a dataset: :class:`DatasetWriter` streams samples into a new directory.

Writing is atomic: files go to ``.NAME.tmp-XXXXXXXX`` beside ``NAME`` (a name that
:func:`~batchd_server.format.open_dataset` refuses), are fsynced, and the directory is
renamed into place.
Each data file is checksummed, per ``chunk_size`` chunk and whole, as it is written;
the header (see :mod:`batchd_server.header`) records the sums.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import xxhash
from numpy.typing import NDArray

from batchd import __version__

from ..errors import PackError
from .header import (
    BOM,
    CHUNK_SIZE,
    FORMAT_VERSION,
    HEADER_NAME,
    MAGIC,
    PREFIX,
    RESERVED,
    SUFFIX,
    FieldSpec,
)

__all__ = [
    "DatasetWriter",
    "Encoded",
]


@dataclass(frozen=True)
class Encoded:
    """One encoded image for the writer: its bytes and decoded size."""

    data: bytes | memoryview
    height: int
    width: int


def _view(buf: bytes | memoryview | NDArray[Any]) -> memoryview:
    # numpy's stubs do not declare the buffer protocol on ndarray; it has it.
    return memoryview(cast(bytes, buf))


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
        try:  # as mkdir -p does: a new data folder is the usual first step
            out.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise PackError(f"{out}: {out.parent} exists and is not a folder") from None
        except OSError as exc:
            raise PackError(
                f"{out}: cannot create the folder {out.parent}: {exc.strerror}"
            ) from None
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
            if f.name in RESERVED:
                raise PackError(
                    f"field name {f.name!r} is reserved (batches carry sample ids under it); "
                    "rename it"
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
        """One sample.

        A raw field's value is an array of exactly its shape and dtype, an encoded
        field's an :class:`Encoded`.
        """
        raw = {f.name for f in self.fields if f.encoding == "raw"}
        # Built from the sample's own keys, so append_block refuses a missing or extra field.
        block = {k: np.asarray(v)[None] if k in raw else [v] for k, v in sample.items()}
        self.append_block(block, 1)

    def append_block(self, block: Mapping[str, Any], n: int) -> None:
        """``n`` samples.

        Raw fields as ``(n, *shape)`` arrays, encoded fields as ``n`` :class:`Encoded`.
        """
        if set(block) != {f.name for f in self.fields}:
            raise PackError(
                f"a block has fields {sorted(block)}, "
                f"the dataset {sorted(f.name for f in self.fields)}"
            )
        for spec in self.fields:
            v = block[spec.name]
            if spec.encoding == "raw":
                assert spec.shape is not None
                arr = np.asarray(v)
                rows = arr.shape[0] if arr.ndim else 0
                if rows != n:  # else the message below would name two equal shapes
                    raise PackError(f"field {spec.name!r}: {rows} samples for {n}")
                if arr.shape != (n, *spec.shape) or arr.dtype != spec.dtype:
                    raise PackError(
                        f"field {spec.name!r}: got {arr.dtype} {arr.shape[1:]}, "
                        f"the dataset holds {spec.dtype} {spec.shape}"
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
                        f"field {spec.name!r}: expected non-empty Encoded images, "
                        f"got {type(e).__name__}"
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
            head = PREFIX.pack(MAGIC, FORMAT_VERSION, BOM, len(body)) + body
            with open(self.tmp / HEADER_NAME, "xb") as f:
                f.write(head + SUFFIX.pack(xxhash.xxh3_64_intdigest(head)))
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
