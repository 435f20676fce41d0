"""The memory budget: the cgroup limit is found, caches are sized from it, and a pack
bigger than it is read with preadv ahead of need, giving the same bytes."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from batchd.wire import decode_batch
from batchd_server.format import Dataset, open_dataset, reader
from batchd_server.format.direct import open_direct
from batchd_server.serve.engine import Engine, EngineConfig
from batchd_server.serve.memory import MemoryPlan, _cgroup_limit, plan
from batchd_server.serve.metrics import dataset_resident_bytes
from batchd_server.serve.registry import Registry
from batchd_server.serve.request import BatchRequest
from serverproc import jpeg_pack, tiny_pack

# A budget no pack fits: nothing cached; rows this small are read ahead with preadv.
TIGHT = MemoryPlan(
    budget=4096,
    source="test",
    cache_bytes=0,
    idle_body_bytes=0,
    readahead_bytes=1 << 20,
    compute_bytes=1 << 20,
)
AUG = '[{"op":"random_crop","size":12},{"op":"hflip"}]'


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_cgroup_v1_limit_is_the_tightest_up_the_tree(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {
            "proc": "4:memory:/outer/inner\n3:cpu:/\n",
            "cg/memory/outer/memory.limit_in_bytes": str(2 << 30),
            "cg/memory/outer/inner/memory.limit_in_bytes": "9223372036854771712",  # none
        },
    )
    assert _cgroup_limit(tmp_path / "proc", tmp_path / "cg") == 2 << 30


def test_cgroup_v2_limit_and_max(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {
            "proc": "0::/pod/box\n",
            "cg/cgroup.controllers": "memory cpu",
            "cg/pod/memory.max": "max",
            "cg/pod/box/memory.max": str(600 << 20),
        },
    )
    assert _cgroup_limit(tmp_path / "proc", tmp_path / "cg") == 600 << 20
    (tmp_path / "cg/pod/box/memory.max").write_text("max")
    assert _cgroup_limit(tmp_path / "proc", tmp_path / "cg") is None


def test_caches_are_sized_from_the_budget() -> None:
    small = plan(budget=600 << 20)
    assert small.cache_bytes == 75 << 20 and small.idle_body_bytes == 600 << 16
    assert plan(budget=64 << 30).cache_bytes == 512 << 20  # the old default, as a cap
    assert plan(cache_bytes=1 << 20, budget=600 << 20).cache_bytes == 1 << 20  # as given
    assert small.fits(300 << 20) and not small.fits(600 << 20)


def _batches(eng: Engine, epoch: int) -> list[bytes]:
    async def go() -> list[bytes]:
        out = []
        for k in range(5):
            req = BatchRequest(dataset="tiny", k=k, batch_size=8, seed=3, epoch=epoch, augment=AUG)
            out.append(bytes((await eng.batch(req)).body))
        return out

    return asyncio.run(go())


def test_a_pack_over_the_budget_is_read_ahead_with_preadv_and_same_bytes(data: Path) -> None:
    roomy = Engine(Registry(data), EngineConfig(threads=2))
    tight = Engine(Registry(data), EngineConfig(threads=2, cache_bytes=0), memory=TIGHT)
    try:
        want = _batches(roomy, 1)
        got = _batches(tight, 1)
        assert got == want  # invariant 1: the read path never changes a byte
        ds = tight.registry.get("tiny")
        assert ds.reads.startswith("preadv (") and "memory budget" in ds.reads
        assert "memory budget" not in roomy.registry.get("tiny").reads
        listed = asyncio.run(tight.list())
        assert "memory budget" in listed[0]["reads"]
        announced = tight.metrics.announced_bytes._value.get()
        assert announced >= ds.nbytes  # five batches of 8 cover the whole 40-sample epoch
        text = tight.metrics.render().decode()
        assert "batchd_disk_read_bytes_total" in text
        st = ds.read_stats
        assert st.ready_bytes + st.waited_bytes >= 40 * 16 * 16 * 3  # every image, by preadv
        assert f'batchd_read_ready_bytes_total{{dataset="tiny"}} {float(st.ready_bytes)}' in text
        assert f'batchd_read_waited_bytes_total{{dataset="tiny"}} {float(st.waited_bytes)}' in text
        assert 'batchd_read_wait_seconds_total{dataset="tiny"}' in text
    finally:
        roomy.close()
        tight.close()


def test_willneed_covers_the_rows_asked_for(data: Path) -> None:
    with open_dataset(data / "tiny") as ds:
        row = 16 * 16 * 3 + 8  # image row + label row
        assert ds.willneed(np.array([5, 3, 4, 9])) == 4 * row
        assert ds.willneed(np.array([], dtype=np.int64)) == 0
        ds.set_read_path("testing")
        with ds.mapped() as direct:
            assert direct is False
        assert ds.reads == "preadv (testing: read ahead by the permutation)"


def _dropped(ds: Dataset) -> bool:
    """Drop ``ds``'s pages from the page cache; False where this filesystem keeps them."""
    os.sync()  # a just-written pack is dirty, and dirty pages are not dropped
    ds.dontneed(np.arange(ds.count))
    return dataset_resident_bytes(ds) == 0


def test_preadv_reads_count_what_was_ready_and_what_they_waited_for(data: Path) -> None:
    with open_dataset(data / "tiny") as ds:
        ds.set_read_path("testing")
        out = np.empty((ds.count, 16, 16, 3), np.uint8)
        ids = np.arange(ds.count)
        if not _dropped(ds):
            pytest.skip("this filesystem keeps the pack's pages after POSIX_FADV_DONTNEED")
        ds.read_rows("image", ids, out)  # from the disk
        st = ds.read_stats
        # Mostly waited for; but the RWF_NOWAIT probe itself starts the read, and on a
        # fast disk some of it (1 run in 8 here: all 30 KB) is in before it returns.
        assert st.ready_bytes + st.waited_bytes == out.nbytes
        first = (st.ready_bytes, st.waited_bytes)
        ds.read_rows("image", ids, out)  # now in the page cache: ready
        assert (st.ready_bytes, st.waited_bytes) == (first[0] + out.nbytes, first[1])
        assert 0.5 <= st.hit_rate() <= 1.0
        np.testing.assert_array_equal(out, np.asarray(ds.array("image")))


def test_a_read_the_page_cache_half_holds_is_split_and_gives_the_same_bytes(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.preadv

    def half(fd: int, bufs: list[memoryview], offset: int, flags: int = 0) -> int:
        if flags & os.RWF_NOWAIT:  # the page cache holds the first half only
            return real(fd, [bufs[0][: len(bufs[0]) // 2]], offset, flags)
        return real(fd, bufs, offset, flags)

    monkeypatch.setattr(reader.os, "preadv", half)
    with open_dataset(data / "tiny") as ds:
        ds.set_read_path("testing")
        out = np.empty((ds.count, 16, 16, 3), np.uint8)
        ds.read_rows("image", np.arange(ds.count), out)
        assert ds.read_stats.ready_bytes == ds.read_stats.waited_bytes == out.nbytes // 2
        np.testing.assert_array_equal(out, np.asarray(ds.array("image")))


def test_a_kernel_that_refuses_nowait_reads_counts_nothing_and_reads_all(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.preadv

    def refuse(fd: int, bufs: list[memoryview], offset: int, flags: int = 0) -> int:
        if flags:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real(fd, bufs, offset)

    monkeypatch.setattr(reader.os, "preadv", refuse)
    monkeypatch.setattr(reader, "_nowait_reads", True)
    with open_dataset(data / "tiny") as ds:
        ds.set_read_path("testing")
        out = np.empty((ds.count, 16, 16, 3), np.uint8)
        ds.read_rows("image", np.arange(ds.count), out)
        np.testing.assert_array_equal(out, np.asarray(ds.array("image")))
        assert reader._nowait_reads is False
        assert ds.read_stats.hit_rate() is None  # not counted, rather than counted wrong


def test_a_split_job_reads_ahead_the_split_samples_only(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    announced: list[int] = []
    real = Dataset.willneed

    def record(self: Dataset, ids: NDArray[np.int64]) -> int:
        announced.extend(int(i) for i in ids)
        return real(self, ids)

    monkeypatch.setattr(Dataset, "willneed", record)
    eng = Engine(Registry(data), EngineConfig(threads=2, cache_bytes=0), memory=TIGHT)
    try:

        async def go() -> set[int]:
            served: set[int] = set()
            for k in range(3):  # [50%:] of 40 samples: 20, three batches of 8
                req = BatchRequest(
                    dataset="tiny", k=k, batch_size=8, seed=3, epoch=0, split="[50%:]"
                )
                body = bytes((await eng.batch(req)).body)
                served.update(int(i) for i in decode_batch(body).index)
            return served

        served = asyncio.run(go())
        want = set(
            BatchRequest(dataset="tiny", k=0, batch_size=8, split="[50%:]")
            .split_ids(40, None)
            .tolist()
        )
        assert served == want
        assert announced and set(announced) <= want  # never the pack's first samples
        assert set(announced) == want  # the whole split epoch was read ahead or at need
    finally:
        eng.close()


AUG64 = '[{"op":"random_crop","size":40},{"op":"hflip"}]'


@pytest.mark.parametrize(("make", "images"), [(tiny_pack, "image.raw"), (jpeg_pack, "image.data")])
def test_an_engine_over_budget_reads_directly_with_the_same_bytes(
    tmp_path: Path, make: Callable[..., Path], images: str
) -> None:
    root = tmp_path / "data"
    make(root / "tiny", n=40, hw=64)
    got = open_direct(root / "tiny" / images)
    if isinstance(got, str):  # tests/server/format/test_direct.py tests the refusal
        pytest.skip(f"the test folder's filesystem cannot read directly: {got}")
    got.close()
    roomy = Engine(Registry(root), EngineConfig(threads=2))
    tight = Engine(Registry(root), EngineConfig(threads=2, cache_bytes=0), memory=TIGHT)
    buffered = Engine(
        Registry(root),
        EngineConfig(threads=2, cache_bytes=0),
        memory=dataclasses.replace(TIGHT, direct_reads=False),
    )

    async def batches(eng: Engine) -> list[bytes]:
        out = []
        for k in range(5):
            req = BatchRequest(dataset="tiny", k=k, batch_size=8, seed=3, epoch=1, augment=AUG64)
            out.append(bytes((await eng.batch(req)).body))
        return out

    try:
        want = asyncio.run(batches(roomy))
        assert asyncio.run(batches(tight)) == want  # invariant 1: same bytes on every path
        assert asyncio.run(batches(buffered)) == want
        ds = tight.registry.get("tiny")
        assert ds.reads.startswith("direct (")
        assert ds.direct_fields == ("image",)
        assert ds.read_stats.waited_bytes >= (root / "tiny" / images).stat().st_size
        assert tight.metrics.announced_bytes._value.get() == 0  # nothing to read ahead
        assert buffered.registry.get("tiny").reads.startswith("preadv (")
        assert buffered.metrics.announced_bytes._value.get() > 0
    finally:
        for eng in (roomy, tight, buffered):
            eng.close()
