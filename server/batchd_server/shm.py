"""Batch bodies in POSIX shared memory, for trainers on the same host (``--uds``).

Over a unix socket the client is necessarily on this host, so instead of copying a
38 MB body into every trainer's socket the server can name the file the body lives
in and let the trainer map it (docs/protocol.md, "Shared-memory bodies")::

    /dev/shm/batchd-<pid>-<random>/        mode 0700, made at start, removed at shutdown
        b-<n>                              one finished body, exactly its length, mode 0600

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
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import secrets
import shutil
import threading
import weakref
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from .errors import ConfigError

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


class ShmArena:
    """A private directory of shared-memory body files; one per server process.

    Thread-safe: bodies are allocated on pool threads and dropped on any thread.
    ``keep``: scratch buffers kept for reuse (about the batches computed at once).
    """

    def __init__(self, root: str | Path = SHM_ROOT, *, keep: int = 4) -> None:
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
        except OSError as exc:
            raise ConfigError(
                f"--shm cannot create {self.dir}: {exc.strerror}; pass --no-shm"
            ) from exc
        self._lock = threading.Lock()
        self._paths: dict[int, str] = {}
        self._seq = itertools.count()
        self._closed = False
        self._warned = False
        self._keep = keep
        self._scratch: list[NDArray[np.uint8]] = []

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
        When the arena is closed or shared memory is full, ``scratch`` itself is returned
        (it has no :meth:`path_of`; the body is sent over the socket). The file is
        unlinked when the returned array and every view of it are gone.
        """
        n = scratch.nbytes
        if n <= 0 or self._closed:
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

    def __repr__(self) -> str:
        return f"ShmArena({str(self.dir)!r})"
