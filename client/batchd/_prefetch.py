"""Fetch ahead: a sequence of requests run on worker threads, answers yielded in order."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import TypeVar

from ._transport import Cancel

__all__ = ["prefetched"]

T = TypeVar("T")
K = TypeVar("K")


def prefetched(
    ks: Iterable[K], fetch: Callable[[K, Cancel], T], depth: int
) -> Generator[T, None, None]:
    """``fetch(k)`` for each k in order, ``depth`` requests in flight on worker threads.

    Closing the generator cancels what is in flight (sockets are shut down, so blocked
    reads return at once) and joins the threads before returning.
    """
    cancel = Cancel()
    pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="batchd-fetch")
    pending: deque[Future[T]] = deque()
    todo = iter(ks)
    try:
        pending.extend(pool.submit(fetch, k, cancel) for k in islice(todo, depth))
        while pending:
            result = pending.popleft().result()
            # Refill before yielding so `depth` requests overlap the caller's step.
            for k in islice(todo, 1):
                pending.append(pool.submit(fetch, k, cancel))
            yield result
    finally:
        cancel.cancel()
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)
