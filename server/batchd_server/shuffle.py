"""Epoch order, split order, rank sharding and per-sample randomness: pure functions.

Everything here is a function of ``(seed, epoch, ...)`` alone, with no hidden state and
no dependence on numpy's Generator streams, so any machine, numpy version or second
implementation that follows the recipe below gets the same bits (invariants 1-4).

The hash
--------
All randomness comes from the splitmix64 finalizer on unsigned 64-bit integers
(arithmetic modulo 2**64)::

    mix64(z):  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
               z = (z ^ (z >> 27)) * 0x94D049BB133111EB
               return z ^ (z >> 31)

    GAMMA = 0x9E3779B97F4A7C15                       (odd: i -> i*GAMMA is a bijection)
    key(domain, seed, epoch) = mix64(mix64(seed ^ domain) ^ epoch)
    PERM_DOMAIN  = 0x7065726D75746531                (ASCII "permute1")
    AUG_DOMAIN   = 0x6175676D656E7431                (ASCII "augment1")
    SPLIT_DOMAIN = 0x73706C6974726431                (ASCII "splitrd1")

``mix64`` is a bijection, so distinct epochs always give distinct keys.

Epoch order (:func:`permutation`)
---------------------------------
``k = key(PERM_DOMAIN, seed, epoch)``; sample ``i`` (0 <= i < n) gets the sort key
``h[i] = mix64(k + (i + 1) * GAMMA)``. The order is ``argsort(h)``, ascending. Because
``i -> k + (i + 1) * GAMMA`` is injective below 2**64 and ``mix64`` is a bijection, the
``h[i]`` are pairwise distinct: there are no ties, so every correct sort, stable or
not, gives the same order (numpy's introsort here: 2.5x faster than its stable sort).
The result is stored as ``uint32`` (4 bytes per sample; ``uint64`` only when
n >= 2**32).

Split order (:func:`split_order`)
---------------------------------
The same recipe with ``k = key(SPLIT_DOMAIN, split_seed, 0)``: a permutation of the
pack's ids from ``split_seed`` alone, never the packed order (often sorted by class)
and unrelated to any epoch's order. Split slices are taken over it (``split.py``).

Per-sample uniforms (:func:`uniforms`)
--------------------------------------
``k = key(AUG_DOMAIN, seed, epoch)``; for sample id ``s``, stream ``t`` (the op's
position in the pipeline) and draw ``j``::

    base = mix64(mix64(k ^ s) ^ t)
    u[j] = (mix64(base + (j + 1) * GAMMA) >> 11) * 2**-53        in [0, 1), exact in float64

Rank sharding (:class:`EpochPlan`)
----------------------------------
Exactly torch's ``DistributedSampler``: with ``world_size`` ranks each rank gets
``ceil(count / world_size)`` samples, the order padded by wrapping round to its start
(``drop_last=False``), or ``floor(count / world_size)`` with the tail dropped
(``drop_last=True``). Rank ``r`` takes positions ``r, r + ws, r + 2*ws, ...`` of the
padded or truncated order; its batch ``k`` is slice ``k`` of that. ``drop_last`` also
drops a short final batch. When ``count`` divides by ``world_size`` nothing is padded
or dropped and every sample appears exactly once across ranks (invariant 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from batchd.wire import MAX_SEED, check_int, is_int

__all__ = ["MAX_SEED", "EpochPlan", "mix64", "permutation", "split_order", "uniforms"]


_M64 = 2**64 - 1
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
_GAMMA = 0x9E3779B97F4A7C15
_PERM_DOMAIN = int.from_bytes(b"permute1", "big")
_AUG_DOMAIN = int.from_bytes(b"augment1", "big")
_SPLIT_DOMAIN = int.from_bytes(b"splitrd1", "big")

_U64_C1 = np.uint64(_C1)
_U64_C2 = np.uint64(_C2)
_U64_GAMMA = np.uint64(_GAMMA)


def _mix64_int(z: int) -> int:
    """splitmix64 finalizer on a Python int (used for keys: no numpy scalar overflow warnings)."""
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def mix64(z: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """splitmix64 finalizer, element-wise, modulo 2**64. Overwrites and returns ``z``.

    Array (not scalar) arithmetic on purpose: numpy wraps uint64 array overflow silently,
    which is the modular arithmetic wanted here.
    """
    tmp = z >> np.uint64(30)
    z ^= tmp
    z *= _U64_C1
    np.right_shift(z, np.uint64(27), out=tmp)
    z ^= tmp
    z *= _U64_C2
    np.right_shift(z, np.uint64(31), out=tmp)
    z ^= tmp
    return z


def _check_seed(name: str, value: int) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an int in 0..2**63-1, got {type(value).__name__}")
    value = int(value)
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be in 0..2**63-1, got {value}")
    return value


def _key(domain: int, seed: int, epoch: int) -> int:
    seed = _check_seed("seed", seed)
    epoch = _check_seed("epoch", epoch)
    return _mix64_int(_mix64_int(seed ^ domain) ^ epoch)


def _stream(key: int, n: int) -> NDArray[np.uint64]:
    """``mix64(key + (i + 1) * GAMMA)`` for i in 0..n-1: the splitmix64 sequence from ``key``."""
    z = np.arange(1, n + 1, dtype=np.uint64)
    z *= _U64_GAMMA
    z += np.uint64(key)
    return mix64(z)


def _argsort_stream(n: int, key: int) -> NDArray[np.uint32] | NDArray[np.uint64]:
    if not is_int(n) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    order = np.argsort(_stream(key, int(n)), kind="quicksort")  # distinct keys: no ties
    if n < 2**32:
        return order.astype(np.uint32)
    return order.astype(np.uint64)


def permutation(n: int, seed: int, epoch: int) -> NDArray[np.uint32] | NDArray[np.uint64]:
    """The epoch's order: a uniform random permutation of ``0..n-1`` from (seed, epoch) alone.

    ``argsort`` of a counter-based 64-bit hash (see the module docstring for the exact
    recipe). Returned as ``uint32`` (``uint64`` when ``n >= 2**32``); computing it takes
    about 16 bytes per sample transiently, keeping it 4.
    """
    return _argsort_stream(n, _key(_PERM_DOMAIN, seed, epoch))


def split_order(n: int, split_seed: int) -> NDArray[np.uint32] | NDArray[np.uint64]:
    """The order split slices are taken over: a permutation of ``0..n-1`` from ``split_seed``.

    Same recipe as :func:`permutation` under its own domain (module docstring), so it
    depends on neither ``seed`` nor ``epoch``: a split stays the same samples while
    epochs reshuffle inside it.
    """
    return _argsort_stream(n, _key(_SPLIT_DOMAIN, split_seed, 0))


def uniforms(
    seed: int, epoch: int, ids: NDArray[np.integer], stream: int, n: int
) -> NDArray[np.float64]:
    """``n`` uniform draws in [0, 1) per sample id: shape ``(len(ids), n)``.

    Keyed by (seed, epoch, sample id, stream, draw index) only, so a sample gets the same
    numbers whatever batch, rank or thread it is computed in. ``stream`` separates
    independent consumers (the augmentation pipeline passes the op's position).
    Vectorised uint64 arithmetic: about 0.1 us per draw, no Generator per sample.
    """
    key = _key(_AUG_DOMAIN, seed, epoch)
    if not is_int(stream) or stream < 0:
        raise ValueError(f"stream must be a non-negative int, got {stream!r}")
    if not is_int(n) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    ids_arr = np.asarray(ids)
    if ids_arr.ndim != 1 or not np.issubdtype(ids_arr.dtype, np.integer):
        raise ValueError(f"ids must be a 1-d integer array, got {ids_arr.dtype} {ids_arr.shape}")
    if ids_arr.size and ids_arr.min() < 0:
        raise ValueError("ids must be non-negative sample ids")
    base = ids_arr.astype(np.uint64)  # a fresh array: mix64 works in place
    base ^= np.uint64(key)
    mix64(base)
    base ^= np.uint64(int(stream) & _M64)
    mix64(base)
    draws = np.arange(1, int(n) + 1, dtype=np.uint64)
    draws *= _U64_GAMMA
    z = base[:, None] + draws[None, :]
    mix64(z)
    z >>= np.uint64(11)
    out = z.astype(np.float64)
    out *= 2.0**-53
    return out


@dataclass(frozen=True, kw_only=True)
class EpochPlan:
    """How one rank walks one epoch: sample counts, padding and batch slicing.

    Pure arithmetic; the order itself comes from :func:`permutation` (or natural order
    when ``shuffle`` is false). Raises ValueError naming the parameter on bad values.
    """

    count: int
    batch_size: int
    shuffle: bool = True
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1

    #: Samples this rank sees in the epoch (the same for every rank).
    samples_per_rank: int = field(init=False)
    #: Batches this rank serves in the epoch.
    num_batches: int = field(init=False)
    #: Sample slots repeated (wrapped round) across all ranks so that ranks are equal.
    padded: int = field(init=False)
    #: Samples left out across all ranks (drop_last with count not divisible by world_size).
    dropped: int = field(init=False)

    def __post_init__(self) -> None:
        check_int("count", self.count, 0)
        check_int("batch_size", self.batch_size, 1)
        check_int("world_size", self.world_size, 1)
        check_int("rank", self.rank, 0, self.world_size - 1)
        if not isinstance(self.shuffle, bool):
            raise ValueError(f"shuffle must be a bool, got {self.shuffle!r}")
        if not isinstance(self.drop_last, bool):
            raise ValueError(f"drop_last must be a bool, got {self.drop_last!r}")
        ws = self.world_size
        if self.drop_last:
            spr = self.count // ws
            nb = spr // self.batch_size
        else:
            spr = -(-self.count // ws)
            nb = -(-spr // self.batch_size)
        total = spr * ws
        object.__setattr__(self, "samples_per_rank", spr)
        object.__setattr__(self, "num_batches", nb)
        object.__setattr__(self, "padded", max(total - self.count, 0))
        object.__setattr__(self, "dropped", max(self.count - total, 0))

    def _check_order(self, order: NDArray[np.integer] | None) -> NDArray[np.integer] | None:
        if order is None:
            if self.shuffle:
                raise ValueError(
                    "shuffle=True needs the epoch's order: pass permutation(count, seed, epoch)"
                )
            return None
        if not self.shuffle:
            raise ValueError("shuffle=False walks the natural order: pass order=None")
        if order.ndim != 1 or order.shape[0] != self.count:
            raise ValueError(
                f"order must be 1-d of length count={self.count}, got shape {order.shape}"
            )
        return order

    def _positions(self, start: int, stop: int) -> NDArray[np.int64]:
        # Position j of this rank is global position rank + j*ws of the padded order;
        # padding wraps round, so position p holds order[p % count] (DistributedSampler's
        # `indices += indices[:pad]`, repeated when pad > count).
        pos = np.arange(start, stop, dtype=np.int64)
        pos *= self.world_size
        pos += self.rank
        if self.padded:
            pos %= self.count
        return pos

    def _take(self, order: NDArray[np.integer] | None, start: int, stop: int) -> NDArray[np.int64]:
        order = self._check_order(order)
        pos = self._positions(start, stop)
        if order is None:
            return pos
        return order[pos].astype(np.int64, copy=False)

    def rank_ids(self, order: NDArray[np.integer] | None) -> NDArray[np.int64]:
        """This rank's sample ids for the whole epoch, in order (length ``samples_per_rank``)."""
        return self._take(order, 0, self.samples_per_rank)

    def batch_ids(self, order: NDArray[np.integer] | None, k: int) -> NDArray[np.int64]:
        """Sample ids of this rank's batch ``k`` (0-based); the last one may be short.

        IndexError when ``k`` is not in ``0..num_batches-1``.
        """
        if not is_int(k):
            raise IndexError(f"batch index must be an int, got {k!r}")
        if not 0 <= k < self.num_batches:
            raise IndexError(
                f"batch index {k} out of range: this epoch has {self.num_batches} batches "
                f"(0..{self.num_batches - 1}) for count={self.count}, "
                f"batch_size={self.batch_size}, "
                f"world_size={self.world_size}, drop_last={self.drop_last}"
            )
        start = int(k) * self.batch_size
        return self._take(order, start, min(start + self.batch_size, self.samples_per_rank))
