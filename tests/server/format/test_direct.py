"""format.direct and the reads past the page cache of packs bigger than memory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from batchd_server.errors import StaleError
from batchd_server.format import direct, open_dataset
from batchd_server.format.direct import ALIGN, open_direct
from serverproc import jpeg_pack, tiny_pack

HW = 64  # 12 KiB rows: big enough to be read directly (labels, 8 bytes, stay buffered)


def _direct_or_skip(path: Path) -> None:
    got = open_direct(path)
    if isinstance(got, str):  # e.g. a tmpfs that refuses O_DIRECT: the refusal is tested below
        pytest.skip(f"the test folder's filesystem cannot read directly: {got}")
    got.close()


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, bytes]:
    data = np.random.default_rng(0).integers(0, 256, 5 * ALIGN + 123, dtype=np.uint8).tobytes()
    path = tmp_path / "blob"
    path.write_bytes(data)
    _direct_or_skip(path)
    return path, data


def test_reads_at_any_offset_give_the_files_bytes(
    blob: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = blob
    monkeypatch.setattr(direct, "_MAX_EVENTS", 3)  # 7 reads go in three turns
    f = open_direct(path)
    assert not isinstance(f, str)
    try:
        offsets = np.array([0, 1, ALIGN - 1, ALIGN, 3 * ALIGN + 7, 100, 5 * ALIGN], np.int64)
        for _ in range(2):  # the second time from a recycled staging buffer
            got = f.read(offsets, 123)
            try:
                for k, o in enumerate(offsets.tolist()):
                    assert got.row(k).tobytes() == data[o : o + 123]
            finally:
                got.release()
        short = f.read(np.array([0, len(data) - 10], np.int64), 100)
        try:
            with pytest.raises(direct.DirectReadError, match="short read"):
                short.wait()
        finally:
            short.release()
    finally:
        f.close()
    with pytest.raises(ValueError, match="closed"):
        f.read(np.array([0], np.int64), 10)


def test_samples_of_different_sizes_are_read_in_one_go(blob: tuple[Path, bytes]) -> None:
    path, data = blob
    f = open_direct(path)
    assert not isinstance(f, str)
    try:
        offsets = np.array([5, ALIGN - 3, 0, 2 * ALIGN, 4 * ALIGN + 1], np.int64)
        sizes = np.array([ALIGN + 9, 3, 0, 2 * ALIGN, ALIGN + 122], np.int64)  # to the end
        got = f.read(offsets, sizes)
        try:
            for k, (o, n) in enumerate(zip(offsets.tolist(), sizes.tolist(), strict=True)):
                assert got.row(k).tobytes() == data[o : o + n]
        finally:
            got.release()
        short = f.read(np.array([0, 4 * ALIGN], np.int64), np.array([1, ALIGN + 124], np.int64))
        try:
            assert short.row(0).tobytes() == data[:1]  # a good row before the short one
            with pytest.raises(direct.DirectReadError, match="short read"):
                short.row(1)
        finally:
            short.release()
    finally:
        f.close()


def test_a_filesystem_that_refuses_o_direct_is_said_why(
    blob: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.open

    def no_direct(path: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_direct)
    assert open_direct(blob[0]) == "O_DIRECT refused: Invalid argument"


def test_a_pack_read_directly_gives_the_mapped_bytes(tmp_path: Path) -> None:
    pack = tiny_pack(tmp_path / "p", n=12, hw=HW)
    _direct_or_skip(pack / "image.raw")
    with open_dataset(pack) as ds:
        want = np.asarray(ds.array("image")).copy()
        ds.set_read_path("testing", direct=True)
        assert ds.direct_fields == ("image",) and not ds.buffered
        assert ds.reads.startswith("direct (testing: O_DIRECT")
        ids = np.array([7, 0, 11, 7, 3], np.int64)
        with ds.staged("image", ids) as got:
            for k, i in enumerate(ids.tolist()):
                assert got.row(k).tobytes() == want[i].tobytes()
        out = np.empty((len(ids), HW, HW, 3), np.uint8)
        ds.read_rows("image", ids, out)
        np.testing.assert_array_equal(out, want[ids])
        assert ds.read_stats.waited_bytes == 2 * len(ids) * HW * HW * 3  # all from the disk
        with pytest.raises(ValueError, match="direct reads are off"), ds.staged("label", ids):
            pass
        ds.set_read_path(None)  # fits again: mapped, nothing direct
        assert ds.direct_fields == ()


def test_an_encoded_pack_read_directly_decodes_the_same_images(tmp_path: Path) -> None:
    pack = jpeg_pack(tmp_path / "p", n=12, hw=HW)
    _direct_or_skip(pack / "image.data")
    with open_dataset(pack) as ds:
        want = [(bytes(ds.encoded("image", i)), ds.image("image", i)) for i in range(ds.count)]
        ds.set_read_path("testing", direct=True)
        assert ds.direct_fields == ("image",) and not ds.buffered  # labels stay buffered
        ids = np.array([3, 11, 0, 3, 7], np.int64)
        with ds.staged("image", ids) as got:
            for k, i in enumerate(ids.tolist()):
                assert got.row(k).tobytes() == want[i][0]
                np.testing.assert_array_equal(ds.decode("image", i, got.row(k)), want[i][1])
        stored = sum(len(want[i][0]) for i in ids.tolist())
        assert ds.read_stats.waited_bytes == stored
        assert ds.willneed(ids) == 8 * len(set(ids.tolist()))  # the labels only


def test_small_encoded_samples_stay_in_the_page_cache(tmp_path: Path) -> None:
    pack = jpeg_pack(tmp_path / "p", n=12, hw=16)  # well under a block each
    _direct_or_skip(pack / "image.data")
    with open_dataset(pack) as ds:
        ds.set_read_path("testing", direct=True)
        assert ds.direct_fields == () and ds.buffered  # announced ahead instead
        assert ds.reads.startswith("preadv (testing")


def test_a_file_truncated_under_direct_reads_is_stale(tmp_path: Path) -> None:
    pack = tiny_pack(tmp_path / "p", n=12, hw=HW)
    _direct_or_skip(pack / "image.raw")
    with open_dataset(pack) as ds:
        ds.set_read_path("testing", direct=True)
        os.truncate(pack / "image.raw", 4 * HW * HW * 3)
        with pytest.raises(StaleError, match="short read"), ds.staged("image", [1, 9]) as got:
            assert got.row(0).size == HW * HW * 3  # sample 1 is still there
            got.row(1)  # sample 9 is not
