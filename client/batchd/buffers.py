"""Large byte buffers, recycled once nothing views them any more.

Fresh memory is zeroed and faulted in by the kernel page by page: for a 38 MB batch
body that is about a third of the client's receive time and a sixth of the server's
CPU (``clear_page`` in ``perf``). The client reads bodies into these buffers and the
server lays bodies out in them, so both reuse memory that is already faulted in.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
from numpy.typing import NDArray

__all__ = ["Buffers"]


def _refs(bufs: list[NDArray[np.uint8]], i: int) -> int:
    return sys.getrefcount(bufs[i])


class Buffers:
    """Byte buffers of at least ``MIN_BYTES``, reused once nothing refers to them.

    Every view of a buffer's memory (``np.frombuffer``, slices, memoryviews,
    ``torch.from_numpy``) holds a reference to the buffer that owns it, so a reference
    count at the calibrated minimum proves nobody can see the bytes any more; only then
    is a buffer handed out again. A buffer is reused for a request of 80-100% of its
    size. At most ``keep`` buffers are tracked (the oldest is forgotten: whoever holds
    it keeps it alive) and, of those nobody holds, at most ``idle_bytes`` are kept.
    """

    MIN_BYTES = 1 << 20

    def __init__(self, keep: int, idle_bytes: int | None = None) -> None:
        self._keep = keep
        self._idle_bytes = idle_bytes
        self._lock = threading.Lock()
        self._bufs: list[NDArray[np.uint8]] = []
        # Whatever the interpreter's counting details, this is "held by the list only".
        self._idle = _refs([np.empty(1, dtype=np.uint8)], 0)

    def take(self, n: int) -> NDArray[np.uint8]:
        """A C-contiguous uint8 array of exactly ``n`` bytes, contents undefined."""
        if n < self.MIN_BYTES:
            return np.empty(n, dtype=np.uint8)
        with self._lock:
            bufs = self._bufs
            idle = [i for i in range(len(bufs)) if _refs(bufs, i) <= self._idle]
            for i in idle:
                if n <= bufs[i].size <= n + n // 4:
                    bufs.append(bufs.pop(i))  # most recently used last
                    return bufs[-1][:n]
            raw = np.empty(n, dtype=np.uint8)
            bufs.append(raw)
            self._trim(idle)
            return raw[:n]

    def _trim(self, idle: list[int]) -> None:
        """Forget the oldest idle buffers beyond ``idle_bytes``, then the oldest beyond ``keep``."""
        bufs = self._bufs
        drop: set[int] = set()
        if self._idle_bytes is not None:
            held = sum(bufs[i].nbytes for i in idle)
            for i in idle:  # oldest first
                if held <= self._idle_bytes:
                    break
                held -= bufs[i].nbytes
                drop.add(i)
        excess = len(bufs) - len(drop) - self._keep
        for i in range(len(bufs)):
            if excess <= 0:
                break
            if i not in drop:
                drop.add(i)
                excess -= 1
        if drop:
            self._bufs = [b for i, b in enumerate(bufs) if i not in drop]

    def clear(self) -> None:
        with self._lock:
            self._bufs = []
