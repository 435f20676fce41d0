"""Read leases: the kernel's promise that a mapped pack file will not shrink under us.

Touching a mapped page past the end of a file truncated since it was mapped is a
SIGBUS, which kills the whole server. So without a lease the server reads samples
with ``preadv`` into its own buffers (a truncation is then a short read); that copy
cost the crop pipeline 30% of its speed (docs/reliability.md).

A read lease (``fcntl(fd, F_SETLEASE, F_RDLCK)``) closes the gap. A process that opens
a leased file for writing, or truncates it, blocks in the kernel while we are sent
SIGIO. We then stop reading through the mapping, wait for reads in progress, and give
the lease up; only then does the writer go on. While a lease is held nothing can
shrink the file, so reading through the mapping is safe.

A lease is not always to be had, and then the Dataset reads with ``preadv`` as before:

* only :func:`install` (from the main thread, before any lease) handles SIGIO; its
  default action kills the process, so nothing takes a lease unless it was called;
* the file must be owned by the server's user (or the server have ``CAP_LEASE``),
  open by no writer, on a filesystem with leases (not NFS), with ``fs.leases-enable``;
* a break is answered by a daemon thread, woken by SIGIO and every second; were it
  starved for ``fs.lease-break-time`` (45 s), the kernel would revoke the lease and
  let the writer go on while we still read the mapping.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import signal
import threading
from collections.abc import Iterator, Sequence

__all__ = ["Lease", "enabled", "install", "take"]

log = logging.getLogger("batchd.lease")

_lock = threading.Lock()  # guards _live and _wake; never taken by the signal handler
_live: set[Lease] = set()
_wake: tuple[int, int] | None = None  # self-pipe: the handler writes, the keeper reads
_POLL_S = 1.0


class Lease:
    """A read lease on a set of files, and a count of the reads using their mappings.

    Readers wrap each use of the mappings in :meth:`hold`; :meth:`release` (on a
    break, or at close) first stops new holds, then waits for the current ones.
    """

    def __init__(self, fds: Sequence[int], label: str) -> None:
        self.label = label
        self._fds = list(fds)  # our own duplicates: never closed and reused under us
        self._cond = threading.Condition()
        self._readers = 0
        self.held = True
        self.why = ""  # why it was given up

    @contextlib.contextmanager
    def hold(self) -> Iterator[bool]:
        """Yield True if the mappings may be read until the block ends, else False."""
        with self._cond:
            ok = self.held
            self._readers += ok
        try:
            yield ok
        finally:
            if ok:
                with self._cond:
                    self._readers -= 1
                    if not self._readers:
                        self._cond.notify_all()

    def breaking(self) -> bool:
        """True if a writer is waiting on any of the files (or the lease is gone)."""
        for fd in self._fds:
            try:
                if fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK:
                    return True
            except OSError:
                return True
        return False

    def release(self, why: str, *, warn: bool = False) -> None:
        """Stop new holds, wait for the current ones, then give the lease up (idempotent)."""
        with self._cond:
            if not self.held and not self._fds:
                return
            first = self.held
            if first:
                self.held, self.why = False, why
            self._cond.wait_for(lambda: self._readers == 0)
            fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            os.close(fd)
        with _lock:
            _live.discard(self)
        if warn and first:
            log.warning("%s: %s; reading it with preadv from now on", self.label, why)


def enabled() -> bool:
    """True once :func:`install` has run: only then may leases be taken."""
    return _wake is not None


def install() -> None:
    """Handle SIGIO (lease breaks) in this process; call once, from the main thread.

    The handler only writes a byte to a pipe; a daemon thread does the rest, so no
    lock is ever taken inside the handler.
    """
    global _wake
    with _lock:
        if _wake is not None:
            return
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(w, False)
        signal.signal(signal.SIGIO, lambda _sig, _frame: _poke(w))  # main thread only
        _wake = (r, w)
    threading.Thread(target=_keeper, args=(r,), name="batchd-lease", daemon=True).start()


def _poke(w: int) -> None:
    with contextlib.suppress(BlockingIOError):  # a full pipe already wakes the keeper
        os.write(w, b"\0")


def _keeper(r: int) -> None:
    while True:
        # Woken by SIGIO, and every _POLL_S regardless: a break is then answered within
        # a second even if its signal was lost, never left to the kernel's 45 s revoke.
        if select.select([r], [], [], _POLL_S)[0]:
            os.read(r, 4096)
        with _lock:
            live = list(_live)
        for lease in live:
            if lease.breaking():
                lease.release("another process opened it for writing or truncated it", warn=True)


def take(fds: Sequence[int], label: str) -> Lease | str:
    """A read lease on every one of ``fds`` (files open read-only), or why not.

    All or nothing: if any file refuses, the ones already taken are given back.
    """
    if not enabled():
        return "leases are off in this process (`batchd serve` turns them on unless --no-leases)"
    own: list[int] = []
    try:
        for fd in fds:
            own.append(os.dup(fd))
            fcntl.fcntl(own[-1], fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        for fd in own:
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            os.close(fd)
        return _refusal(exc)
    lease = Lease(own, label)
    with _lock:
        _live.add(lease)
        wake = _wake
    # A writer that came between F_SETLEASE and the line above was signalled while the
    # keeper could not see this lease yet: have it look again.
    if wake is not None:
        _poke(wake[1])
    return lease


def _refusal(exc: OSError) -> str:
    reasons = {
        errno.EAGAIN: "a process has a file open for writing",
        errno.EACCES: "the files belong to another user (run the server as their owner)",
        errno.EPERM: "the files belong to another user (run the server as their owner)",
        errno.EINVAL: (
            "the filesystem does not support leases (NFS, FUSE?) or fs.leases-enable is 0"
        ),
    }
    return f"no read lease: {reasons.get(exc.errno or 0, exc.strerror)}"
