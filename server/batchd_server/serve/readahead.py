"""Read-ahead by the permutation: the samples each job will ask for next, announced early.

An epoch's order is a pure function of (seed, epoch), so the server knows which
samples every active job needs next. After each request the engine hands this module
the sample ids of the job's next batches; one thread announces them to the kernel
(``posix_fadvise(WILLNEED)``, :meth:`Dataset.willneed`), earliest need first across
all jobs, within a byte budget per job. The kernel reads them at a deep queue while
the gather threads work, which then find whole samples in the page cache instead of
faulting them in 4 KiB at a time.

A pack found wholly in the page cache (``mincore``, checked every few seconds) is
not announced: the fast path of a resident pack stays what it was. The check runs on a
thread of its own, never on the caller's (the event loop): ``mincore`` over a 3.7 GB
pack takes 75-90 ms here, and its cost grows with the pack. Until a pack's first check
ends it counts as not resident (announcing a resident pack's reads costs little), and
checks are spaced so they take at most about 5% of one core.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from ..format import Dataset

__all__ = ["ReadAhead"]

log = logging.getLogger("batchd.readahead")

_RESIDENT_CHECK_S = 5.0  # at least this long between two checks of a pack
_RESIDENT_CHECK_SHARE = 0.05  # ... and at least 1/this times as long as the last one took
_RESIDENT_SHARE = 0.98  # above this share in the page cache, a pack counts as resident


class ReadAhead:
    """One thread that announces sample reads in order of need; ``close`` stops it."""

    def __init__(
        self,
        resident: Callable[[Dataset], float | None],
        on_announced: Callable[[int], None] = lambda _n: None,
    ) -> None:
        self._resident = resident
        self._on_announced = on_announced
        self._heap: list[tuple[int, int, Dataset, NDArray[np.int64]]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        #: fingerprint -> (when the next check is due, resident at the last one)
        self._checked: dict[str, tuple[float, bool]] = {}
        self._checking: set[str] = set()  # fingerprints being checked now
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="batchd-readahead", daemon=True)
        self._thread.start()

    def needed(self, ds: Dataset) -> bool:
        """Whether announcing reads of ``ds`` helps: it is read unmapped or not resident.

        Never waits for a residency check: it answers from the last one (not resident
        before the first has ended) and starts the next on its own thread when due.
        """
        if ds.direct_fields and not ds.buffered:
            return False  # read past the page cache: nothing there to fill ahead
        if not ds.reads.startswith("mapped"):
            return True
        with self._cv:
            due, resident = self._checked.get(ds.fingerprint, (0.0, False))
            if due <= time.monotonic() and ds.fingerprint not in self._checking:
                self._checking.add(ds.fingerprint)
                threading.Thread(
                    target=self._check, args=(ds,), name="batchd-resident", daemon=True
                ).start()
        return not resident

    def _check(self, ds: Dataset) -> None:
        start = time.monotonic()
        try:
            share = self._resident(ds)
        except Exception:  # advice only: count the pack as not resident
            log.exception("checking the page-cache residency of %s failed", ds.name)
            share = None
        took = time.monotonic() - start
        due = time.monotonic() + max(_RESIDENT_CHECK_S, took / _RESIDENT_CHECK_SHARE)
        with self._cv:
            self._checked[ds.fingerprint] = (due, share is not None and share >= _RESIDENT_SHARE)
            self._checking.discard(ds.fingerprint)

    def submit(self, ds: Dataset, distance: int, ids: NDArray[np.int64]) -> None:
        """Announce ``ids`` of ``ds``, needed ``distance`` batches from now (smaller first)."""
        with self._cv:
            if self._closed:
                return
            heapq.heappush(self._heap, (distance, next(self._seq), ds, ids))
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                _, _, ds, ids = heapq.heappop(self._heap)
            try:
                self._on_announced(ds.willneed(ids))
            except Exception:  # read-ahead is advice: never let it stop the thread
                log.exception("read-ahead of %s failed", ds.name)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._heap.clear()
            self._cv.notify_all()
        self._thread.join(timeout=5)
