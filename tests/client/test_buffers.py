"""Recycled body buffers (client receive path and server layout).

A buffer's identity is its owning array, followed by weak reference: a weak reference
does not count as a use, and addresses can come back from the allocator.
"""

from __future__ import annotations

import weakref

import numpy as np

from batchd.buffers import Buffers

N = Buffers.MIN_BYTES


def owner(a: np.ndarray) -> weakref.ref[np.ndarray]:
    assert a.base is not None  # the pool hands out a view of exactly the size asked
    return weakref.ref(a.base)


def test_recycled_only_when_nothing_views_them() -> None:
    pool = Buffers(keep=4)
    first = pool.take(N)
    view = np.frombuffer(first, dtype=np.uint32)[3:]
    del first
    second = pool.take(N)  # `view` still sees the first buffer: a new one
    assert not np.shares_memory(second, view)
    was = owner(second)
    del second
    third = pool.take(N)  # nothing sees the second one any more: recycled
    assert third.base is was() and third.size == N
    mv = memoryview(third)  # a memoryview (what a socket send holds) keeps it too
    del third
    assert pool.take(N).base is not was()
    del mv
    assert pool.take(N).base is was()
    assert pool.take(100).size == 100  # small bodies are never pooled


def test_a_buffer_serves_requests_of_80_to_100_percent_of_its_size() -> None:
    pool = Buffers(keep=4)
    was = owner(pool.take(2 * N))
    smaller = pool.take(2 * N - N // 4)  # 87.5 %: reused, cut to the exact size
    assert smaller.base is was() and smaller.size == 2 * N - N // 4
    del smaller
    assert pool.take(N).base is not was()  # 50 %: a fresh buffer instead


def test_idle_buffers_beyond_the_byte_budget_are_forgotten() -> None:
    pool = Buffers(keep=16, idle_bytes=2 * N)
    held = [pool.take(N) for _ in range(4)]
    refs = [owner(a) for a in held]
    del held  # four idle buffers, budget for two
    fresh = pool.take(3 * N)  # fits none: allocated, and the two oldest idle ones go
    assert [r() is None for r in refs] == [True, True, False, False]
    again = [pool.take(N).base, pool.take(N).base]
    assert {id(b) for b in again} == {id(refs[2]()), id(refs[3]())}
    del fresh


def test_at_most_keep_buffers_are_tracked() -> None:
    pool = Buffers(keep=2)
    held = [pool.take(N) for _ in range(3)]  # all in use: the oldest is forgotten
    refs = [owner(a) for a in held]
    del held
    assert [r() is None for r in refs] == [True, False, False]
