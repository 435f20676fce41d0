"""Fixtures for the reliability group (``pytest -m reliability``).

Tests here assert correctness only (nothing lost or duplicated, byte-identical
batches, typed 4xx errors, a flat fd count); the figures they measure on the way
(recovery times, retries, RSS, inputs tried) go to :class:`Figures`, written as JSON
to ``$BATCHD_RELIABILITY_OUT`` (or ``reliability.json`` in pytest's temp folder) for
``python -m benchmarks.reliability`` to turn into docs/reliability.md.

Knobs for longer runs (the defaults keep the whole group to a few minutes):
``BATCHD_KILLS`` (SIGKILLs in the kill test, default 20), ``BATCHD_SOAK_SECONDS``
(default 45), ``BATCHD_FUZZ_EXAMPLES`` (schemathesis examples per operation and mode, default 150).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from _common import OUT_ENV, Figures


@pytest.fixture(scope="session")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Figures]:
    out = os.environ.get(OUT_ENV)
    path = Path(out) if out else tmp_path_factory.getbasetemp() / "reliability.json"
    fig = Figures(path)
    yield fig
    fig.write()
