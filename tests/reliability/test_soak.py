"""Load: a soak of 8 mixed clients, and overload turned into 503 + Retry-After.

The soak runs ``BATCHD_SOAK_SECONDS`` (default 45): 8 clients on 3 datasets with
different seeds, batch sizes, pipelines and shards. Asserted: 0 errors, every epoch
exactly once, and after a warm-up (the first quarter) the server's open file
descriptors and thread count do not grow and its RSS grows by less than 64 MB.
The samples (RSS, fds, threads per second) go to ``figures``.
"""

from __future__ import annotations

import http.client
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from _common import Figures, RetryCounter, env_int, summary

from batchd import Client, _transport
from batchd_server.shuffle import EpochPlan, permutation
from serverproc import ServerProcess, tiny_pack

pytestmark = pytest.mark.reliability

AUG: list[dict[str, Any]] = [{"op": "random_crop", "size": 24}, {"op": "hflip"}]
SIZES = {"a": (512, 32), "b": (256, 48), "c": (96, 16)}
CLIENTS: list[dict[str, Any]] = [
    {"dataset": "a", "batch_size": 32, "seed": 1},
    {"dataset": "a", "batch_size": 8, "seed": 2, "augment": AUG},
    {"dataset": "a", "batch_size": 16, "seed": 3, "rank": 0, "world_size": 2},
    {"dataset": "a", "batch_size": 16, "seed": 3, "rank": 1, "world_size": 2},
    {"dataset": "b", "batch_size": 64, "seed": 4, "augment": AUG},
    {"dataset": "b", "batch_size": 5, "seed": 5, "drop_last": True},
    {"dataset": "c", "batch_size": 7, "seed": 6, "shuffle": False},
    {"dataset": "c", "batch_size": 96, "seed": 1},
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("soak")
    for name, (n, hw) in SIZES.items():
        tiny_pack(root / name, n=n, hw=hw, seed=len(name) + n)
    return root


def _planned(spec: dict[str, Any], epoch: int) -> list[int]:
    n = SIZES[spec["dataset"]][0]
    plan = EpochPlan(
        count=n,
        batch_size=spec["batch_size"],
        shuffle=spec.get("shuffle", True),
        drop_last=spec.get("drop_last", False),
        rank=spec.get("rank", 0),
        world_size=spec.get("world_size", 1),
    )
    order = permutation(n, spec["seed"], epoch) if plan.shuffle else None
    return sorted(
        np.concatenate([plan.batch_ids(order, k) for k in range(plan.num_batches)]).tolist()
    )


def _sample(proc: psutil.Process) -> tuple[int, int, int]:
    return proc.memory_info().rss, proc.num_fds(), proc.num_threads()


@pytest.mark.timeout(900)
def test_soak_eight_mixed_clients(data: Path, figures: Figures) -> None:
    seconds = env_int("BATCHD_SOAK_SECONDS", 45)
    srv = ServerProcess(data, args=["--cache-bytes", "32MiB"]).start()
    stop = threading.Event()
    errors: list[str] = []
    epochs = [0] * len(CLIENTS)
    batches = [0] * len(CLIENTS)

    def run(i: int, spec: dict[str, Any]) -> None:
        try:
            with Client(srv.url, prefetch=2, timeout=30, retry_deadline=30, **spec) as client:
                epoch = 0
                while not stop.is_set():
                    ids: list[int] = []
                    for batch in client.iterate(epoch):
                        ids.extend(batch["index"].tolist())
                        batches[i] += 1
                        if stop.is_set():
                            return
                    if sorted(ids) != _planned(spec, epoch):
                        errors.append(f"client {i} epoch {epoch}: not exactly once")
                    epoch += 1
                    epochs[i] = epoch
        except Exception as exc:
            errors.append(f"client {i}: {type(exc).__name__}: {exc}")

    assert srv.proc is not None
    proc = psutil.Process(srv.proc.pid)
    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(CLIENTS)]
    samples: list[tuple[float, int, int, int]] = []
    t0 = time.monotonic()
    try:
        for t in threads:
            t.start()
        while time.monotonic() - t0 < seconds and not errors:
            samples.append((time.monotonic() - t0, *_sample(proc)))
            time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        alive = srv.proc is not None and srv.proc.poll() is None
        srv.stop()
    assert not errors, errors
    assert alive and all(e >= 1 for e in epochs), epochs
    warm = [s for s in samples if s[0] >= seconds / 4]
    assert len(warm) >= 3
    rss0, fds0, thr0 = warm[0][1:]
    rss_max = max(s[1] for s in warm)
    fds_max = max(s[2] for s in warm)
    thr_max = max(s[3] for s in warm)
    assert rss_max - rss0 < 64e6, (rss0, rss_max)
    assert fds_max <= fds0 + 4, (fds0, fds_max)
    assert thr_max <= thr0 + 2, (thr0, thr_max)
    elapsed = time.monotonic() - t0
    figures.record(
        "soak",
        seconds=round(elapsed, 1),
        clients=len(CLIENTS),
        datasets=len(SIZES),
        batches=sum(batches),
        batches_per_s=round(sum(batches) / elapsed, 1),
        epochs=sum(epochs),
        errors=len(errors),
        rss_mb_after_warmup=round(rss0 / 1e6, 1),
        rss_growth_mb=round((samples[-1][1] - rss0) / 1e6, 1),
        rss_max_growth_mb=round((rss_max - rss0) / 1e6, 1),
        fds_after_warmup=fds0,
        fds_max=fds_max,
        threads_after_warmup=thr0,
        threads_max=thr_max,
        timeline=[[round(t, 1), round(r / 1e6, 1), f, n] for t, r, f, n in samples],
    )


@pytest.fixture
def attempts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, float, int]]]:
    """Every attempt as (thread, finish time, status or 0 for a network error)."""
    log: list[tuple[int, float, int]] = []
    once = _transport.Transport._once

    def logged(self: _transport.Transport, *a: Any, **kw: Any) -> Any:
        try:
            resp = once(self, *a, **kw)
        except (OSError, http.client.HTTPException):
            log.append((threading.get_ident(), time.monotonic(), 0))
            raise
        log.append((threading.get_ident(), time.monotonic(), resp.status))
        return resp

    monkeypatch.setattr(_transport.Transport, "_once", logged)
    yield log


def test_overload_is_503_retry_after_and_clients_honour_it(
    data: Path,
    figures: Figures,
    attempts: list[tuple[int, float, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--max-inflight 1 with 8 clients asking for different heavy batches: overload is
    answered 503 + Retry-After: 1, each client waits that long before retrying that
    request, and every epoch completes (no timeouts, no errors)."""
    retries = RetryCounter(monkeypatch)
    srv = ServerProcess(
        data,
        args=["--max-inflight", "1", "--threads", "1", "--readahead", "0", "--cache-bytes", "0"],
    ).start()
    errors: list[str] = []
    txs: list[object] = []

    def run(seed: int) -> None:
        try:
            with Client(
                srv.url,
                "b",
                batch_size=64,
                seed=seed,
                augment=AUG,
                prefetch=1,
                timeout=10,
                retry_deadline=60,
            ) as client:
                ids = [i for b in client.iterate(0) for i in b["index"].tolist()]
                txs.append(client._transport())
                if sorted(ids) != list(range(SIZES["b"][0])):
                    errors.append(f"seed {seed}: not exactly once")
        except Exception as exc:
            errors.append(f"seed {seed}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(s,)) for s in range(8)]
    t0 = time.monotonic()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        srv.stop()
    elapsed = time.monotonic() - t0
    assert not errors, errors
    statuses = [s for _, _, s in attempts]
    assert 503 in statuses, "no overload happened: the test did not test anything"
    assert 0 not in statuses, "a request failed at the network level (timeout?)"
    # Honoured: after a 503, the same thread's next attempt waits >= Retry-After (1 s).
    waits = []
    by_thread: dict[int, list[tuple[float, int]]] = {}
    for tid, when, status in attempts:
        by_thread.setdefault(tid, []).append((when, status))
    for seq in by_thread.values():
        for (t1, s1), (t2, _) in itertools.pairwise(seq):
            if s1 == 503:
                waits.append(t2 - t1)
    assert waits and min(waits) >= 0.95, min(waits)
    figures.record(
        "overload",
        clients=8,
        max_inflight=1,
        requests=len(statuses),
        answered_503=statuses.count(503),
        network_errors=0,
        retry_wait_s=summary(waits),
        retries_per_client=sorted(retries.retries(tx) for tx in txs),
        seconds=round(elapsed, 1),
    )
