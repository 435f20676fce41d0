"""Splits of one pack: the sample ids a split expression selects. Pure functions.

A split (grammar: :func:`batchd.wire.parse_split`) is a union of slices of the *split
order*, :func:`batchd_server.shuffle.split_order` of ``split_seed``: a permutation of
the pack's ids, never the packed order, so ``[:80%]`` is class-mixed even when the
pack is sorted by class, and ``[:80%]`` and ``[80%:]`` are disjoint and cover the pack.

Boundaries
----------
Slices are cut in groups: the whole pack, or with ``stratify`` each class (the samples
of one value of an integer field, in the split order restricted to them; classes by
value). In a group of ``n`` of the pack's ``N`` samples a bound is the position::

    p%   ->  (p * n + 50) // 100          p% of n, to the nearest sample, halves up
    c    ->  c                            without stratify (c <= N)
    c    ->  (2 * c * n + N) // (2 * N)   with stratify: c/N of each class, rounded alike

A missing start is 0, a missing stop is ``n``. Every slice turns a bound into a position
with the same function, so ``[a:b]`` and ``[b:c]`` meet exactly: adjacent slices never
overlap or leave a gap, and with stratify each class is cut in proportion
(``|n_c in [:80%] - 0.8 n_c| <= 0.5``). With stratify an absolute count is a fraction of
every class, so the split holds that many samples give or take half a sample a class.

The result is the selected ids in ascending order: the split's natural order
(``shuffle=False``), which each shuffled epoch permutes. A slice whose bound is past the
pack's end, one that selects nothing, one whose start lies after its stop, and slices
that overlap are refused with ValueError naming the slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from batchd.wire import SplitBound, SplitSlice

from .shuffle import split_order

__all__ = ["resolve_split"]


def _groups(
    count: int, split_seed: int, labels: NDArray[np.integer] | None
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """(ids grouped, each group's offset in it, each group's size); groups in split order."""
    order = split_order(count, split_seed).astype(np.int64)
    if labels is None:
        return order, np.zeros(1, np.int64), np.full(1, count, np.int64)
    by_class = labels[order]
    idx = np.argsort(by_class, kind="stable")  # stable: the split order within a class
    _, starts, sizes = np.unique(by_class[idx], return_index=True, return_counts=True)
    return order[idx], starts.astype(np.int64), sizes.astype(np.int64)


def _position(
    bound: SplitBound | None, default: NDArray[Any], sizes: NDArray[Any], count: int, strat: bool
) -> NDArray[Any]:
    if bound is None:
        return default
    v = bound.value
    if bound.percent:
        return (v * sizes + 50) // 100
    if not strat:
        return np.full_like(sizes, v)
    return (2 * v * sizes + count) // (2 * count)


def resolve_split(
    parts: Sequence[SplitSlice],
    count: int,
    split_seed: int,
    labels: NDArray[np.integer] | None = None,
) -> NDArray[np.int64]:
    """The ids (ascending) that ``parts`` select from a pack of ``count`` samples.

    ``labels``: the stratify field, one integer per sample (None: no stratify).
    ValueError names the slice and says what is wrong (module docstring).
    """
    if labels is not None and labels.shape != (count,):
        raise ValueError(f"labels must have shape ({count},), got {labels.shape}")
    if not parts:
        raise ValueError("a split has at least one slice")
    for part in parts:
        for bound in (part.start, part.stop):
            if bound is not None and not bound.percent and bound.value > count:
                raise ValueError(
                    f"slice {part}: {bound.value} is past the end of the pack "
                    f"({count} samples); use a count up to {count} or a percent"
                )
    grouped, starts, sizes = _groups(count, split_seed, labels)
    strat = labels is not None
    # Python ints past 2**31 samples: 2 * c * n would overflow int64.
    big = sizes.astype(object) if count >= 2**31 else sizes
    zero = np.zeros_like(big)
    lo = np.stack([_position(p.start, zero, big, count, strat) for p in parts])
    hi = np.stack([_position(p.stop, big, big, count, strat) for p in parts])
    for i, part in enumerate(parts):
        if (lo[i] > hi[i]).any():
            raise ValueError(
                f"slice {part} has its start after its stop for this pack ({count} samples)"
            )
        if int((hi[i] - lo[i]).sum()) == 0:
            raise ValueError(
                f"slice {part} selects none of the {count} samples (bounds round to the "
                "nearest sample): widen it or use sample counts"
            )
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            shared = np.minimum(hi[i], hi[j]) - np.maximum(lo[i], lo[j])
            if (shared > 0).any():
                raise ValueError(
                    f"slices {parts[i]} and {parts[j]} overlap ({int(shared.clip(0).sum())} "
                    "samples in both): a split holds each sample once; write the union as "
                    "slices that only meet, e.g. '[:20%]+[40%:]'"
                )
    # Mark the selected positions of `grouped` (a difference array: slices are disjoint).
    cover = np.zeros(count + 1, np.int64)
    np.add.at(cover, (lo + starts).astype(np.int64).ravel(), 1)
    np.add.at(cover, (hi + starts).astype(np.int64).ravel(), -1)
    chosen = np.cumsum(cover[:-1]) > 0
    return np.sort(grouped[chosen])
