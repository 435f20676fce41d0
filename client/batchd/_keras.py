"""Keras: a ``keras.utils.PyDataset`` over a client's epochs.

Imported only by :meth:`batchd.Client.keras`, so ``import batchd`` never imports keras.
``__getitem__(k)`` is batch ``k`` of the current epoch (any order, any thread: Keras
shuffles batch order by default and runs ``workers`` threads); ``on_epoch_end`` moves
to the next epoch once every batch of the current one has been served. (Keras peeks
at batch 0 to build the model and then calls ``on_epoch_end``: that must not skip
epoch 0. So ``steps_per_epoch`` below ``len(seq)`` would never advance the epoch:
leave it unset. With ``workers > 1`` Keras' queue fetches the whole epoch during that
peek, which then counts as epoch 0 and training starts at epoch 1: every trained epoch
is still a complete, distinct permutation.) When batches are asked for in order
(``model.fit(..., shuffle=False)``: the server already shuffles samples, so shuffling
batch order adds nothing), the next ``prefetch`` batches are fetched ahead so the
network overlaps the training step; each batch is still fetched once per epoch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import keras
from numpy.typing import NDArray

from ._transport import Cancel

if TYPE_CHECKING:
    from ._client import Batch, Client
    from ._info import DatasetInfo

__all__ = ["KerasDataset"]

Names = str | tuple[str, ...]


def _names(role: str, value: str | Sequence[str], fields: Sequence[str]) -> Names:
    names = (value,) if isinstance(value, str) else tuple(value)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{role} must be a field name or a tuple of field names, got {value!r}")
    missing = [n for n in names if n not in fields]
    if missing:
        raise ValueError(
            f"{role}: no field {', '.join(map(repr, missing))} in the dataset; "
            f"its fields are {sorted(fields)}"
        )
    return value if isinstance(value, str) else names


def _pick(batch: Batch, names: Names) -> NDArray[Any] | tuple[NDArray[Any], ...]:
    if isinstance(names, str):
        return batch[names]
    return tuple(batch[n] for n in names)


class KerasDataset(keras.utils.PyDataset):  # type: ignore[misc]  # keras is untyped
    """Batch ``k`` of the current epoch as ``(x, y[, sample_weight])``."""

    def __init__(
        self,
        client: Client,
        *,
        x: str | Sequence[str],
        y: str | Sequence[str] | None = None,
        sample_weight: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.client = client
        fields = [*client.info.fields, "index"]
        self._x = _names("x", x, fields)
        self._y = None if y is None else _names("y", y, fields)
        if sample_weight is not None and self._y is None:
            raise ValueError("sample_weight needs y: Keras reads (x, y, sample_weight)")
        self._w = None if sample_weight is None else _names("sample_weight", sample_weight, fields)
        self.epoch = client.epoch
        self._setup()

    def _setup(self) -> None:
        self._lock = threading.Lock()
        self._expect: DatasetInfo | None = None
        self._ahead: dict[int, Future[Batch]] = {}
        self._cancel = Cancel()
        self._pool: ThreadPoolExecutor | None = None
        self._claimed: set[int] = set()  # batches of this epoch fetched or being fetched
        self._runs = 0  # consecutive in-order requests
        self._last = -10

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_lock", "_expect", "_ahead", "_cancel", "_pool", "_claimed", "_runs", "_last"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    def _info(self) -> DatasetInfo:
        # Called with the lock held: the fingerprint this epoch's batches must carry.
        if self._expect is None:
            self._expect = self.client.refresh()
        return self._expect

    def __len__(self) -> int:
        with self._lock:
            return self._info().batches

    def __getitem__(self, k: int) -> tuple[Any, ...]:
        with self._lock:
            info = self._info()
            n, epoch = info.batches, self.epoch
            if k < 0:
                k += n
            if not 0 <= k < n:
                raise IndexError(f"batch {k} out of range: epoch {epoch} has {n} batches")
            fut = self._ahead.pop(k, None)
            self._claimed.add(k)
            # In order, give or take a racing worker thread: read ahead from the 2nd step on.
            self._runs = self._runs + 1 if self._last < k <= self._last + 2 else 0
            if self._runs >= 2:
                self._read_ahead(epoch, k, n, info)
            self._last = k
        batch = fut.result() if fut is not None else self.client.fetch(epoch, k, info=info)
        x = _pick(batch, self._x)
        if self._y is None:
            return (x,)
        y = _pick(batch, self._y)
        if self._w is None:
            return (x, y)
        return (x, y, _pick(batch, self._w))

    def _read_ahead(self, epoch: int, k: int, n: int, info: DatasetInfo) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.client.prefetch, thread_name_prefix="batchd-keras")
        for j in range(k + 1, min(n, k + 1 + self.client.prefetch)):
            if j not in self._claimed and len(self._ahead) < 2 * self.client.prefetch:
                self._claimed.add(j)
                self._ahead[j] = self._pool.submit(
                    self.client.fetch, epoch, j, info=info, cancel=self._cancel
                )

    def on_epoch_end(self) -> None:
        with self._lock:
            self._drop_ahead()
            done = self._expect is not None and len(self._claimed) >= self._expect.batches
            self._claimed = set()
            self._runs, self._last = 0, -10
            if not done:
                return  # e.g. Keras' model-building peek: epoch 0 has not been trained on
            self.epoch += 1
            self._expect = None  # next epoch: fresh plan and fingerprint
            # Keep the client's resume point in step (client.state_dict()).
            self.client.seek(self.epoch)

    def _drop_ahead(self) -> None:
        self._cancel.cancel()
        for fut in self._ahead.values():
            fut.cancel()
        self._ahead = {}
        self._cancel = Cancel()

    def close(self) -> None:
        """Cancel read-ahead and stop its threads."""
        with self._lock:
            self._drop_ahead()
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
