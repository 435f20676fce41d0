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

A batch is gathered into a private scratch buffer (:meth:`ShmArena.allocate`, recycled,
so its pages are already faulted in), then :meth:`ShmArena.seal` copies it into a fresh
file with ``pwrite`` and returns a read-only mapping of the file as the body. Why not
gather straight into a shared mapping: /dev/shm has 4 KiB pages, and filling the page
tables of a fresh 38 MB shared mapping cost ~25 ms a body on the reference VM against
~13 ms for fallocate + pwrite (the mapping returned here is never touched unless a
client without shared memory asks for the bytes).

A body file lives exactly as long as the server holds the body: the sealed array
carries a ``weakref.finalize`` that unlinks its file, so it goes when the cache evicts
the body and no request is still sending or joining it (every view of the array keeps
it alive). Unlinking never disturbs a mapping: the server and every trainer that mapped
the file keep their pages until they unmap them. A trainer that asks for a path the
server has just dropped gets ``ENOENT`` and asks again for the ordinary body. A file
is written once, before anyone can know its name, and never rewritten.

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
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from ..errors import ConfigError

__all__ = ["SHM_ROOT", "ShmArena"]

log = logging.getLogger("batchd.shm")

#: Where POSIX shared memory lives on Linux; clients refuse paths outside it.
SHM_ROOT = Path("/dev/shm")


def _unlink(paths: dict[int, str], lock: threading.Lock, key: int, path: str) -> None:
    # Runs when the body array dies (on whichever thread drops the last reference).
    with lock:
        if paths.get(key) == path:
            del paths[key]
    with contextlib.suppress(FileNotFoundError):  # the arena was closed first
        os.unlink(path)


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
    ``min_bytes`` and ``max_files``: the bounds in the module docstring.
    """

    def __init__(
        self,
        root: str | Path = SHM_ROOT,
        *,
        keep: int = 4,
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
        self._paths: dict[int, str] = {}
        self._seq = itertools.count()
        self._closed = False
        self._warned = False
        self._keep = keep
        self._scratch: list[NDArray[np.uint8]] = []
        self.min_bytes = min_bytes
        self.max_files = _default_max_files() if max_files is None else max_files

    def allocate(self, n: int) -> NDArray[np.uint8]:
        """A writable ``n``-byte scratch buffer to gather a body into; pass it to :meth:`seal`.

        Buffers come back from :meth:`seal`, so a job's same-sized batches reuse memory
        that is already faulted in.
        """
        with self._lock:
            for i, buf in enumerate(self._scratch):
                if buf.size == n:
                    return self._scratch.pop(i)
        return np.empty(n, dtype=np.uint8)

    def seal(self, scratch: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """The finished body ``scratch`` as a read-only array over a new shared-memory file.

        ``scratch`` (from :meth:`allocate`) must not be used afterwards: it is recycled.
        When the arena is closed, shared memory is full, the body is under ``min_bytes``
        or ``max_files`` bodies are files already, ``scratch`` itself is returned (it has
        no :meth:`path_of`; the body is sent over the socket). The file is
        unlinked when the returned array and every view of it are gone.
        """
        n = scratch.nbytes
        if n <= 0 or n < self.min_bytes or self._closed:
            return scratch
        with self._lock:
            if len(self._paths) >= self.max_files:
                return scratch
        path = str(self.dir / f"b-{next(self._seq)}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            return self._fallback(scratch, exc)
        try:
            try:
                os.posix_fallocate(fd, 0, n)  # reserve now: ENOSPC here, not SIGBUS later
                data, pos = memoryview(scratch).cast("B"), 0  # type: ignore[arg-type]
                while pos < n:
                    pos += os.pwrite(fd, data[pos:], pos)
                mm = mmap.mmap(fd, n, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            except OSError as exc:
                os.unlink(path)
                return self._fallback(scratch, exc)
        finally:
            os.close(fd)
        body = np.frombuffer(mm, dtype=np.uint8)
        key = id(body)
        with self._lock:
            self._paths[key] = path
            if len(self._scratch) >= self._keep:
                del self._scratch[0]
            self._scratch.append(scratch)
        weakref.finalize(body, _unlink, self._paths, self._lock, key, path)
        return body

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
            return self._paths.get(id(body))

    def close(self) -> None:
        """Remove the directory and every body file in it (mappings stay valid)."""
        self._closed = True
        with self._lock:
            self._paths.clear()
            self._scratch.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        with self._lock:  # once: a second os.close could hit a descriptor reused since
            fd, self._alive = self._alive, -1
        if fd >= 0:
            os.close(fd)

    def __repr__(self) -> str:
        return f"ShmArena({str(self.dir)!r})"
