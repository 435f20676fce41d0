"""Fetch ahead: a sequence of requests run on worker threads, answers yielded in order."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import TypeVar

from ._transport import Cancel

__all__ = ["WaitMeter", "prefetched"]

T = TypeVar("T")
K = TypeVar("K")


class WaitMeter:
    """Seconds a consumer has spent, in all, blocked waiting for the next answer.

    The client sends it with each request (``X-Batchd-Wait``, docs/protocol.md): the
    server's data stall of a job is how fast it grows against the clock.
    """

    __slots__ = ("total",)

    def __init__(self) -> None:
        self.total = 0.0


def prefetched(
    ks: Iterable[K],
    fetch: Callable[[K, Cancel], T],
    depth: int,
    meter: WaitMeter | None = None,
) -> Generator[T, None, None]:
    """``fetch(k)`` for each k in order, ``depth`` requests in flight on worker threads.

    Closing the generator cancels what is in flight (sockets are shut down, so blocked
    reads return at once) and joins the threads before returning. ``meter`` adds up
    the time the consumer waits for each answer.
    """
    cancel = Cancel()
    pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="batchd-fetch")
    pending: deque[Future[T]] = deque()
    todo = iter(ks)
    try:
        pending.extend(pool.submit(fetch, k, cancel) for k in islice(todo, depth))
        while pending:
            began = time.perf_counter()
            result = pending.popleft().result()
            if meter is not None:
                meter.total += time.perf_counter() - began
            # Refill before yielding so `depth` requests overlap the caller's step.
            for k in islice(todo, 1):
                pending.append(pool.submit(fetch, k, cancel))
            yield result
    finally:
        cancel.cancel()
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)
