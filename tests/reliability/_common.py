"""Helpers shared by the reliability tests: reference batches, digests, retry counting."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
from numpy.typing import NDArray

from batchd import _transport
from batchd.wire import decode_batch
from batchd_server.serve.engine import Engine, EngineConfig
from batchd_server.serve.registry import Registry
from batchd_server.serve.request import BatchRequest


def digest(fields: Mapping[str, NDArray[Any]]) -> str:
    """A digest of every array's name, dtype, shape and bytes (a batch, ``index`` included)."""
    h = xxhash.xxh3_128()
    for name in sorted(fields):
        a = np.ascontiguousarray(fields[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.data)
    return h.hexdigest()


def reference(data: Path, requests: Iterable[BatchRequest]) -> dict[BatchRequest, str]:
    """Digests of an uninterrupted in-process run of ``requests`` (one engine, no cache)."""
    todo = list(dict.fromkeys(requests))

    async def run() -> dict[BatchRequest, str]:
        eng = Engine(Registry(data), EngineConfig(threads=2, cache_bytes=0, readahead=0))
        try:
            out = {}
            for req in todo:
                batch = decode_batch((await eng.batch(req)).body)
                out[req] = digest({**batch.fields, "index": batch.index})
            return out
        finally:
            eng.close()

    return asyncio.run(run())


def tiny_images(n: int, hw: int, seed: int) -> NDArray[np.uint8]:
    """The ``image`` field :func:`serverproc.tiny_pack` writes for these arguments."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, hw, hw, 3), dtype=np.uint8)


class RetryCounter:
    """Counts, per Transport, calls to ``get`` and attempts (``_once``).

    Retries are the difference.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._lock = threading.Lock()
        self.gets: dict[int, int] = {}
        self.attempts: dict[int, int] = {}
        get, once = _transport.Transport.get, _transport.Transport._once
        counter = self

        def counted_get(self: _transport.Transport, *a: Any, **kw: Any) -> Any:
            counter._bump(counter.gets, id(self))
            return get(self, *a, **kw)

        def counted_once(self: _transport.Transport, *a: Any, **kw: Any) -> Any:
            counter._bump(counter.attempts, id(self))
            return once(self, *a, **kw)

        monkeypatch.setattr(_transport.Transport, "get", counted_get)
        monkeypatch.setattr(_transport.Transport, "_once", counted_once)

    def _bump(self, table: dict[int, int], key: int) -> None:
        with self._lock:
            table[key] = table.get(key, 0) + 1

    def retries(self, tx: object) -> int:
        with self._lock:
            return self.attempts.get(id(tx), 0) - self.gets.get(id(tx), 0)


OUT_ENV = "BATCHD_RELIABILITY_OUT"


def env_int(name: str, default: int) -> int:
    """A positive int knob from the environment; a bad value is an error, not ignored."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise pytest.UsageError(f"{name}={raw!r} must be an integer") from None
    if value < 1:
        raise pytest.UsageError(f"{name}={raw!r} must be >= 1")
    return value


def summary(values: list[float]) -> dict[str, float | int]:
    """count, p50, max (and mean) of a list of seconds or counts; zeros when empty."""
    if not values:
        return {"n": 0, "p50": 0.0, "max": 0.0, "mean": 0.0}
    return {
        "n": len(values),
        "p50": round(statistics.median(values), 4),
        "max": round(max(values), 4),
        "mean": round(statistics.fmean(values), 4),
    }


class Figures:
    """Sections of measured figures, merged into one JSON file at the end of the session."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Any]] = {}

    def record(self, section: str, **values: Any) -> None:
        with self._lock:
            self._data.setdefault(section, {}).update(values)

    def write(self) -> None:
        with self._lock:
            if not self._data:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            old: dict[str, Any] = {}
            if self.path.exists():
                try:
                    old = json.loads(self.path.read_text())
                except ValueError:
                    old = {}
            # Merge: running one module at a time keeps the other modules' sections.
            old.update(self._data)
            self.path.write_text(json.dumps(old, indent=1, sort_keys=True))
