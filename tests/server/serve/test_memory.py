"""The memory budget: the cgroup limit is found, caches are sized from it, and a pack
bigger than it is read with preadv ahead of need, giving the same bytes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from batchd.wire import decode_batch
from batchd_server.format import Dataset, open_dataset
from batchd_server.serve.engine import Engine, EngineConfig
from batchd_server.serve.memory import MemoryPlan, _cgroup_limit, plan
from batchd_server.serve.registry import Registry
from batchd_server.serve.request import BatchRequest

# A budget no pack fits: nothing cached, every read ahead with preadv.
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
        assert b"batchd_disk_read_bytes_total" in tight.metrics.render()
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
        assert ds.reads == "preadv (testing)"


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
