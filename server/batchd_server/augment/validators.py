"""The augmentation ops' parameter validators: each checks one JSON value and normalises it.

A validator takes ``(value, where)`` and returns the normalised value (a float, an
int, a ``(height, width)`` or ``(low, high)`` tuple, one number per channel) or
raises ``Bad`` saying what is allowed; :func:`batchd_server.ops.parse_op` turns
that into a PipelineError naming the op and the parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from batchd.wire import is_int

__all__ = ["MAX_SIZE", "Validator"]

MAX_SIZE = 65536
REQUIRED = object()

Validator = Callable[[Any, str], Any]  # (value, where) -> normalised value, or raises Bad


class Bad(ValueError):
    """A parameter value outside its allowed range; the message says what is allowed."""


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise Bad(f"must be a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise Bad(f"must be finite, got {v!r}")
    return f


def float_in(lo: float, hi: float, *, lo_open: bool = False) -> Validator:
    def check(v: Any, _: str) -> float:
        f = _number(v)
        if f < lo or f > hi or (lo_open and f == lo):
            left = "(" if lo_open else "["
            raise Bad(f"must be in {left}{lo:g}, {hi:g}], got {v!r}")
        return f

    return check


def int_in(lo: int, hi: int) -> Validator:
    def check(v: Any, _: str) -> int:
        if not is_int(v):
            raise Bad(f"must be an integer in [{lo}, {hi}], got {v!r}")
        if not lo <= v <= hi:
            raise Bad(f"must be an integer in [{lo}, {hi}], got {v!r}")
        return int(v)

    return check


def size_pair(v: Any, where: str) -> tuple[int, int]:
    """``n`` (square) or ``[height, width]``, each in 1..MAX_SIZE."""
    one = int_in(1, MAX_SIZE)
    if isinstance(v, list | tuple):
        if len(v) != 2:
            raise Bad(f"must be [height, width], got {v!r}")
        try:
            return one(v[0], where), one(v[1], where)
        except Bad:
            raise Bad(
                f"must be [height, width] with integers in [1, {MAX_SIZE}], got {v!r}"
            ) from None
    try:
        n = one(v, where)
    except Bad:
        raise Bad(f"must be an integer in [1, {MAX_SIZE}] or [height, width], got {v!r}") from None
    return n, n


def range_in(lo: float, hi: float, *, lo_open: bool = False) -> Validator:
    def check(v: Any, where: str) -> tuple[float, float]:
        allowed = f"[low, high] with {lo:g} {'<' if lo_open else '<='} low <= high <= {hi:g}"
        if not isinstance(v, list | tuple) or len(v) != 2:
            raise Bad(f"must be {allowed}, got {v!r}")
        try:
            a, b = (float_in(lo, hi, lo_open=lo_open)(x, where) for x in v)
        except Bad:
            raise Bad(f"must be {allowed}, got {v!r}") from None
        if a > b:
            raise Bad(f"must be {allowed} (low <= high), got {v!r}")
        return a, b

    return check


def per_channel(positive: bool) -> Validator:
    def check(v: Any, where: str) -> tuple[float, ...]:
        items = v if isinstance(v, list | tuple) else [v]
        what = "positive finite numbers" if positive else "finite numbers"
        if not 1 <= len(items) <= 512:
            raise Bad(f"must be a number or a list of 1..512 {what} (one per channel), got {v!r}")
        out = []
        for x in items:
            try:
                f = _number(x)
            except Bad:
                raise Bad(f"must be {what} (one per channel), got {v!r}") from None
            if positive and f <= 0:
                raise Bad(f"must be {what} (one per channel), got {v!r}")
            out.append(f)
        return tuple(out)

    return check
