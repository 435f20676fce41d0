"""A thread pool whose queue serves lower priority numbers first.

The engine's foreground work (a client is waiting) goes in at priority 0 and its
read-ahead at priority 1, so background batches only ever take threads no waiting
client wants. Within one priority, FIFO. Work is plain functions of numpy/OpenCV
calls that release the GIL, so threads (not processes) scale with cores.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

__all__ = ["ByteGate", "PriorityPool"]


class PriorityPool:
    """A thread pool whose queue serves lower priority numbers first (FIFO within one)."""

    def __init__(self, threads: int) -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._threads = [
            threading.Thread(target=self._work, name=f"batchd-worker-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while True:
            _, _, item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

    def submit(self, priority: int, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put((priority, next(self._seq), (fut, fn, args)))
        return asyncio.wrap_future(fut)

    @property
    def queued(self) -> int:
        """Work items waiting for a thread (an estimate, as ``Queue.qsize`` is)."""
        return self._queue.qsize()

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put((1 << 30, next(self._seq), None))


class ByteGate:
    """Bounds the bytes of bodies being computed at once; one body always gets through."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._cv: asyncio.Condition | None = None

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        if self._cv is None:
            self._cv = asyncio.Condition()
        cv = self._cv
        async with cv:
            await cv.wait_for(lambda: self.used == 0 or self.used + nbytes <= self.capacity)
            self.used += nbytes
        try:
            yield
        finally:
            async with cv:
                self.used -= nbytes
                cv.notify_all()
