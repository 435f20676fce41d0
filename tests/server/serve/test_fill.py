"""serve.fill: who may walk a batch's samples at the same time, and from where."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from batchd_server.augment import Pipeline
from batchd_server.format import Dataset, open_dataset
from batchd_server.serve.fill import filler, walks_alone
from serverproc import jpeg_pack, tiny_pack

CROP_FLIP = '[{"op":"random_crop","size":12},{"op":"hflip"}]'
CROP_BRIGHTEN = '[{"op":"random_crop","size":12},{"op":"brightness","delta":0.2}]'
Out = dict[str, NDArray[Any]]


def _direct(monkeypatch: pytest.MonkeyPatch, direct: bool) -> None:
    """Read the tiny pack through its mapping (as under a read lease) or with preadv."""

    @contextlib.contextmanager
    def mapped(self: Dataset) -> Iterator[bool]:
        yield direct

    monkeypatch.setattr(Dataset, "mapped", mapped)


def _batch(
    tmp_path: Path, spec: str, *, jpeg: bool = False
) -> tuple[Dataset, Pipeline, NDArray[np.int64], Out]:
    ds = open_dataset(jpeg_pack(tmp_path / "jpeg") if jpeg else tiny_pack(tmp_path / "tiny"))
    pipeline = Pipeline.parse(spec)
    ids = np.array([5, 0, 21, 7, 7, 12, 3, 20] * 4, dtype=np.int64)
    out = {
        name: np.zeros((len(ids), *shape), dt)
        for name, (dt, shape) in pipeline.output_fields(ds.fields).items()
    }
    return ds, pipeline, ids, out


def _most_at_once(tmp_path: Path, spec: str, monkeypatch: pytest.MonkeyPatch, direct: bool) -> int:
    """How many threads were inside the pipeline at once while two fill halves of a batch."""
    _direct(monkeypatch, direct)
    ds, pipeline, ids, out = _batch(tmp_path, spec)
    inside: collections.Counter[int] = collections.Counter()  # thread -> calls it is inside
    most, lock = 0, threading.Lock()

    def counting(method: Callable[..., None]) -> Callable[..., None]:
        def counted(self: Pipeline, *args: Any, **kw: Any) -> None:
            nonlocal most
            me = threading.get_ident()
            with lock:
                inside[me] += 1
                most = max(most, len(+inside))
            time.sleep(0.05)  # long enough for the other half to arrive
            try:
                method(self, *args, **kw)
            finally:
                with lock:
                    inside[me] -= 1

        return counted

    for name in ("run", "run_arrays"):  # run_arrays hands work it cannot shortcut to run
        monkeypatch.setattr(Pipeline, name, counting(getattr(Pipeline, name)))
    fill = filler(ds, pipeline, ids, 0, 0, out)
    halves = [threading.Thread(target=fill, args=ab) for ab in ((0, 16), (16, 32))]
    for t in halves:
        t.start()
    for t in halves:
        t.join()
    ds.close()
    return most


@pytest.mark.parametrize("jpeg", [False, True], ids=["raw", "jpeg"])
@pytest.mark.parametrize("spec", [CROP_FLIP, CROP_BRIGHTEN])
def test_the_mapped_path_gives_the_bytes_of_the_preadv_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str, jpeg: bool
) -> None:
    # Encoded samples are decoded straight from the mapping, or from a preadv copy.
    got = []
    for direct in (False, True):
        _direct(monkeypatch, direct)
        ds, pipeline, ids, out = _batch(tmp_path / str(direct), spec, jpeg=jpeg)
        fill = filler(ds, pipeline, ids, 3, 2, out)
        fill(0, 16)
        fill(16, 32)
        if jpeg and spec == CROP_FLIP:  # each row is its own sample's decode, cropped
            want = [ds.image("image", int(i)) for i in ids]
            assert all(_is_crop(out["image"][r], want[r]) for r in range(len(ids)))
        ds.close()
        got.append({name: buf.tobytes() for name, buf in out.items()})
        assert got[-1]["image"] != bytes(len(got[-1]["image"]))
    assert got[0] == got[1]


def _is_crop(row: NDArray[np.uint8], img: NDArray[np.uint8]) -> bool:
    """Whether ``row`` is a window of ``img``, mirrored or not."""
    h, w = row.shape[:2]
    return any(
        np.array_equal(row, src[t : t + h, x : x + w])
        for src in (img, img[:, ::-1])
        for t in range(img.shape[0] - h + 1)
        for x in range(img.shape[1] - w + 1)
    )


@pytest.mark.parametrize("direct", [False, True], ids=["preadv", "mapped"])
def test_copy_only_samples_are_walked_by_one_thread_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    # Each such sample releases the GIL for its copy: two threads would trade it per sample.
    assert _most_at_once(tmp_path, CROP_FLIP, monkeypatch, direct) == 1


@pytest.mark.parametrize("direct", [False, True], ids=["preadv", "mapped"])
def test_samples_with_real_work_are_walked_in_parallel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    assert _most_at_once(tmp_path, CROP_BRIGHTEN, monkeypatch, direct) == 2


def test_only_copy_loops_walk_alone(tmp_path: Path) -> None:
    """The engine gives such a batch to one thread whole (walks_alone): no row chunks."""
    ds = open_dataset(tiny_pack(tmp_path / "tiny"))
    try:
        assert walks_alone(ds, Pipeline.parse(CROP_FLIP))
        for spec in (CROP_BRIGHTEN, '[{"op":"hflip"}]', "[]"):  # parallel, or gathered whole
            assert not walks_alone(ds, Pipeline.parse(spec)), spec
    finally:
        ds.close()
