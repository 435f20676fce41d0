"""The pack format, version 1: its on-disk layout; open a dataset, verify it.

A dataset is a directory; its name is the dataset's name::

    NAME/
    ├── batchd.header      magic, version, JSON (fields, count, checksums, ...), header checksum
    ├── <field>.raw        fixed-shape field: count x shape x dtype, C-contiguous, from byte 0
    ├── <field>.data       encoded field: the original JPEG/PNG bytes, back to back
    ├── <field>.offsets    encoded field: int64 LE, count + 1 entries; sample i is data[o[i]:o[i+1]]
    └── <field>.sizes      encoded field: int32 LE, count x 2 (height, width) of each decoded image

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

This module reads a dataset (:class:`Dataset`, :func:`open_dataset`) and checks it
(:func:`verify`); the header's constants, :class:`FieldSpec` and the header reader are
in :mod:`batchd_server.header`, writing is :mod:`batchd_server.writer`.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import os
import re
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import xxhash
from numpy.typing import NDArray

from ..errors import FormatError, StaleError
from ..progress import progress_bar
from . import lease
from .codec import decode_image
from .direct import ALIGN, DirectFile, DirectReadError, Staged, open_direct
from .header import (
    HEADER_NAME,
    MAX_BYTES,
    RESERVED,
    Encoding,
    FieldSpec,
    fingerprint_of,
    open_in,
    read_header,
)

__all__ = [
    "Dataset",
    "ReadStats",
    "open_dataset",
    "verify",
]

log = logging.getLogger("batchd.format")


# preadv2(RWF_NOWAIT) returns what the page cache holds and never waits on storage
# (Linux 4.14+); where a kernel or filesystem refuses it, reads are simply not split.
_nowait_reads = hasattr(os, "RWF_NOWAIT")


def _read_ready(fd: int, buf: memoryview, offset: int) -> int:
    """Bytes of ``buf`` filled from the page cache alone (0 if its first page is not there)."""
    global _nowait_reads
    try:
        return os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return 0
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        _nowait_reads = False
        log.info("preadv2(RWF_NOWAIT) is refused here (%s): read-ahead hits are not counted", exc)
        return 0


_TEMP_MARK = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$")


@dataclass
class ReadStats:
    """What the ``preadv`` reads of one pack found: ready in the page cache, or waited for.

    Each read first asks for its bytes with ``RWF_NOWAIT``, which returns what the page
    cache holds and never waits on storage. What it cannot return is read again,
    blocking, and that time is the wait. So ``ready_bytes / (ready_bytes +
    waited_bytes)`` is the hit rate of the read-ahead (and of the page cache), and
    ``wait_s`` the time gather threads spent blocked on the disk. Reads through the
    memory map (a resident pack under a read lease) are not counted here.
    """

    ready_bytes: int = 0
    waited_bytes: int = 0
    wait_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, ready: int, waited: int, wait_s: float) -> None:
        with self._lock:
            self.ready_bytes += ready
            self.waited_bytes += waited
            self.wait_s += wait_s

    def hit_rate(self) -> float | None:
        """The share of bytes read that were already in the page cache; None before any."""
        total = self.ready_bytes + self.waited_bytes
        return None if total == 0 else self.ready_bytes / total


class Dataset:
    """An open, validated dataset: raw fields memory-mapped, encoded fields indexable.

    Build it with :func:`open_dataset`. Arrays stay mapped for the Dataset's life;
    call :meth:`check` before reading if the files could have changed since open.
    """

    def __init__(self, path: Path, header: dict[str, Any], dir_fd: int | None = None) -> None:
        """``dir_fd``: the directory ``header`` was read from; the files are opened in it."""
        self.path = path
        self._dir_fd = dir_fd
        self.name = path.name
        self.header = header
        self.count: int = header["count"]
        self.classes: list[str] | None = header.get("classes")
        self.fingerprint = fingerprint_of(header)
        #: Bytes of all the pack's data files (what the page cache would hold).
        self.nbytes: int = sum(int(rec["size"]) for rec in header["files"].values())
        self.fields: dict[str, FieldSpec] = {}
        self._files: dict[str, IO[bytes]] = {}
        self._stats: dict[str, tuple[int, int, int]] = {}
        self._maps: dict[str, np.ndarray[Any, Any]] = {}
        self._lease: lease.Lease | None = None
        self._no_lease = "not taken"
        self._unmapped: str | None = None  # why mapped reads are off (set_read_path)
        #: data file of a field of big rows -> its O_DIRECT twin, while reads go past the cache
        self._direct: dict[str, DirectFile] = {}
        self._no_direct: str | None = None  # why direct reads were asked for and refused
        #: What the ``preadv`` reads found in the page cache and what they waited for.
        self.read_stats = ReadStats()
        # A replaced or removed pack is dropped, not closed (batches may still read it):
        # its files close when the last reference goes, without a ResourceWarning.
        weakref.finalize(self, _close_files, self._files)
        try:
            self._open_all()
            self._dir_fd = None  # the caller closes it
            self._take_lease()
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
            if spec.name in RESERVED:
                raise FormatError(hpath, f"field name {spec.name!r} is reserved for sample ids")
            self.fields[spec.name] = spec
            names.extend(spec.files())
        if sorted(names) != sorted(self.header["files"]):
            raise FormatError(
                hpath,
                f"the files table {sorted(self.header['files'])} "
                f"does not match the fields {sorted(names)}",
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

    def _take_lease(self) -> None:
        mapped = [
            self._files[f].fileno() for f, a in self._maps.items() if isinstance(a, np.memmap)
        ]
        if not mapped:
            self._no_lease = "nothing is mapped"
            return
        got = lease.take(mapped, str(self.path))
        if isinstance(got, str):
            self._no_lease = got
            if lease.enabled():
                log.info("%s: %s; samples are read with preadv (slower, as safe)", self.path, got)
            return
        # A file shrunk after _map checked its size and before the lease would be read
        # past its end: with the lease held, sizes can no longer change, so check now.
        for fname, f in self._files.items():
            if os.fstat(f.fileno()).st_size != self._stats[fname][2]:
                got.release(f"{fname} changed size while the dataset was opened")
                break
        self._lease = got
        # A replaced dataset is dropped, not closed (batches may still be reading it):
        # give its lease and file duplicates back when it is collected.
        weakref.finalize(self, got.release, "the dataset was closed")

    @property
    def unmapped(self) -> str | None:
        """Why mapped reads were turned off by :meth:`set_read_path`, or None."""
        return self._unmapped

    def set_read_path(self, unmapped: str | None, *, direct: bool = False) -> None:
        """Read with ``preadv`` even under a lease, saying why (``None``: map again).

        A pack bigger than the memory the server may use thrashes when read through
        its mapping (a reclaimed page faults back in 4 KiB at a time); plain reads of
        whole samples, announced ahead with :meth:`willneed`, run at the disk's speed.
        ``direct``: read the fields of big rows (raw images, encoded samples averaging
        4 KiB or more) past the page cache instead (:mod:`.direct`, :meth:`staged`),
        where the kernel and the filesystem allow it.
        """
        self._unmapped = unmapped
        self._close_direct()
        if unmapped is not None and direct:
            self._open_direct()
        # Reads are announced exactly: the kernel's own read-ahead around a miss would
        # only fetch neighbours a uniform shuffle does not want next.
        advice = os.POSIX_FADV_NORMAL if unmapped is None else os.POSIX_FADV_RANDOM
        for f in self._files.values():
            with contextlib.suppress(OSError, ValueError):
                os.posix_fadvise(f.fileno(), 0, 0, advice)

    def _open_direct(self) -> None:
        opened: dict[str, DirectFile] = {}
        for spec in self.fields.values():
            # Small rows (labels) stay buffered: their file is small enough to stay in
            # the page cache, and a direct read would fetch a whole block per row.
            if not self._big_rows(spec):
                continue
            fname = spec.files()[0]
            f = self._files[fname]
            # The open file itself, re-opened: never a file renamed over it since.
            got = open_direct(f"/proc/self/fd/{f.fileno()}", str(self.path / fname))
            if isinstance(got, str):
                for d in opened.values():
                    d.close()
                self._no_direct = got
                log.info("%s: %s; reading with preadv", self.path, got)
                return
            opened[fname] = got
        self._direct = opened

    def _close_direct(self) -> None:
        direct, self._direct = self._direct, {}
        for d in direct.values():
            d.close()

    def _stored_row(self, spec: FieldSpec) -> float:
        """A field's bytes per sample on disk (the mean, for an encoded field)."""
        if spec.encoding == "raw":
            return _row_bytes(spec)
        o = self._maps[spec.files()[1]]
        return (int(o[-1]) - int(o[0])) / max(1, self.count)

    def _big_rows(self, spec: FieldSpec) -> bool:
        """True if a field's samples average a block (:data:`ALIGN`) or more on disk."""
        return self._stored_row(spec) >= ALIGN

    @property
    def buffered(self) -> bool:
        """True if bytes worth announcing ahead are read through the page cache: a field
        not read directly, of more than a few bytes a sample (labels do not count).
        """
        return any(
            spec.files()[0] not in self._direct and self._stored_row(spec) > _FEW_BYTES
            for spec in self.fields.values()
        )

    @property
    def direct_fields(self) -> tuple[str, ...]:
        """The fields read past the page cache now (:meth:`staged`); often none."""
        return tuple(n for n, s in self.fields.items() if s.files()[0] in self._direct)

    @contextlib.contextmanager
    def staged(self, name: str, ids: NDArray[np.integer]) -> Iterator[Staged]:
        """Samples ``ids`` of field ``name`` read past the page cache, all in flight at once.

        ``staged.row(k)`` is sample ``ids[k]`` as stored (a raw row's bytes, or an
        encoded sample's file bytes), once its own read is done (it waits for that one
        only), valid inside the block only. ``name`` must be one
        of :attr:`direct_fields`; a truncated file is a StaleError.
        """
        spec = self._spec(name)
        fname = spec.files()[0]
        d = self._direct.get(fname)
        if d is None:
            raise ValueError(f"{self.path}: direct reads are off for field {name!r}")
        at = np.asarray(ids, np.int64)
        if len(at) and (int(at.min()) < 0 or int(at.max()) >= self.count):
            raise IndexError(f"sample ids out of range for {self.count} samples")
        size: int | NDArray[np.int64]
        if spec.encoding == "raw":
            size = _row_bytes(spec)
            offsets = at * size
            nbytes = size * len(at)
        else:
            o = self._maps[spec.files()[1]]  # in memory (loaded at open)
            offsets = o[at].astype(np.int64)
            size = o[at + 1].astype(np.int64) - offsets
            nbytes = int(size.sum())
        try:
            got = d.read(offsets, size)
        except (DirectReadError, OSError, ValueError) as exc:  # ValueError: closed meanwhile
            raise StaleError(self.path / fname, f"direct read failed: {exc}") from None
        try:
            yield got
        except DirectReadError as exc:  # from a row the block waited for
            raise StaleError(self.path / fname, f"direct read failed: {exc}") from None
        finally:
            got.release()
            self.read_stats.add(0, nbytes, got.waited_s)

    @property
    def reads(self) -> str:
        """How samples are read now: ``mapped (read lease)`` or ``preadv (why not mapped)``."""
        if self._direct:
            return f"direct ({self._unmapped}: O_DIRECT + native AIO, past the page cache)"
        if self._unmapped is not None:
            why = "" if self._no_direct is None else f"; {self._no_direct}"
            return f"preadv ({self._unmapped}: read ahead by the permutation{why})"
        if self._lease is not None and self._lease.held:
            return "mapped (read lease)"
        if self._lease is not None:
            return f"preadv ({self._lease.why})"
        return f"preadv ({self._no_lease})"

    @contextlib.contextmanager
    def mapped(self) -> Iterator[bool]:
        """True if :meth:`array` may be read directly until the block ends.

        That holds while a read lease is held (see batchd_server.lease): no process
        can then shrink the files, so reading the mapping cannot SIGBUS. Otherwise
        read with :meth:`read_rows` / :meth:`read_row`. Keep blocks short: a writer
        waits for them to end.
        """
        if self._lease is None or self._unmapped is not None:
            yield False
            return
        with self._lease.hold() as ok:
            yield ok

    def willneed(self, ids: NDArray[np.integer]) -> int:
        """Ask the kernel to start reading samples ``ids`` of every field not read
        directly (:attr:`direct_fields`); returns the bytes.

        ``posix_fadvise(WILLNEED)`` queues the reads and returns without waiting for
        them, so one call per run of consecutive ids keeps the disk's queue full from
        one thread; the gather then finds whole samples in the page cache.
        """
        return self._advise(ids, os.POSIX_FADV_WILLNEED)

    def dontneed(self, ids: NDArray[np.integer]) -> int:
        """Let the kernel drop samples ``ids`` from the page cache now (they were read).

        For a pack bigger than memory: a sample read for this epoch is, in a uniform
        shuffle, no more likely to be needed soon than any other, and dropping it at
        once spares the next reads a round of reclaim under a memory limit.
        """
        return self._advise(ids, os.POSIX_FADV_DONTNEED)

    def _advise(self, ids: NDArray[np.integer], advice: int) -> int:
        if len(ids) == 0:
            return 0
        order = np.unique(np.asarray(ids, dtype=np.int64))
        runs = [0, *(np.flatnonzero(np.diff(order) != 1) + 1).tolist(), len(order)]
        spans: list[tuple[str, int, int]] = []
        for spec in self.fields.values():
            if spec.files()[0] in self._direct:
                continue  # read past the page cache: announcing it would only fill the cache
            if spec.encoding == "raw":
                row = _row_bytes(spec)
                fname = spec.files()[0]
                for a, b in itertools.pairwise(runs):
                    spans.append(
                        (fname, int(order[a]) * row, (int(order[b - 1]) + 1 - int(order[a])) * row)
                    )
            else:
                data, offs, _ = spec.files()
                o = self._maps[offs]
                for a, b in itertools.pairwise(runs):
                    lo, hi = int(o[order[a]]), int(o[order[b - 1] + 1])
                    spans.append((data, lo, hi - lo))
        total = 0
        for fname, offset, length in spans:
            f = self._files.get(fname)
            if f is None or length <= 0:
                continue
            with contextlib.suppress(OSError, ValueError):  # closed meanwhile: nothing to do
                os.posix_fadvise(f.fileno(), offset, length, advice)
                total += length
        return total

    def _map(
        self, fname: str, dtype: np.dtype[Any], shape: tuple[int, ...], *, load: bool = False
    ) -> np.ndarray[Any, Any]:
        fpath = self.path / fname
        want = math.prod(shape) * dtype.itemsize
        if want > MAX_BYTES:
            raise FormatError(fpath, f"the header implies {want} bytes, which no file can hold")
        if self.header["files"][fname]["size"] != want:
            raise FormatError(
                self.path / HEADER_NAME,
                f"{fname}: the files table says {self.header['files'][fname]['size']} bytes, "
                f"the fields imply {want}",
            )
        try:
            # Opened in the directory the header came from: a pack swapped in by
            # rename meanwhile cannot pair the old header with the new files.
            f = open_in(fpath, self._dir_fd)  # kept open for check()
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

    def _spec(self, name: str, encoding: Encoding | None = None) -> FieldSpec:
        """Field ``name``; KeyError naming the fields if there is none, ValueError if it
        is not stored as ``encoding`` (any storage when None)."""
        spec = self.fields.get(name)
        if spec is None:
            raise KeyError(
                f"dataset {self.name!r} has no field {name!r} (fields: {sorted(self.fields)})"
            )
        if encoding is not None and spec.encoding != encoding:
            raise ValueError(f"field {name!r} is {spec.encoding}-encoded, not {encoding}")
        return spec

    def array(self, name: str) -> np.ndarray[Any, Any]:
        """A raw field as a read-only ``np.memmap`` of shape ``(count, *shape)``."""
        spec = self._spec(name, "raw")
        return self._maps[spec.files()[0]]

    def stored(self, name: str) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
        """An encoded field's data file as a read-only mapping, and its ``count + 1``
        offsets: sample ``i`` as stored is ``data[offsets[i]:offsets[i + 1]]``.

        The server reads the mapping only inside a :meth:`mapped` block that yielded
        True, as it reads :meth:`array`'s.
        """
        data, offs, _ = self._spec(name, "image").files()
        return np.asarray(self._maps[data]), self._maps[offs]

    # --- reads that cannot SIGBUS (the server's path) ----------------------------
    # Touching a mapped page past the end of a file truncated since it was mapped is a
    # SIGBUS, which kills the whole server; check() narrows the window but cannot close
    # it. The server reads the mappings only inside mapped(), while a read lease stops
    # anyone from shrinking the files. Otherwise it reads with os.preadv into its own
    # buffers, where a truncation is a short read, reported as StaleError.

    def _read_at(self, fname: str, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from ``fname`` at ``offset``; StaleError on a short read.

        What the page cache holds is taken without waiting (``RWF_NOWAIT``) and the
        rest read blocking; both are counted in :attr:`read_stats`.
        """
        f = self._files.get(fname)
        if f is None:
            raise FormatError(self.path, "the dataset is closed")
        want = len(buf)
        done = 0
        counted = _nowait_reads
        try:
            fd = f.fileno()
            if counted and want:
                done = _read_ready(fd, buf, offset)
                counted = _nowait_reads  # False if this kernel just refused it
        except (OSError, ValueError) as exc:  # ValueError: closed by another thread
            raise StaleError(self.path / fname, f"read at byte {offset} failed: {exc}") from None
        ready = done
        t0 = time.perf_counter()
        while done < want:
            try:
                n = os.preadv(fd, [buf[done:]], offset + done)
            except (OSError, ValueError) as exc:
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
        if counted:
            waited = want - ready
            self.read_stats.add(ready, waited, time.perf_counter() - t0 if waited else 0.0)

    def read_rows(self, name: str, ids: NDArray[np.integer], out: NDArray[Any]) -> None:
        """Copy samples ``ids`` of raw field ``name`` into ``out``.

        ``out`` is C-contiguous, of shape ``(len(ids), *shape)`` and the field's dtype.
        Consecutive ids are read with one call; a truncated file is a StaleError.
        """
        spec = self._spec(name, "raw")
        assert spec.shape is not None
        if out.shape != (len(ids), *spec.shape) or out.dtype != spec.dtype:
            raise ValueError(
                f"out is {out.dtype} {out.shape}, "
                f"field {name!r} needs {spec.dtype} {(len(ids), *spec.shape)}"
            )
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
        if len(ids) == 0:
            return
        if int(ids.min()) < 0 or int(ids.max()) >= self.count:
            raise IndexError(f"sample ids out of range for {self.count} samples")
        row = _row_bytes(spec)
        if spec.files()[0] in self._direct:
            rows = out.reshape(-1).view(np.uint8).reshape(len(ids), row)
            with self.staged(name, ids) as got:
                for k in range(len(ids)):
                    rows[k] = got.row(k)
            return
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

    def image(self, name: str, i: int) -> NDArray[np.uint8]:
        """Sample ``i`` of an encoded field, decoded: ``HxWxC`` images (C is 3 or 1), ``HxW`` masks.

        The shape is the one a raw field of the same role has, whatever the storage.
        """
        return self.decode(name, self._index(i), self.encoded(name, i))

    def decode(
        self, name: str, i: int, stored: bytes | memoryview | NDArray[np.uint8]
    ) -> NDArray[np.uint8]:
        """Sample ``i`` of encoded field ``name`` decoded from ``stored``, its bytes as read
        (:meth:`encoded`, or a :meth:`staged` row); FormatError if they do not decode
        to the recorded size.
        """
        spec = self._spec(name, "image")
        mask = spec.role == "mask"
        img = decode_image(stored, spec.channels or 3, mask=mask)
        if img is None or img.shape[:2] != tuple(self.sizes(name)[i]):
            raise FormatError(
                self.path / spec.files()[0],
                f"field {name!r} sample {i} does not decode to the recorded size; "
                "run `batchd verify`",
            )
        return img if img.ndim == 3 or mask else img[:, :, None]

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
        if self._lease is not None:
            self._lease.release("the dataset was closed")
        self._close_direct()
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


_FEW_BYTES = 256
"""A field of this many bytes a sample or fewer (labels) is not worth announcing: its
file is small beside the images', and stays in the page cache."""


def _row_bytes(spec: FieldSpec) -> int:
    """Bytes of one sample of a raw field."""
    return spec.dtype.itemsize * math.prod(spec.shape or ())


def _close_files(files: dict[str, IO[bytes]]) -> None:
    for f in files.values():
        f.close()
    files.clear()


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
    try:  # one directory for the header and the files, even if p is renamed meanwhile
        dir_fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise FormatError(p, f"cannot be opened: {exc.strerror}") from None
    try:
        return Dataset(p, read_header(p, dir_fd), dir_fd)
    finally:
        os.close(dir_fd)


def verify(path: str | Path, *, progress: bool = False) -> None:
    """Re-read every data file and compare each chunk's checksum.

    Raises FormatError on the first bad chunk.
    """
    with open_dataset(path) as ds:
        chunk = ds.header["chunk_size"]
        files = ds.header["files"]
        total = sum(rec["size"] for rec in files.values())
        bar = progress_bar(total, "verify", "B", progress)
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
                    f"chunk {k}/{n} (bytes {lo}-{hi}) does not match its checksum: "
                    "corrupt; repack the dataset",
                )
            whole.update(buf)
            advance(len(buf))
        if f.read(1):
            raise FormatError(fpath, f"longer than the {rec['size']} bytes the header records")
    if whole.hexdigest() != rec["xxh3_64"]:
        raise FormatError(
            fpath, "whole-file checksum mismatch (chunks agree): corrupt header entry"
        )
