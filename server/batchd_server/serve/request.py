"""A batch request's parameters, validated in one place.

The HTTP layer (``app.py``) parses types only (an int is an int, a bool a bool) and
documents the ranges in the OpenAPI schema; every range is checked here, once, against
the limits of the wire contract (:mod:`batchd.wire`), and a bad value is an
:class:`~batchd_server.errors.InvalidParameter` naming the parameter. The same
:class:`BatchRequest` serves ``GET /v1/datasets/{name}`` with ``batch_size`` (the epoch
plan) and the batch route, so both answer a given request the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from batchd.wire import MAX_SEED, MAX_WORLD_SIZE, check_int

from ..errors import BatchOutOfRange, InvalidParameter
from ..shuffle import EpochPlan

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

    def __post_init__(self) -> None:
        _check("seed", self.seed, 0, MAX_SEED)
        _check("epoch", self.epoch, 0, MAX_SEED)
        _check("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        # The cap keeps sample positions (index * world_size) inside int64: a larger
        # world_size was an OverflowError, a 500 (found by tests/reliability).
        _check("world_size", self.world_size, 1, MAX_WORLD_SIZE)
        _check("rank", self.rank, 0, self.world_size - 1)

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
            )
