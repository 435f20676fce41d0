"""Bounded caches the engine shares between requests.

* :class:`ByteLRU` holds finished batch bodies, bounded by their total size in bytes.
  Bodies are immutable once filled, so a cached body is sent as it is, by reference.
* :class:`LRU` is a small count-bounded map for derived values (permutations, parsed
  pipelines), computed once and shared by every request that needs them.

Both are only touched from the event loop thread, so they take no locks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import numpy as np
from numpy.typing import NDArray

__all__ = ["LRU", "ByteLRU"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """At most ``size`` entries; the least recently used goes first."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"LRU size must be >= 1, got {size}")
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def pop(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def values(self) -> list[V]:
        """The values, least recently used first (a copy)."""
        return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)


class ByteLRU(Generic[K]):
    """Batch bodies keyed by their request, at most ``capacity`` bytes in all."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0 bytes, got {capacity}")
        self.capacity = capacity
        self.nbytes = 0
        self._items: OrderedDict[K, NDArray[np.uint8]] = OrderedDict()

    def get(self, key: K) -> NDArray[np.uint8] | None:
        body = self._items.get(key)
        if body is not None:
            self._items.move_to_end(key)
        return body

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def put(
        self,
        key: K,
        body: NDArray[np.uint8],
        wanted: Callable[[K, NDArray[np.uint8]], bool] | None = None,
    ) -> None:
        """Keep ``body`` unless it alone is over capacity; evict the oldest to fit.

        Bodies for which ``wanted(key, body)`` is true (someone will still ask for them)
        are evicted only once the others are not enough.
        """
        if body.nbytes > self.capacity:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self._items[key] = body
        self.nbytes += body.nbytes
        if self.nbytes > self.capacity and wanted is not None:
            for k in list(self._items):  # oldest first
                if k != key and not wanted(k, self._items[k]):
                    self.nbytes -= self._items.pop(k).nbytes
                    if self.nbytes <= self.capacity:
                        break
        while self.nbytes > self.capacity:
            _, evicted = self._items.popitem(last=False)
            self.nbytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._items)
