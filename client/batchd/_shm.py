"""Mapping a shared-memory batch body that a same-host server names (docs/protocol.md).

A path outside /dev/shm, a symlink, a non-regular file or one not owned by the server's
user (:func:`batchd._peer.peer_uid`) is refused (:class:`WireError`); a file the server
dropped meanwhile (``ENOENT``) or of the wrong size raises :class:`ShmGone`, and the
transport asks again for the bytes.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import weakref
from collections import deque
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._exceptions import WireError
from .wire import SHM_ROOT, is_int

__all__ = ["ShmGone", "give_back_when_unmapped", "map_shm_body"]

_TOKEN = re.compile(r"[0-9a-f]{1,64}")
# Bumped before every fork: a body mapped before one may live on in the child, where this
# process's arrays dying says nothing about it; such a body is never given back.
_forks = [0]
os.register_at_fork(before=lambda: _forks.__setitem__(0, _forks[0] + 1))


class ShmGone(Exception):
    """The announced body file is gone or changed (evicted meanwhile): ask for the bytes."""


def map_shm_body(payload: Any, url: str, owner: int) -> NDArray[np.uint8]:
    """Map the body an ``application/x-batchd-shm+json`` answer names, copy-on-write.

    ``owner``: the uid the file must belong to (the server's user, :func:`peer_uid`).
    Raises :class:`ShmGone` when the file is missing or not ``length`` bytes (the
    server dropped it: ask again for the bytes), :class:`WireError` for an answer that
    must never be mapped. The returned array keeps the mapping alive; no fd stays open.
    """
    if not isinstance(payload, dict):
        raise WireError(f"{url}: shared-memory answer {payload!r:.200} is not a JSON object")
    path, length = payload.get("path"), payload.get("length")
    if not isinstance(path, str) or not is_int(length):
        raise WireError(f"{url}: shared-memory answer {payload!r:.200} lacks path or length")
    if length <= 0 or not path.startswith(SHM_ROOT) or os.path.realpath(path) != path:
        raise WireError(
            f"{url}: refusing to map {path!r} ({length} bytes): a body must be a plain path "
            f"under {SHM_ROOT}; is this a batchd server?"
        )
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ShmGone(path) from None
    except PermissionError:
        raise  # the caller stops asking for shared memory
    except OSError as exc:  # ELOOP: a symlink; anything else we will not follow either
        raise WireError(f"{url}: refusing to map {path!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != owner:
            raise WireError(
                f"{url}: refusing to map {path!r}: not a regular file owned by the server "
                f"(uid {owner})"
            )
        if st.st_size != length:
            raise ShmGone(path)
        try:
            # MAP_PRIVATE over a read-only fd: the server's pages, shared until written.
            mm = mmap.mmap(
                fd, int(length), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError:
            raise ShmGone(path) from None  # out of address space or the like: the bytes
    finally:
        os.close(fd)
    return np.frombuffer(mm, dtype=np.uint8)


def give_back_when_unmapped(body: NDArray[np.uint8], payload: Any, queue: deque[str]) -> None:
    """Queue the answer's ``release`` token once ``body`` and every view of it are gone.

    The transport sends queued tokens with a later request (``X-Batchd-Shm-Release``),
    and only then may the server rewrite the file. Every array decoded from the body,
    ``torch.from_numpy`` of one, and any memoryview keep ``body`` alive, so a token is
    only queued when nothing in this process can read the mapping any more. A body
    mapped before a fork is never given back; nor is one from a server that sent no
    token (it never rewrites files).
    """
    token = payload.get("release") if isinstance(payload, dict) else None
    if isinstance(token, str) and _TOKEN.fullmatch(token):
        weakref.finalize(body, _unmapped, queue, token, os.getpid(), _forks[0])


def _unmapped(queue: deque[str], token: str, pid: int, forks: int) -> None:
    if os.getpid() == pid and _forks[0] == forks:
        queue.append(token)  # deque.append is atomic: any thread may drop the last view
