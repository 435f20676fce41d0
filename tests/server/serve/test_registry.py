"""The registry: every pack under the roots by name, refusals as domain errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from batchd_server.errors import (
    DatasetUnavailable,
    FormatError,
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
    (tmp_path / "notes").mkdir()  # a folder without a header: not a pack, not listed
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


def test_a_root_that_is_not_a_folder_is_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="not a directory"):
        Registry(tmp_path / "missing")
