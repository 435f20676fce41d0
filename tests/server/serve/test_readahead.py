"""serve.readahead: whether a pack's reads are announced, decided without waiting."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from batchd_server.format import Dataset, open_dataset
from batchd_server.serve import readahead
from batchd_server.serve.readahead import ReadAhead
from serverproc import tiny_pack


def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_the_residency_check_never_runs_on_the_callers_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = open_dataset(tiny_pack(tmp_path / "tiny"))
    monkeypatch.setattr(Dataset, "reads", property(lambda self: "mapped (test)"))
    caller = threading.get_ident()
    checks: list[int] = []
    release = threading.Event()

    def resident(_ds: Dataset) -> float:
        checks.append(threading.get_ident())
        release.wait(5)  # a slow mincore over a big pack
        return 1.0

    ra = ReadAhead(resident)
    try:
        t = time.monotonic()
        assert ra.needed(ds)  # not known yet: announce, as for a pack not resident
        assert ra.needed(ds)  # one check at a time, however often it is asked
        assert time.monotonic() - t < 1.0
        _until(lambda: len(checks) == 1)
        release.set()
        _until(lambda: not ra.needed(ds))  # resident: nothing to announce
        assert checks == [checks[0]] and checks[0] != caller
    finally:
        ra.close()
        ds.close()


def test_checks_are_spaced_by_how_long_they_take(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = open_dataset(tiny_pack(tmp_path / "tiny"))
    monkeypatch.setattr(Dataset, "reads", property(lambda self: "mapped (test)"))
    monkeypatch.setattr(readahead, "_RESIDENT_CHECK_S", 0.0)
    shares = iter([0.5, 1.0])
    calls: list[float] = []

    def resident(_ds: Dataset) -> float | None:
        calls.append(time.monotonic())
        time.sleep(0.02)
        return next(shares, None)

    ra = ReadAhead(resident)
    try:
        ra.needed(ds)
        _until(lambda: ds.fingerprint in ra._checked)
        assert ra.needed(ds)  # half resident; the next check is not due for ~0.4 s
        assert len(calls) == 1

        def asked_again() -> bool:  # asking is what starts a check that is due
            ra.needed(ds)
            return len(calls) == 2

        _until(asked_again)
        assert calls[1] - calls[0] >= 0.02 / readahead._RESIDENT_CHECK_SHARE * 0.9
        _until(lambda: not ra.needed(ds))
    finally:
        ra.close()
        ds.close()
