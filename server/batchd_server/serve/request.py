"""A batch request's parameters, validated in one place.

The HTTP layer (``app.py``) parses types only (an int is an int, a bool a bool) and
documents the ranges in the OpenAPI schema; every range is checked here, once, against
the limits of the wire contract (:mod:`batchd.wire`), and a bad value is an
:class:`~batchd_server.errors.InvalidParameter` naming the parameter. The same
:class:`BatchRequest` serves ``GET /v1/datasets/{name}`` with ``batch_size`` (the epoch
plan) and the batch route, so both answer a given request the same way.

A split is checked in two steps: its syntax here, on construction (the grammar is the
wire contract's, :func:`batchd.wire.parse_split`, which the client checks too), and,
once the pack is known, ``stratify`` against its fields (:meth:`BatchRequest.stratify_field`)
and the slices against its count (:meth:`BatchRequest.split_ids`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from batchd.wire import MAX_SEED, MAX_WORLD_SIZE, check_int, format_split, parse_split

from ..errors import BatchOutOfRange, InvalidParameter
from ..format import FieldSpec
from ..shuffle import EpochPlan
from ..split import resolve_split

__all__ = ["MAX_BATCH_SIZE", "BatchRequest"]

#: Far beyond any real batch; a larger value is a mistake, refused (invariant 5).
MAX_BATCH_SIZE = 2**31 - 1


def _check(name: str, value: int, low: int, high: int | None = None) -> None:
    try:
        check_int(name, value, low, high)
    except ValueError as exc:
        raise InvalidParameter(name, str(exc).removeprefix(f"{name} ")) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchRequest:
    """Everything a batch depends on besides the dataset's content (invariant 1)."""

    dataset: str
    k: int
    batch_size: int
    seed: int = 0
    epoch: int = 0
    shuffle: bool = True
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1
    augment: str = "[]"
    split: str | None = None
    """The split expression, canonical once constructed (``[:80%]``); None: the whole pack."""
    split_seed: int = 0
    stratify: str | None = None

    def __post_init__(self) -> None:
        _check("seed", self.seed, 0, MAX_SEED)
        _check("epoch", self.epoch, 0, MAX_SEED)
        _check("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        # The cap keeps sample positions (index * world_size) inside int64: a larger
        # world_size was an OverflowError, a 500 (found by tests/reliability).
        _check("world_size", self.world_size, 1, MAX_WORLD_SIZE)
        _check("rank", self.rank, 0, self.world_size - 1)
        _check("split_seed", self.split_seed, 0, MAX_SEED)
        if self.split is not None:
            try:
                canonical = format_split(parse_split(self.split))
            except ValueError as exc:
                raise InvalidParameter("split", str(exc).removeprefix("split ")) from None
            object.__setattr__(self, "split", canonical)  # equal splits, equal cache keys
        elif self.stratify is not None:
            raise InvalidParameter(
                "stratify",
                "only cuts a split: give split too, e.g. split=[:80%]&stratify=label",
            )

    @property
    def split_key(self) -> tuple[str, int, str | None] | None:
        """What selects the samples (invariant 1), or None for the whole pack."""
        if self.split is None:
            return None
        return (self.split, self.split_seed, self.stratify)

    def stratify_field(self, fields: Mapping[str, FieldSpec]) -> str | None:
        """The field to stratify by, checked to be a raw integer scalar of the pack."""
        name = self.stratify
        if name is None:
            return None
        usable = sorted(
            n
            for n, f in fields.items()
            if f.encoding == "raw" and f.shape == () and f.dtype.kind in "iu"
        )
        if name not in usable:
            why = "has no field" if name not in fields else "cannot stratify by the field"
            raise InvalidParameter(
                "stratify",
                f"dataset {self.dataset!r} {why} {name!r}: stratify takes an integer field "
                f"with one value per sample; this dataset's are {usable}",
            )
        return name

    def split_ids(self, count: int, labels: NDArray[np.integer] | None) -> NDArray[np.int64]:
        """The pack ids of the split (ascending), or 400 saying why the pack has none."""
        assert self.split is not None, "split_ids is for requests with a split"
        try:
            return resolve_split(parse_split(self.split), count, self.split_seed, labels)
        except ValueError as exc:
            raise InvalidParameter("split", str(exc)) from None  # it names the slice

    def plan(self, count: int) -> EpochPlan:
        """This rank's epoch over ``count`` samples (the parameters are valid already)."""
        return EpochPlan(
            count=count,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            rank=self.rank,
            world_size=self.world_size,
        )

    def check_k(self, plan: EpochPlan) -> None:
        """Refuse a batch index the epoch does not have (404, with the valid range)."""
        if not 0 <= self.k < plan.num_batches:
            raise BatchOutOfRange(
                f"batch {self.k} does not exist: dataset {self.dataset!r} has "
                f"{plan.num_batches} batches (0..{plan.num_batches - 1}) per epoch for "
                f"batch_size={self.batch_size}, world_size={self.world_size}, "
                f"drop_last={str(self.drop_last).lower()}"
                + ("" if self.split is None else f", split={self.split}")
            )
