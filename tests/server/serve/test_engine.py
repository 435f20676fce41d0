"""The engine in-process: correctness of batches, single-flight, cache bound, read-ahead,
overload, and the registry (added, replaced and broken packs, hostile names)."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from batchd.wire import decode_batch
from batchd_server.augment import Pipeline
from batchd_server.errors import ConfigError, Rejected
from batchd_server.format import open_dataset
from batchd_server.serve.cache import ByteLRU
from batchd_server.serve.engine import Engine, EngineConfig, Served
from batchd_server.serve.pool import PriorityPool
from batchd_server.serve.registry import Registry, check_name
from batchd_server.serve.request import BatchRequest
from batchd_server.shuffle import EpochPlan, permutation
from serverproc import tiny_pack

T = TypeVar("T")

AUG = '[{"op":"random_crop","size":12},{"op":"hflip"}]'


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def engine(data: Path, **kw: Any) -> Engine:
    return Engine(Registry(data), EngineConfig(**{"threads": 2, **kw}))


async def _serve(eng: Engine, **kw: Any) -> Served:
    return await eng.batch(BatchRequest(**{"dataset": "tiny", "batch_size": 8, "k": 0, **kw}))


def get(data: Path, **kw: Any) -> Served:
    eng = engine(data)
    try:
        return run(_serve(eng, **kw))
    finally:
        eng.close()


# --- what a batch holds ----------------------------------------------------------------


def test_raw_batch_is_the_planned_samples(data: Path) -> None:
    served = get(data, seed=3, epoch=1, k=2)
    batch = decode_batch(served.body)
    plan = EpochPlan(count=40, batch_size=8)
    want = plan.batch_ids(permutation(40, 3, 1), 2)
    np.testing.assert_array_equal(batch.index, want)
    np.testing.assert_array_equal(batch.fields["label"], want)  # label == sample id
    with open_dataset(data / "tiny") as ds:
        np.testing.assert_array_equal(batch.fields["image"], ds.array("image")[want])
        assert batch.fingerprint == ds.fingerprint == served.fingerprint
    assert (batch.epoch, batch.batch) == (1, 2)


def test_short_last_batch_and_natural_order(data: Path) -> None:
    batch = decode_batch(get(data, shuffle=False, batch_size=16, k=2).body)
    np.testing.assert_array_equal(batch.index, np.arange(32, 40))


@pytest.mark.parametrize(
    "augment",
    [AUG, '[{"op":"hflip"},{"op":"vflip","p":0.3}]'],  # the second: gathered, flipped in place
)
def test_augmented_batch_equals_one_pipeline_run(
    data: Path, request: pytest.FixtureRequest, augment: str
) -> None:
    """Rows split over threads give the bytes of one single-threaded run (invariant 4)."""
    served = get(data, seed=5, epoch=2, k=1, augment=augment)
    batch = decode_batch(served.body)
    ds = open_dataset(data / "tiny")
    pipe = Pipeline.parse(augment)
    request.addfinalizer(ds.close)
    out_fields = pipe.output_fields(ds.fields)
    out = {n: np.zeros((8, *shape), dt) for n, (dt, shape) in out_fields.items()}
    ids = batch.index
    pipe.run(
        lambda r: {n: ds.array(n)[int(ids[r])] for n in ds.fields},
        ids,
        5,
        2,
        out,
        range(8),
        fields=ds.fields,
    )
    assert batch.fields["image"].shape == (8, *out_fields["image"][1])
    for name in out:
        np.testing.assert_array_equal(batch.fields[name], out[name])


def test_same_request_same_bytes_any_thread_count(data: Path) -> None:
    bodies = []
    for threads in (1, 2, 3):
        eng = engine(data, threads=threads)
        try:
            bodies.append(bytes(run(_serve(eng, seed=9, epoch=4, augment=AUG, batch_size=20)).body))
        finally:
            eng.close()
    assert bodies[0] == bodies[1] == bodies[2]


def test_epochs_and_seeds_differ(data: Path) -> None:
    a = decode_batch(get(data, seed=1, epoch=0).body).index
    b = decode_batch(get(data, seed=1, epoch=1).body).index
    c = decode_batch(get(data, seed=2, epoch=0).body).index
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_split_is_part_of_the_cache_key(data: Path) -> None:
    """Invariant 1: the split expression and seed decide the bytes, so the key holds them."""
    eng = engine(data)

    async def go() -> list[Served]:
        return [
            await _serve(eng, seed=1, **kw)
            for kw in (
                {},
                {"split": "[:50%]"},
                {"split": "[0%:50%]"},  # the same split, written otherwise: a cache hit
                {"split": "[:50%]", "split_seed": 1},
                {"split": "[50%:]"},
            )
        ]

    try:
        whole, half, same, reseeded, other = run(go())
    finally:
        eng.close()
    assert (half.source, same.source) == ("miss", "hit") and bytes(same.body) == bytes(half.body)
    index = [decode_batch(s.body).index for s in (whole, half, reseeded, other)]
    assert half.num_batches == 3 and whole.num_batches == 5
    for i, a in enumerate(index):
        for b in index[i + 1 :]:
            assert not np.array_equal(a, b)
    split_ids = decode_batch(half.body).index
    assert not set(split_ids.tolist()) & set(decode_batch(other.body).index.tolist())


# --- bad requests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "status", "code", "needle"),
    [
        ({"k": 5}, 404, "batch_out_of_range", "5 batches"),
        ({"k": -1}, 404, "batch_out_of_range", "5 batches"),
        ({"batch_size": 0}, 400, "invalid_parameter", "batch_size"),
        ({"rank": 2, "world_size": 2}, 400, "invalid_parameter", "rank"),
        ({"world_size": 0}, 400, "invalid_parameter", "world_size"),
        ({"seed": -1}, 400, "invalid_parameter", "seed"),
        ({"epoch": 2**63}, 400, "invalid_parameter", "epoch"),
        ({"augment": '[{"op":"zoom"}]'}, 400, "invalid_pipeline", "zoom"),
        ({"augment": '[{"op":"hflip","p":2}]'}, 400, "invalid_pipeline", "(hflip): p must"),
        ({"augment": "[{"}, 400, "invalid_pipeline", "JSON"),
        ({"dataset": "nope"}, 404, "unknown_dataset", "tiny"),
        ({"dataset": "../tiny"}, 400, "invalid_name", "plain directory name"),
    ],
)
def test_bad_requests_are_rejected(
    data: Path, kw: dict[str, Any], status: int, code: str, needle: str
) -> None:
    with pytest.raises(Rejected) as info:
        get(data, **kw)
    assert (info.value.status, info.value.code) == (status, code)
    assert needle in info.value.detail


def test_the_size_cap_counts_the_samples_a_batch_really_holds(data: Path) -> None:
    cap = 64 * 1024 + 50 * (16 * 16 * 3 + 16)  # room for 50 samples: the whole pack of 40
    eng = engine(data, max_batch_bytes=cap)
    try:
        served = run(_serve(eng, batch_size=5000))  # one batch of all 40 samples
        assert served.num_batches == 1 and len(decode_batch(served.body).index) == 40
    finally:
        eng.close()


def test_too_large_names_the_cap_and_a_batch_size_that_fits(data: Path) -> None:
    cap = 64 * 1024 + 10 * (16 * 16 * 3 + 16)  # room for exactly 10 samples
    eng = engine(data, max_batch_bytes=cap)
    try:
        with pytest.raises(Rejected) as info:
            run(_serve(eng, batch_size=11))
        assert str(cap) in info.value.detail and "batch_size <= 10" in info.value.detail
        run(_serve(eng, batch_size=10))
    finally:
        eng.close()


def test_info_reports_the_plan_a_batch_would_use_and_refuses_what_it_would(data: Path) -> None:
    cap = 64 * 1024 + 10 * (16 * 16 * 3 + 16)  # room for exactly 10 samples
    eng = engine(data, max_batch_bytes=cap)
    try:
        info = run(eng.info("tiny", batch_size=7, drop_last=True, augment=AUG))
        served = run(_serve(eng, batch_size=7, drop_last=True, augment=AUG))
        assert info["plan"]["num_batches"] == served.num_batches == 40 // 7
        assert info["plan"]["samples_per_rank"] == 40
        with pytest.raises(Rejected) as refused:
            run(eng.info("tiny", batch_size=11))
        assert refused.value.status == 413 and "batch_size <= 10" in refused.value.detail
        assert run(eng.info("tiny"))["count"] == 40  # no batch_size: facts only, no cap
    finally:
        eng.close()


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="--threads"):
        EngineConfig(threads=0)
    with pytest.raises(ConfigError, match="--cache-bytes"):
        EngineConfig(cache_bytes=-1)


# --- sharing: single-flight, cache, read-ahead, overload -----------------------------------


def test_identical_concurrent_requests_compute_once(data: Path) -> None:
    eng = engine(data, readahead=0)

    async def go() -> list[Served]:
        return await asyncio.gather(*(_serve(eng, seed=7, augment=AUG) for _ in range(8)))

    try:
        served = run(go())
    finally:
        eng.close()
    sources = sorted(s.source for s in served)
    assert sources.count("miss") == 1, sources
    assert set(sources) <= {"miss", "join", "hit"}
    assert all(s.body is served[0].body for s in served)  # one buffer, shared


def test_cache_is_bounded_in_bytes(data: Path) -> None:
    size = len(get(data).body)
    eng = engine(data, readahead=0, cache_bytes=int(size * 2.5))

    async def go() -> list[str]:
        for k in range(5):
            await _serve(eng, k=k)
        assert eng.cache_bytes <= int(size * 2.5)
        assert eng.cache_bytes == 2 * size
        return [(await _serve(eng, k=k)).source for k in (4, 3, 0)]

    try:
        assert run(go()) == ["hit", "hit", "miss"]
    finally:
        eng.close()


def test_bodies_are_laid_out_in_recycled_memory(tmp_path: Path) -> None:
    """A body nobody holds any more (sent, evicted) is reused, not freed and re-faulted."""
    tiny_pack(tmp_path / "tiny", n=64, hw=96)  # 64 x 27 KiB: past Buffers.MIN_BYTES
    eng = engine(tmp_path, readahead=0, cache_bytes=0)

    async def go() -> None:
        first = await _serve(eng, batch_size=64)
        was = weakref.ref(first.body.base)
        again = await _serve(eng, batch_size=64, epoch=1)
        assert again.body.base is not was()  # `first` is still held
        del first
        third = await _serve(eng, batch_size=64, epoch=2)
        assert third.body.base is was()
        np.testing.assert_array_equal(
            decode_batch(third.body).fields["label"], decode_batch(third.body).index
        )

    try:
        run(go())
    finally:
        eng.close()


def test_byte_lru_skips_oversized_bodies() -> None:
    lru: ByteLRU[int] = ByteLRU(100)
    lru.put(1, np.zeros(60, np.uint8))
    lru.put(2, np.zeros(60, np.uint8))  # evicts 1
    lru.put(3, np.zeros(101, np.uint8))  # never fits: not kept, nothing evicted
    assert 1 not in lru and 2 in lru and 3 not in lru and lru.nbytes == 60


def test_read_ahead_fills_the_cache(data: Path) -> None:
    eng = engine(data, readahead=2)

    async def settle() -> None:
        for _ in range(500):  # let the background flights finish
            if not eng._flights:
                return
            await asyncio.sleep(0.01)

    async def source(k: int) -> str:
        return (await _serve(eng, k=k, batch_size=4, augment=AUG)).source

    async def go() -> list[str]:
        got = [await source(0)]
        await settle()
        got += [await source(1), await source(2)]  # read ahead after 0
        await settle()
        got += [await source(4), await source(8)]  # 3, 4 read ahead after 2; 8 is not
        return got

    try:
        assert run(go()) == ["miss", "hit", "hit", "hit", "miss"]
    finally:
        eng.close()


def test_overload_is_503_with_retry_after(data: Path) -> None:
    eng = engine(data, threads=1, max_inflight=1, readahead=0)
    gate = threading.Event()

    async def go() -> None:
        blocker = eng._pool.submit(0, gate.wait, 10)  # occupy the only worker
        first = asyncio.create_task(_serve(eng, k=0))
        for _ in range(200):
            if eng._flights:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(Rejected) as info:
            await _serve(eng, k=1)
        assert info.value.status == 503 and info.value.headers["Retry-After"]
        joined = asyncio.create_task(_serve(eng, k=0))  # identical: joins, not refused
        await asyncio.sleep(0.05)
        gate.set()
        await blocker
        a, b = await first, await joined
        assert (a.source, b.source) == ("miss", "join")

    try:
        run(go())
    finally:
        gate.set()
        eng.close()


# --- registry -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["..", ".", "a/b", "a\\b", "a\x00b", ".hidden", "x" * 256, "é" * 128, ""]
)
def test_hostile_names_are_refused(name: str) -> None:
    with pytest.raises(Rejected) as info:
        check_name(name)
    assert info.value.status == 400


def test_added_replaced_and_broken_packs(data: Path, request: pytest.FixtureRequest) -> None:
    reg = Registry(data, rescan_interval=0.0)
    request.addfinalizer(reg.close)
    old = reg.get("tiny")
    request.addfinalizer(old.close)
    with pytest.raises(Rejected, match="unknown_dataset"):
        reg.get("later")
    tiny_pack(data / "later", n=10)
    assert reg.get("later").count == 10  # unknown name triggers a rescan

    tiny_pack(data / "tiny", n=24, seed=1, overwrite=True)  # atomic swap in place
    new = reg.get("tiny")
    assert new is not old and new.count == 24 and new.fingerprint != old.fingerprint
    assert old.array("image").shape[0] == 40  # the old mapping is still readable

    broken = data / "broken"
    broken.mkdir()
    (broken / "batchd.header").write_bytes(b"not a header")
    listed = {e.name: e.describe() for e in reg.entries()}
    assert listed["broken"] == {
        "name": "broken",
        "available": False,
        "error": "batchd.header: 12 bytes is too short for a batchd header (truncated)",
    }
    assert listed["tiny"]["available"] and listed["later"]["available"]
    with pytest.raises(Rejected, match="dataset_unavailable"):
        reg.get("broken")
    (data / "not_a_pack").mkdir()  # listed as unavailable, with why (issue 16)
    listed = {e.name: e.describe() for e in reg.entries()}
    assert listed["not_a_pack"]["error"] == "an empty folder, not a batchd pack"


def test_pool_runs_foreground_before_read_ahead() -> None:
    pool = PriorityPool(1)
    gate = threading.Event()
    order: list[str] = []

    async def go() -> None:
        blocked = pool.submit(0, gate.wait, 10)
        later = [pool.submit(1, order.append, "ahead-1"), pool.submit(1, order.append, "ahead-2")]
        first = pool.submit(0, order.append, "foreground")
        gate.set()
        await asyncio.gather(blocked, first, *later)

    try:
        run(go())
    finally:
        gate.set()
        pool.shutdown()
    assert order == ["foreground", "ahead-1", "ahead-2"]


def _encoded_pack(out: Path) -> None:
    import cv2

    from batchd_server.format.header import FieldSpec
    from batchd_server.format.writer import DatasetWriter, Encoded

    spec = FieldSpec(
        name="image", dtype=np.dtype("u1"), shape=None, role="image", encoding="image", channels=3
    )
    rng = np.random.default_rng(0)
    with DatasetWriter(out, [spec]) as w:
        for h, wd in ((20, 30), (24, 18), (16, 16), (30, 22)):
            ok, png = cv2.imencode(".png", rng.integers(0, 256, (h, wd, 3), dtype=np.uint8))
            assert ok
            w.append({"image": Encoded(png.tobytes(), h, wd)})
        w.commit()


def test_variable_size_images_need_a_size_op(tmp_path: Path) -> None:
    _encoded_pack(tmp_path / "tiny")
    eng = engine(tmp_path)
    try:
        with pytest.raises(Rejected) as info:
            run(_serve(eng, batch_size=4))
        assert info.value.code == "invalid_pipeline" and "add resize" in info.value.detail
        batch = decode_batch(
            run(_serve(eng, batch_size=4, augment='[{"op":"resize","size":8}]')).body
        )
        assert batch.fields["image"].shape == (4, 8, 8, 3)
        with pytest.raises(Rejected) as info:  # 16x16 sample is smaller than the crop
            run(_serve(eng, batch_size=4, augment='[{"op":"random_crop","size":18}]'))
        assert info.value.status == 400 and info.value.code == "invalid_pipeline"
    finally:
        eng.close()


@pytest.mark.parametrize(
    ("spec", "most"),
    [
        ('[{"op":"random_crop","size":12},{"op":"brightness","delta":0.2}]', 2),
        ('[{"op":"random_crop","size":12},{"op":"hflip"}]', 1),  # one chunk, one thread
    ],
)
def test_a_waited_for_batch_fills_its_row_chunks_at_once(
    data: Path, monkeypatch: pytest.MonkeyPatch, spec: str, most: int
) -> None:
    import time

    inside, seen, lock = 0, 0, threading.Lock()
    real_run, real_run_arrays = Pipeline.run, Pipeline.run_arrays

    def counted(method: Any) -> Any:
        def wrapper(self: Pipeline, *args: Any, **kw: Any) -> None:
            nonlocal inside, seen
            with lock:
                inside += 1
                seen = max(seen, inside)
            time.sleep(0.05)  # long enough for a second chunk to arrive
            try:
                method(self, *args, **kw)
            finally:
                with lock:
                    inside -= 1

        return wrapper

    monkeypatch.setattr(Pipeline, "run", counted(real_run))
    monkeypatch.setattr(Pipeline, "run_arrays", counted(real_run_arrays))
    eng = Engine(Registry(data), EngineConfig(threads=2, readahead=0))
    try:
        req = BatchRequest(dataset="tiny", k=0, batch_size=32, seed=1, augment=spec)
        body = run(eng.batch(req)).body
        assert len(decode_batch(bytes(body)).index) == 32
    finally:
        eng.close()
    assert seen == most
