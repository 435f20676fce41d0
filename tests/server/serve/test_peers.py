"""Trainers of one job are kept together under a memory budget, so that each batch is made
(and its samples read) once however many trainers take it (issue 14)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchd_server.serve import engine as engine_mod
from batchd_server.serve.cache import ByteLRU
from batchd_server.serve.engine import Engine, EngineConfig
from batchd_server.serve.memory import plan
from batchd_server.serve.peers import PEER_ACTIVE_S, Peers
from batchd_server.serve.registry import Registry
from batchd_server.serve.request import BatchRequest
from batchd_server.serve.status import ClientMark

JOB = ("job",)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _peers(*served: tuple[str, int], reach: int = 2) -> tuple[Peers, Clock]:
    clock = Clock()
    peers = Peers(clock)
    for client, k in served:
        peers.served(JOB, k, client, reach)
    return peers, clock


def test_a_trainer_more_than_the_cache_ahead_of_a_peer_is_behind_it() -> None:
    peers, _ = _peers(("a", 0), ("b", 0), ("a", 1), ("a", 2))
    assert peers.behind(JOB, 2, "a", reach=2) == []  # b needs 1 and 2: both fit
    assert peers.behind(JOB, 3, "a", reach=2) == ["b"]  # 1, 2 and 3 would not
    assert peers.behind(JOB, 3, "b", reach=2) == []  # nobody is behind b
    assert peers.wanted(JOB, 1, reach=2) and peers.wanted(JOB, 2, reach=2)
    assert not peers.wanted(JOB, 0, reach=2)  # both took it
    assert peers.wanted(JOB, 3, reach=2)  # a's next
    assert not peers.wanted(JOB, 5, reach=2)  # out of reach: the cache can't bridge it
    peers.served(JOB, 2, "b", reach=2)
    assert not peers.wanted(JOB, 2, reach=2) and peers.behind(JOB, 3, "a", reach=2) == []


def test_workers_that_split_a_job_are_not_peers() -> None:
    # DataLoader workers: one takes the even batches, the other the odd ones.
    peers, _ = _peers(*[(("w0", "w1")[k % 2], k) for k in range(6)])
    assert peers.behind(JOB, 12, "w0", reach=2) == []
    assert not peers.wanted(JOB, 6, reach=2)
    assert not any(p["shares"] for p in peers.describe(JOB).values())


def test_a_quiet_peer_is_no_longer_waited_for() -> None:
    peers, clock = _peers(("a", 0), ("b", 0), ("a", 5))
    assert peers.behind(JOB, 6, "a", reach=2) == ["b"]
    clock.now += PEER_ACTIVE_S
    assert peers.behind(JOB, 6, "a", reach=2) == []
    assert not peers.wanted(JOB, 1, reach=2)


def test_a_peer_let_go_is_waited_for_again_once_back_within_reach() -> None:
    peers, _ = _peers(("a", 0), ("b", 0), ("a", 5))
    peers.let_go(JOB, ["b"])
    assert peers.behind(JOB, 6, "a", reach=2) == []
    peers.served(JOB, 2, "b", reach=2)  # still 3 behind a
    assert peers.describe(JOB)["b"]["let_go"]
    peers.served(JOB, 4, "b", reach=2)
    assert not peers.describe(JOB)["b"]["let_go"]
    assert peers.behind(JOB, 7, "a", reach=2) == ["b"]


def test_the_cache_evicts_what_nobody_wants_first() -> None:
    lru: ByteLRU[int] = ByteLRU(100)
    lru.put(1, np.zeros(40, np.uint8))
    lru.put(2, np.zeros(40, np.uint8))
    lru.put(3, np.zeros(40, np.uint8), lambda k, _b: k == 1)  # 1 is the oldest, but wanted
    assert 1 in lru and 2 not in lru and 3 in lru and lru.nbytes == 80
    lru.put(4, np.zeros(40, np.uint8), lambda _k, _b: True)  # all wanted: the oldest goes
    assert 1 not in lru and 3 in lru and 4 in lru and lru.nbytes == 80


# --- the engine -------------------------------------------------------------------------

# A budget the tiny pack does not fit: its batches are costly to make again.
# (Room to compute a few bodies at once.)
OVER = dataclasses.replace(plan(budget=4096), compute_bytes=1 << 20)
AUG = '[{"op":"random_crop","size":12},{"op":"hflip"}]'
BATCHES = 10  # tiny: 40 samples, batch 4


def _req(k: int) -> BatchRequest:
    return BatchRequest(dataset="tiny", k=k, batch_size=4, seed=3, epoch=1, augment=AUG)


def _body_bytes(data: Path) -> int:
    eng = Engine(Registry(data), EngineConfig(threads=2))
    try:
        return int(asyncio.run(eng.batch(_req(0))).body.nbytes)
    finally:
        eng.close()


def _two_body_engine(data: Path) -> tuple[Engine, collections.Counter[int]]:
    """An engine over budget whose cache holds two bodies; it counts each batch made."""
    eng = Engine(
        Registry(data),
        EngineConfig(threads=2, readahead=0, cache_bytes=2 * _body_bytes(data) + 16),
        memory=OVER,
    )
    made: collections.Counter[int] = collections.Counter()
    compute = eng._compute_body

    async def counted(prep: Any, flight: Any) -> Any:
        made[prep.req.k] += 1
        return await compute(prep, flight)

    eng._compute_body = counted  # type: ignore[method-assign]
    return eng, made


def test_a_trainer_ahead_waits_for_its_peer_to_take_what_it_would_push_out(
    data: Path,
) -> None:
    eng, made = _two_body_engine(data)
    a, b = ClientMark("a", None), ClientMark("b", None)

    async def go() -> list[str]:
        order: list[str] = []

        async def ask(k: int, mark: ClientMark) -> None:
            served = await eng.batch(_req(k), mark)
            order.append(f"{mark.client}{k}:{served.source}")

        await ask(0, a)
        await ask(0, b)
        await ask(1, a)
        await ask(2, a)  # the cache holds 1 and 2 for b
        ahead = asyncio.create_task(ask(3, a))  # 3 would push 1 out before b took it
        await asyncio.sleep(0.2)
        assert not ahead.done()
        await ask(1, b)
        await ahead
        await ask(2, b)
        return order

    try:
        order = asyncio.run(go())
        assert order[-3:] == ["b1:hit", "a3:miss", "b2:hit"]
        assert set(made.values()) == {1}  # every batch made once
        assert eng.metrics.total(eng.metrics.peer_holds) == 1
    finally:
        eng.close()


def test_a_peer_that_does_not_catch_up_is_let_go(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_mod, "_HOLD_S", 0.1)
    eng, _ = _two_body_engine(data)
    a, b = ClientMark("a", None), ClientMark("b", None)

    async def go() -> None:
        await eng.batch(_req(0), a)
        await eng.batch(_req(0), b)
        for k in range(1, 6):  # b never asks again
            await eng.batch(_req(k), a)

    try:
        asyncio.run(go())
        assert eng.metrics.total(eng.metrics.peer_holds) == 1  # for 3; then b was let go
        assert eng.peers.describe(next(iter(eng.peers._jobs._items)))["b"]["let_go"]
    finally:
        eng.close()


@pytest.mark.parametrize("hold", [True, False])
def test_four_trainers_of_one_job_at_different_speeds(
    data: Path, monkeypatch: pytest.MonkeyPatch, hold: bool
) -> None:
    """Each trainer prefetches two batches and takes its own time per batch. Held
    together, every batch is made once and each trainer gets the bytes of a roomy
    server; without the hold (the control) the fast ones push out what the slow need."""
    if not hold:
        monkeypatch.setattr(engine_mod, "_HOLD_S", 0.0)
    eng, made = _two_body_engine(data)
    roomy = Engine(Registry(data), EngineConfig(threads=2))

    async def trainer(eng: Engine, i: int, out: dict[int, list[bytes]]) -> None:
        mark = ClientMark(f"t{i}", None)
        got: list[bytes] = []
        pending = [asyncio.ensure_future(eng.batch(_req(k), mark)) for k in range(2)]
        for k in range(BATCHES):
            got.append(bytes((await pending.pop(0)).body))
            if k + 2 < BATCHES:
                pending.append(asyncio.ensure_future(eng.batch(_req(k + 2), mark)))
            await asyncio.sleep(0.002 + 0.006 * i)  # "training"
        out[i] = got

    async def run_all(eng: Engine) -> dict[int, list[bytes]]:
        out: dict[int, list[bytes]] = {}
        await asyncio.gather(*(trainer(eng, i, out) for i in range(4)))
        return out

    try:
        want = asyncio.run(run_all(roomy))[0]
        got = asyncio.run(run_all(eng))
        assert all(g == want for g in got.values())  # invariant 1, held or not
        if hold:
            assert dict(made) == dict.fromkeys(range(BATCHES), 1)
            assert eng.metrics.total(eng.metrics.peer_holds) > 0
        else:
            assert sum(made.values()) > BATCHES
    finally:
        eng.close()
        roomy.close()


def test_a_resident_pack_never_holds(data: Path) -> None:
    roomy_plan = dataclasses.replace(OVER, budget=1 << 40)
    eng = Engine(
        Registry(data),
        EngineConfig(threads=2, readahead=0, cache_bytes=2 * _body_bytes(data) + 16),
        memory=roomy_plan,
    )
    a, b = ClientMark("a", None), ClientMark("b", None)

    async def go() -> None:
        await eng.batch(_req(0), a)
        await eng.batch(_req(0), b)
        for k in range(1, 6):
            await eng.batch(_req(k), a)

    try:
        asyncio.run(go())
        assert eng.metrics.total(eng.metrics.peer_holds) == 0
    finally:
        eng.close()
