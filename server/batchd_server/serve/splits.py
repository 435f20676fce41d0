"""The sample ids of each split a request names, resolved once per pack and shared.

A split is part of the request (``split``, ``split_seed``, ``stratify``), so any replica
resolves it the same way and a restart loses nothing; resolving costs a sort of the
pack's ids (and a read of the stratify field), so the answer is kept per (fingerprint,
split, split seed, stratify) and computed on the engine's pool, off the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import DatasetChanged, FormatError
from ..format import Dataset
from .cache import LRU
from .pool import PriorityPool
from .request import BatchRequest

__all__ = ["SplitIds"]


def _resolve(ds: Dataset, req: BatchRequest, field: str | None) -> NDArray[np.integer]:
    labels = None
    if field is not None:
        # read_rows, not the mapping: one preadv, safe with or without a read lease.
        labels = np.empty(ds.count, ds.fields[field].dtype)
        try:
            ds.read_rows(field, np.arange(ds.count), labels)
        except FormatError as exc:
            raise DatasetChanged(
                f"dataset {req.dataset!r} changed on disk while its {field!r} field was read "
                f"for stratify ({exc.problem}); retry when it is written"
            ) from None
    # 4 bytes a sample, as the engine keeps its permutations: the cache is a budget.
    ids: NDArray[np.integer] = req.split_ids(ds.count, labels)
    if ds.count < 2**32:
        ids = ids.astype(np.uint32)
    ids.setflags(write=False)  # shared by every request of the split
    return ids


class SplitIds:
    """``await ids(ds, req)``: the split's pack ids in ascending order, or None (no split).

    Ids are ``uint32`` below 2**32 samples; at most ``size`` splits are kept (a split of a
    10-million-sample pack is 40 MB).
    """

    def __init__(self, pool: PriorityPool, size: int = 8) -> None:
        self._pool = pool
        self._known: LRU[tuple[Any, ...], asyncio.Future[NDArray[np.integer]]] = LRU(size)

    async def ids(self, ds: Dataset, req: BatchRequest) -> NDArray[np.integer] | None:
        split = req.split_key
        if split is None:
            return None
        field = req.stratify_field(ds.fields)
        key = (ds.fingerprint, *split)
        fut = self._known.get(key)
        if fut is None:
            # The future is kept, so concurrent first requests wait for one computation.
            fut = self._pool.submit(0, _resolve, ds, req, field)
            self._known.put(key, fut)
        try:
            return await asyncio.shield(fut)
        except Exception:
            self._known.pop(key)  # never keep a refusal or a failure
            raise
