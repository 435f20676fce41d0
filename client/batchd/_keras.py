"""Keras: a ``keras.utils.PyDataset`` over a client's stream of epochs.

Imported only by :meth:`batchd.Client.keras`, so ``import batchd`` never imports keras.

While Keras trains (``fit``, ``evaluate``, ``predict``), every batch it asks for is the
next batch of :meth:`batchd.Client.stream`: epoch ``e`` in full and in order, then
``e + 1``. Keras' batch index is not used: the server already shuffles samples, and
Keras' own view of an epoch (``steps_per_epoch``, its shuffling of batch order, its
build peek) must not decide which batchd epoch a step trains on. So:

* ``steps_per_epoch`` unset: ``len(seq)`` steps per Keras epoch, which is one batchd
  epoch (Keras epoch ``j`` of a fresh client is batchd epoch ``j``);
* ``steps_per_epoch=S``: Keras sees an endless dataset and takes ``S`` batches of the
  stream per Keras epoch, so nothing runs out: with ``S = len(seq) / 2`` two Keras
  epochs make one batchd epoch, with ``S = 2.5 * len(seq)`` one Keras epoch spans
  two and a half. The stream carries on across ``fit`` calls.

``seq.epoch`` and ``seq.client.state_dict()`` give the stream's position (the batch the
next step trains on). Outside training, ``seq[k]`` is batch ``k`` of that epoch. A
validation seq is a stream too: each evaluation takes the next epoch of its client,
which with ``shuffle=False`` and no augmentation holds the same batches every time.

Keras tells a ``PyDataset`` neither ``steps_per_epoch`` nor that a request is its build
peek (one batch it looks at for shapes before training, and drops). Both are read from
the call stack: the Keras ``EpochIterator`` asking for the length, and Keras'
``_symbolic_build`` asking for a batch. The peeked batch is kept and is the first one
trained on, so no batch is skipped. Should a future Keras rename those, the fallback is
today's plain behaviour (a finite dataset; a peek that costs one batch), and
``tests/client/test_keras.py`` says so.

Keras' ``workers``, ``use_multiprocessing`` and ``max_queue_size`` are accepted and not
handed to Keras: the work is done by the server, and the client already keeps
``prefetch`` requests in flight. Keras' worker threads and processes would only fetch
ahead out of order and drop what they fetched at the end of each ``fit``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import keras
from numpy.typing import NDArray

if TYPE_CHECKING:
    from ._client import Batch, Client

__all__ = ["KerasDataset"]

Names = str | tuple[str, ...]

_PEEKS = frozenset({"_symbolic_build", "_maybe_symbolic_build", "get_tf_dataset"})
_MAX_DEPTH = 64  # Keras' iteration sits well within this many frames of __getitem__


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


def _keras_caller() -> tuple[Any, bool]:
    """(the Keras EpochIterator on the call stack or None, whether it is Keras' build peek)."""
    try:
        from keras.src.trainers.epoch_iterator import EpochIterator
    except ImportError:  # another Keras layout: behave as a plain finite PyDataset
        return None, False
    # The peek runs through the EpochIterator too (its __next__ inside _symbolic_build):
    # look at every frame, not just up to the first match.
    caller, peek = None, False
    frame: FrameType | None = sys._getframe(2)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            break
        code = frame.f_code
        if "keras" in code.co_filename:
            peek = peek or code.co_name in _PEEKS
            owner = frame.f_locals.get("self")
            if caller is None and isinstance(owner, EpochIterator):
                caller = owner
        frame = frame.f_back
    return caller, peek


class KerasDataset(keras.utils.PyDataset):  # type: ignore[misc]  # keras is untyped
    """The client's stream as ``(x, y[, sample_weight])`` batches for Keras."""

    def __init__(
        self,
        client: Client,
        *,
        x: str | Sequence[str],
        y: str | Sequence[str] | None = None,
        sample_weight: str | None = None,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
    ) -> None:
        # Keras runs no workers of its own for us (module docstring); the values are kept.
        super().__init__(workers=1, use_multiprocessing=False, max_queue_size=max_queue_size)
        self.requested_workers = (workers, use_multiprocessing)
        self.client = client
        fields = [*client.info.fields, "index"]
        self._x = _names("x", x, fields)
        self._y = None if y is None else _names("y", y, fields)
        if sample_weight is not None and self._y is None:
            raise ValueError("sample_weight needs y: Keras reads (x, y, sample_weight)")
        self._w = None if sample_weight is None else _names("sample_weight", sample_weight, fields)
        self._setup()

    def _setup(self) -> None:
        self._lock = threading.Lock()
        self._stream: Iterator[Batch] | None = None
        self._peeked: Batch | None = None
        self._after_peek = (0, 0)
        self._at = (-1, -1)  # the client's position when the stream last moved it

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_lock", "_stream", "_peeked", "_after_peek", "_at"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    @property
    def epoch(self) -> int:
        """The batchd epoch of the next batch Keras trains on."""
        return self.client.epoch

    def __len__(self) -> int:
        """Batches in one batchd epoch (for this client's rank)."""
        return self.client.info.batches

    @property
    def num_batches(self) -> int | None:
        # None (endless) for a Keras loop given steps_per_epoch: it then never runs out.
        # Not to get_data_adapter's check, whose only use is to warn that fit(shuffle=True)
        # does not shuffle an endless dataset: batch order is the stream's either way.
        if sys._getframe(1).f_code.co_name == "get_data_adapter":
            return len(self)
        caller, _ = _keras_caller()
        if caller is not None and getattr(caller, "steps_per_epoch", None):
            return None
        return len(self)

    def __getitem__(self, k: int) -> tuple[Any, ...]:
        caller, peek = _keras_caller()
        batch = self._next(peek) if caller is not None or peek else self._random_access(k)
        x = _pick(batch, self._x)
        if self._y is None:
            return (x,)
        y = _pick(batch, self._y)
        if self._w is None:
            return (x, y)
        return (x, y, _pick(batch, self._w))

    def _random_access(self, k: int) -> Batch:
        info = self.client.refresh()
        n, epoch = info.batches, self.client.epoch
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"batch {k} out of range: epoch {epoch} has {n} batches")
        return self.client.fetch(epoch, k, info=info)

    def _next(self, peek: bool) -> Batch:
        client = self.client
        with self._lock:
            if (client.epoch, client.next_batch) != self._at:
                # First use, or the position was moved (seek, load_state_dict): follow it.
                self._close_stream()
                self._stream = client.stream()
            if self._peeked is not None:
                batch = self._peeked
                if not peek:
                    self._peeked = None
                    client.seek(*self._after_peek)
            else:
                assert self._stream is not None
                before = (client.epoch, client.next_batch)
                batch = next(self._stream)
                if peek:  # looked at, not trained on: the next step trains on it
                    self._peeked, self._after_peek = batch, (client.epoch, client.next_batch)
                    client.seek(*before)
            self._at = (client.epoch, client.next_batch)
            return batch

    def _close_stream(self) -> None:
        stream, self._stream, self._peeked = self._stream, None, None
        if stream is not None:
            stream.close()  # type: ignore[attr-defined]  # a generator

    def close(self) -> None:
        """Cancel read-ahead and stop its threads (the position is kept)."""
        with self._lock:
            self._close_stream()
            self._at = (-1, -1)
