"""Batch bodies in POSIX shared memory, for trainers on the same host.

Over a unix socket or a loopback address the client is necessarily on this host, so
instead of copying a 38 MB body into every trainer's socket the server can name the
file the body lives in and let the trainer map it (docs/protocol.md, "Shared-memory
bodies")::

    /dev/shm/batchd-<pid>-<random>/        mode 0700, made at start, removed at shutdown
        .alive                             flock()ed while the server lives
        b-<n>                              one finished body, exactly its length, mode 0600

A server killed before it could remove its directory (SIGKILL, the OOM killer) leaves
it behind; the next server of the same user to start removes every directory whose
``.alive`` lock is free.

A new body is gathered into a private scratch buffer (:meth:`ShmArena.allocate`,
recycled, so its pages are already faulted in), then :meth:`ShmArena.seal` copies it into
a fresh file with ``pwrite`` and returns a mapping of the file as the body. Why not gather
straight into a fresh shared mapping: /dev/shm has 4 KiB pages, and filling the page
tables of a fresh 38 MB shared mapping cost ~25 ms a body on the reference VM against
~13 ms for fallocate + pwrite.

Both are far more than the gather itself, so files are **recycled**. A body file lives
as long as the server holds the body (the sealed array carries a ``weakref.finalize``;
every view keeps it alive) or a client may still map it. Every answer that names a file
*lends* it with a random token (:meth:`ShmArena.lend`); a batchd client gives the token
back (:meth:`ShmArena.release`, the ``X-Batchd-Shm-Release`` header of a later request)
once its arrays over the mapping are gone. When the body dies:

- lent to no one: the file goes back to a small free pool (at most ``idle_bytes``) with
  its pages and the server's page tables in place, and the next body of that size is
  gathered straight into it (:meth:`allocate` hands out the mapping), under a new name.
  No zeroing, no pwrite, no faults: 23 ms a 38 MB body cheaper here;
- still lent (a client that has not released it, has died, or is not the batchd
  client): the file is unlinked, as before recycling existed. Unlinking never disturbs a
  mapping: every trainer that mapped the file keeps its pages until it unmaps them. A
  trainer that asks for a path the server has just dropped gets ``ENOENT`` and asks
  again for the ordinary body.

So a file is rewritten only when every client it was named to has said it no longer maps
it, and a name is never reused: a recycled file is renamed before it is named again.

Pages are reserved with ``posix_fallocate`` before they are written, so a full
/dev/shm (Docker's default is 64 MB) is an ``OSError`` and never a SIGBUS: the body
then stays in private memory and is sent over the socket (:meth:`ShmArena.seal` never
fails for lack of shared memory).

Two bounds keep the files cheap. Bodies under ``min_bytes`` (1 MiB) stay private: a
file, a mapping and a second request for them cost more than the copy they save. And
Python's ``mmap`` keeps a duplicate of the file's descriptor for as long as the mapping
lives, so at most ``max_files`` bodies (half the process's descriptor limit, at most
4096) are files at once; beyond that a body is sent over the socket. Without that
bound a cache full of small bodies ran the server out of descriptors, and accepting a
connection failed with EMFILE.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import mmap
import os
import resource
import secrets
import shutil
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from ..errors import ConfigError

__all__ = ["SHM_ROOT", "ShmArena"]

log = logging.getLogger("batchd.shm")

#: Where POSIX shared memory lives on Linux; clients refuse paths outside it.
SHM_ROOT = Path("/dev/shm")
#: madvise(2) advice (Linux 5.14): fault in writable page tables for a whole range at once.
#: Python's mmap module does not name it; older kernels answer EINVAL, which is ignored.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


@dataclass(eq=False)
class _File:
    """One body file and the server's read-write mapping of it."""

    mm: mmap.mmap
    path: str  # its current name
    sealed: bool = False  # holds a finished body (else: being gathered into)
    populated: bool = False  # the server's page tables for it are filled
    lends: set[str] = field(default_factory=set)  # release tokens not given back yet

    @property
    def size(self) -> int:
        return len(self.mm)


_LOCK = ".alive"  # never a body's name (those are b-<n>)


def _remove_orphans(root: Path, *, keep: Path) -> int:
    """Remove the body directories of dead servers of this user; how many were removed.

    A server's directory is orphaned when the lock it held is free: flock() locks go
    with the process, in any PID namespace that shares this /dev/shm. A directory
    without a lock file is left alone (it may be one being created right now).
    """
    removed = 0
    for d in root.glob("batchd-*"):
        try:
            if d == keep or d.is_symlink() or d.stat().st_uid != os.getuid():
                continue
            fd = os.open(d / _LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: its server is alive
        finally:
            os.close(fd)
        shutil.rmtree(d, ignore_errors=True)
        removed += 1
    return removed


def _default_max_files() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 4096 if soft == resource.RLIM_INFINITY else max(16, min(4096, soft // 2))


class ShmArena:
    """A private directory of shared-memory body files; one per server process.

    Thread-safe: bodies are allocated on pool threads and dropped on any thread.
    ``keep``: scratch buffers kept for reuse (about the batches computed at once);
    ``idle_bytes``: body files kept for recycling once no one maps them;
    ``min_bytes`` and ``max_files``: the bounds in the module docstring.
    """

    def __init__(
        self,
        root: str | Path = SHM_ROOT,
        *,
        keep: int = 4,
        idle_bytes: int = 128 << 20,
        min_bytes: int = 1 << 20,
        max_files: int | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ConfigError(
                f"--shm needs {root} (POSIX shared memory), which is not a directory here; "
                "pass --no-shm"
            )
        name = f"batchd-{os.getpid()}-{secrets.token_hex(4)}"
        self.dir = root / name
        try:
            # 0700: the file names are only ever given to clients of our own socket.
            self.dir.mkdir(mode=0o700)
            # Held until this process ends, however it ends: a directory whose lock can
            # be taken belongs to a server that died without removing it (SIGKILL, OOM).
            self._alive = os.open(self.dir / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._alive, fcntl.LOCK_EX)
        except OSError as exc:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise ConfigError(
                f"--shm cannot create {self.dir}: {exc.strerror}; pass --no-shm"
            ) from exc
        removed = _remove_orphans(root, keep=self.dir)
        if removed:
            log.info("removed %d shared-memory directories of servers no longer running", removed)
        self._lock = threading.Lock()
        self._bodies: dict[int, _File] = {}  # id(body array) -> its file
        self._free: list[_File] = []  # recyclable: no body, lent to no one
        self._lends: dict[str, _File] = {}  # release token -> the file it was lent
        self._files = 0  # _File objects alive (each mapping holds a descriptor)
        self._made = self._recycled = 0  # bodies sealed into a new file, a recycled one
        self._seq = itertools.count()
        self._closed = False
        self._warned = False
        self._keep = keep
        self._scratch: list[NDArray[np.uint8]] = []
        self.idle_bytes = idle_bytes
        self.min_bytes = min_bytes
        self.max_files = _default_max_files() if max_files is None else max_files

    def allocate(self, n: int) -> NDArray[np.uint8]:
        """A writable ``n``-byte buffer to gather a body into; pass it to :meth:`seal`.

        A recycled file of exactly ``n`` bytes if one is free (the body is gathered
        straight into shared memory), else a scratch buffer: buffers come back from
        :meth:`seal`, so a job's same-sized batches reuse memory already faulted in.
        """
        with self._lock:
            for i, f in enumerate(self._free):
                if f.size == n:
                    del self._free[i]
                    break
            else:
                for i, buf in enumerate(self._scratch):
                    if buf.size == n:
                        return self._scratch.pop(i)
                return np.empty(n, dtype=np.uint8)
        if not f.populated:  # one call instead of a fault per 4 KiB page
            f.populated = True
            with contextlib.suppress(OSError):
                f.mm.madvise(_MADV_POPULATE_WRITE)
        buf = np.frombuffer(f.mm, dtype=np.uint8)
        with self._lock:
            self._bodies[id(buf)] = f
        weakref.finalize(buf, self._dead, id(buf), f)
        return buf

    def seal(self, buf: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """The finished body ``buf`` (from :meth:`allocate`) as an array over a body file.

        ``buf`` must not be used afterwards: a scratch buffer is recycled. When the
        arena is closed, shared memory is full, the body is under ``min_bytes`` or
        ``max_files`` bodies are files already, ``buf`` itself is returned (it has no
        :meth:`path_of`; the body is sent over the socket).
        """
        with self._lock:
            f = self._bodies.get(id(buf))
        if f is not None:  # gathered into a recycled file: name it anew
            path = str(self.dir / f"b-{next(self._seq)}")
            try:
                os.rename(f.path, path)
            except OSError as exc:  # the arena was closed meanwhile
                return self._fallback(buf.copy(), exc)
            with self._lock:
                f.path, f.sealed = path, True
                self._recycled += 1
            buf.flags.writeable = False
            return buf
        return self._new_file(buf)

    def _new_file(self, scratch: NDArray[np.uint8]) -> NDArray[np.uint8]:
        n = scratch.nbytes
        if n <= 0 or n < self.min_bytes or self._closed:
            return scratch
        with self._lock:
            if self._files >= self.max_files:
                return scratch
            self._files += 1
        path = str(self.dir / f"b-{next(self._seq)}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._forget()
            return self._fallback(scratch, exc)
        try:
            try:
                os.posix_fallocate(fd, 0, n)  # reserve now: ENOSPC here, not SIGBUS later
                data, pos = memoryview(scratch).cast("B"), 0  # type: ignore[arg-type]
                while pos < n:
                    pos += os.pwrite(fd, data[pos:], pos)
                mm = mmap.mmap(fd, n, flags=mmap.MAP_SHARED)
            except OSError as exc:
                os.unlink(path)
                self._forget()
                return self._fallback(scratch, exc)
        finally:
            os.close(fd)
        f = _File(mm, path, sealed=True)
        body = np.frombuffer(mm, dtype=np.uint8)
        body.flags.writeable = False
        with self._lock:
            self._bodies[id(body)] = f
            self._made += 1
            if len(self._scratch) >= self._keep:
                del self._scratch[0]
            self._scratch.append(scratch)
        weakref.finalize(body, self._dead, id(body), f)
        return body

    def _forget(self) -> None:
        with self._lock:
            self._files -= 1

    def _dead(self, key: int, f: _File) -> None:
        """The array over ``f`` is gone (on whichever thread dropped the last reference).

        Recycle the file if no client may map it; else unlink it (mappings stay valid).
        """
        with self._lock:
            if self._bodies.get(key) is f:
                del self._bodies[key]
            idle = sum(g.size for g in self._free)
            recycle = not self._closed and not f.lends and idle + f.size <= self.idle_bytes
            if recycle:
                f.sealed = False
                self._free.append(f)
            else:
                self._files -= 1
                for token in f.lends:  # a release of these now changes nothing
                    self._lends.pop(token, None)
        if not recycle:
            with contextlib.suppress(FileNotFoundError):  # the arena was closed first
                os.unlink(f.path)

    def lend(self, body: NDArray[np.uint8]) -> tuple[str, str] | None:
        """The file holding ``body`` and a fresh release token; None if it has no file.

        Call it for each answer that names the file: the file is not rewritten until
        every token lent for it has come back through :meth:`release`. A token is a
        random secret of that one answer, so a release can be neither forged nor counted
        twice.
        """
        token = secrets.token_hex(8)
        with self._lock:
            f = self._bodies.get(id(body))
            if f is None or not f.sealed:
                return None
            f.lends.add(token)
            self._lends[token] = f
            return f.path, token

    def release(self, tokens: Iterable[str]) -> int:
        """Clients no longer map the files these tokens were lent with; how many counted.

        Unknown tokens (another server's, one already given back, one for a body whose
        file was unlinked meanwhile) are ignored.
        """
        counted = 0
        with self._lock:
            for token in tokens:
                f = self._lends.pop(token, None)
                if f is not None:
                    f.lends.discard(token)
                    counted += 1
        return counted

    def _fallback(self, body: NDArray[np.uint8], exc: OSError) -> NDArray[np.uint8]:
        if not self._warned:
            self._warned = True
            log.warning(
                "shared memory under %s unavailable (%s): serving bodies over the socket; "
                "enlarge /dev/shm (docker run --shm-size) or pass --no-shm",
                self.dir,
                exc.strerror or exc,
            )
        return body

    def path_of(self, body: NDArray[np.uint8]) -> str | None:
        """The file holding ``body`` (an array :meth:`seal` returned), else None."""
        with self._lock:
            f = self._bodies.get(id(body))
            return f.path if f is not None and f.sealed else None

    def stats(self) -> dict[str, int]:
        """Files now (and free for recycling), lends not given back, bodies sealed so far."""
        with self._lock:
            return {
                "files": self._files,
                "free": len(self._free),
                "lent": len(self._lends),
                "new": self._made,
                "recycled": self._recycled,
            }

    def close(self) -> None:
        """Remove the directory and every body file in it (mappings stay valid)."""
        self._closed = True
        with self._lock:
            self._bodies.clear()
            self._lends.clear()
            self._files -= len(self._free)
            self._free.clear()
            self._scratch.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        with self._lock:  # once: a second os.close could hit a descriptor reused since
            fd, self._alive = self._alive, -1
        if fd >= 0:
            os.close(fd)

    def __repr__(self) -> str:
        return f"ShmArena({str(self.dir)!r})"
