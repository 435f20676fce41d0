"""The registry: every pack under the roots by name, refusals as domain errors."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from batchd_server.errors import (
    ConfigError,
    DatasetUnavailable,
    InvalidName,
    Rejected,
    UnknownDataset,
)
from batchd_server.serve.registry import Registry
from serverproc import tiny_pack


def test_lists_packs_and_says_why_one_is_unavailable(tmp_path: Path) -> None:
    tiny_pack(tmp_path / "a", n=8)
    tiny_pack(tmp_path / "b", n=8)
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "a", broken)
    (broken / "image.raw").write_bytes(b"short")  # truncated data file
    reg = Registry(tmp_path)
    try:
        described = {e["name"]: e for e in (x.describe() for x in reg.entries())}
        assert set(described) == {"a", "b", "broken"}
        assert described["a"]["available"] and described["a"]["count"] == 8
        assert not described["broken"]["available"]
        assert "image.raw" in described["broken"]["error"]
        with pytest.raises(DatasetUnavailable, match=r"image\.raw") as info:
            reg.get("broken")
        assert (info.value.status, info.value.code) == (404, "dataset_unavailable")
    finally:
        reg.close()


def test_unknown_names_list_what_is_served_and_paths_are_refused(tmp_path: Path) -> None:
    tiny_pack(tmp_path / "a", n=8)
    reg = Registry(tmp_path)
    try:
        with pytest.raises(UnknownDataset, match=r"served: \['a'\]"):
            reg.get("nope")
        for bad in ("", "../a", "a/b", ".hidden", "x" * 256):
            with pytest.raises(InvalidName) as info:
                reg.get(bad)
            assert isinstance(info.value, Rejected) and info.value.status == 400
    finally:
        reg.close()


def test_a_pack_added_later_is_found_and_a_removed_one_is_gone(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    try:
        tiny_pack(tmp_path / "late", n=8)
        assert reg.get("late").count == 8
        shutil.rmtree(tmp_path / "late")
        with pytest.raises(UnknownDataset, match="removed"):
            reg.get("late")
    finally:
        reg.close()


def test_folders_that_are_not_packs_are_listed_with_the_reason(tmp_path: Path) -> None:
    """An empty folder, a folder of images, a folder of packs: unavailable, and why (issue 16)."""
    tiny_pack(tmp_path / "a", n=8)
    (tmp_path / "empty").mkdir()
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(12):
        (photos / f"{i}.jpg").write_bytes(b"\xff\xd8")
    (photos / "cats").mkdir()
    nested = tmp_path / "packs"
    tiny_pack(nested / "inner", n=8)
    (tmp_path / ".hidden").mkdir()  # hidden names and plain files stay out of the list
    (tmp_path / "README.txt").write_text("not a folder")
    (tmp_path / "lost+found").mkdir()  # what mkfs leaves at a volume's root
    reg = Registry(tmp_path)
    try:
        described = {e["name"]: e for e in (x.describe() for x in reg.entries())}
        assert set(described) == {"a", "empty", "photos", "packs"}
        assert [d.name for d in reg.datasets()] == ["a"]
        for name in ("empty", "photos", "packs"):
            assert described[name]["available"] is False
            assert set(described[name]) == {"name", "available", "error"}
        assert described["empty"]["error"] == "an empty folder, not a batchd pack"
        assert described["photos"]["error"] == (
            "a folder of 12 files and 1 folder without batchd.header: not a batchd pack; "
            "make one with `batchd pack SOURCE OUT`"
        )
        assert "holds the pack inner" in described["packs"]["error"]
        assert "pass it as --data" in described["packs"]["error"]
        # A request for one answers as for any unavailable dataset, not "no such dataset".
        with pytest.raises(DatasetUnavailable, match="an empty folder") as info:
            reg.get("empty")
        assert (info.value.status, info.value.code) == (404, "dataset_unavailable")
        with pytest.raises(UnknownDataset, match=r"served: \['a'\]"):
            reg.get("lost+found")
    finally:
        reg.close()


def test_counting_a_big_folder_stops_early(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    for i in range(1005):
        (big / f"{i}.png").touch()
    reg = Registry(tmp_path)
    try:
        (entry,) = reg.entries()
        assert entry.error is not None and entry.error.startswith("a folder of 1000+ entries")
    finally:
        reg.close()


def test_a_folder_that_becomes_a_pack_is_served(tmp_path: Path) -> None:
    """A pack copied in file by file is "not a pack" until its header lands."""
    (tmp_path / "late").mkdir()
    reg = Registry(tmp_path, rescan_interval=0.0)
    try:
        with pytest.raises(DatasetUnavailable, match="empty folder"):
            reg.get("late")
        (tmp_path / "late").rmdir()
        tiny_pack(tmp_path / "late", n=8)
        assert reg.get("late").count == 8
        assert [e.describe()["available"] for e in reg.entries()] == [True]
        (tmp_path / "notyet").mkdir()  # not there at the last scan: found on request
        with pytest.raises(DatasetUnavailable, match="empty folder"):
            reg.get("notyet")
    finally:
        reg.close()


def test_a_pack_given_as_the_root_says_to_pass_its_parent(tmp_path: Path) -> None:
    tiny_pack(tmp_path / "photos", n=8)
    with pytest.raises(ConfigError) as info:
        Registry(tmp_path / "photos")
    msg = str(info.value)
    assert "is a batchd pack, not a folder of packs" in msg
    assert f"--data {tmp_path}" in msg and "'photos'" in msg


def test_a_root_that_is_missing_or_a_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match="^" + re.escape(f"--data {tmp_path / 'missing'} does not exist")
    ):
        Registry(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        Registry(tmp_path / "file")


def test_current_is_get_for_an_unchanged_open_pack_and_none_otherwise(tmp_path: Path) -> None:
    """The event loop's shortcut: never a stale pack, never a wait for the lock."""
    import threading

    tiny_pack(tmp_path / "a")
    reg = Registry(tmp_path)
    tiny_pack(tmp_path / "late")
    assert reg.current("late") is None  # not found yet: get() rescans, off the loop
    assert reg.get("late").count == 40
    ds = reg.get("a")
    assert reg.current("a") is ds
    assert reg.current("nope") is None and reg.current("../a") is None
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with reg._lock:
            held.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    try:
        assert reg.current("a") is None  # another thread is rescanning: ask get() instead
    finally:
        release.set()
        t.join()
    tiny_pack(tmp_path / "a", n=12, overwrite=True)  # replaced on disk
    assert reg.current("a") is None
    new = reg.get("a")
    assert new is not ds and new.count == 12
    assert reg.current("a") is new
    reg.close()
