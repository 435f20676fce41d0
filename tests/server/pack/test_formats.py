"""The formats registry: detection by name, patterns, --list-formats, missing extras."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from batchd_server.cli import cli
from batchd_server.errors import PackError
from batchd_server.pack import formats
from batchd_server.pack.formats import detect, expand


def test_detect_by_name(tmp_path: Path) -> None:
    names = {
        "a.npy": "npy",
        "b.npz": "npy",
        "t.tfrecord": "tfrecord",
        "t.tfrecord-00001-of-00004": "tfrecord",
        "t.tfrecords.gz": "tfrecord",
        "s.tar": "webdataset",
        "s.tar.gz": "webdataset",
        "p.parquet": "parquet",
        "d.h5": "hdf5",
        "d.hdf5": "hdf5",
        "x.csv": "csv",
    }
    for name, fmt in names.items():
        (tmp_path / name).write_bytes(b"")
        assert detect([tmp_path / name]) == fmt, name
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    assert detect([tmp_path / "tree"]) == "folder"
    (tmp_path / "hf" / "data").mkdir(parents=True)
    (tmp_path / "hf" / "data" / "train-0.parquet").write_bytes(b"")
    assert detect([tmp_path / "hf"]) == "parquet"
    with pytest.raises(PackError, match="mix formats"):
        detect([tmp_path / "a.npy", tmp_path / "s.tar"])
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(PackError, match=r"x\.bin: cannot tell its format.*--format"):
        detect([tmp_path / "x.bin"])


def test_expand_globs_and_braces(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"shard-{i:03d}.tar").write_bytes(b"")
    got = expand(str(tmp_path / "shard-{000..002}.tar"))
    assert [p.name for p in got] == ["shard-000.tar", "shard-001.tar", "shard-002.tar"]
    assert [p.name for p in expand(str(tmp_path / "shard-*.tar"))] == [p.name for p in got]
    assert [p.name for p in expand(str(tmp_path / "shard-{000,002}.tar"))] == [
        "shard-000.tar",
        "shard-002.tar",
    ]
    with pytest.raises(PackError, match=r"shard-003\.tar: no such file"):
        expand(str(tmp_path / "shard-{000..003}.tar"))
    with pytest.raises(PackError, match="matches no file"):
        expand(str(tmp_path / "*.parquet"))
    with pytest.raises(PackError, match="no such file or directory"):
        expand(tmp_path / "nope")


def test_list_formats_names_each_extra() -> None:
    result = CliRunner().invoke(cli, ["pack", "--list-formats"])
    assert result.exit_code == 0, result.output
    for name in ("folder", "csv", "npy", "tfrecord", "webdataset", "parquet", "hdf5"):
        assert name in result.output
    assert "batchd[parquet]" in result.output and "batchd[hdf5]" in result.output


def test_a_missing_extra_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    real = importlib.import_module

    def fake(name: str, package: str | None = None) -> object:
        if name == "pyarrow":
            raise ModuleNotFoundError(name="pyarrow")
        return real(name, package)

    monkeypatch.setattr(formats.importlib, "import_module", fake)
    with pytest.raises(PackError) as err:
        formats.require("parquet", "pyarrow")
    assert "\n" not in str(err.value) and "pip install 'batchd[parquet]'" in str(err.value)


def test_list_formats_says_what_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = formats.importlib.util.find_spec
    monkeypatch.setattr(
        formats.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "h5py" else real(name, *a),
    )
    text = formats.list_formats()
    assert "needs pip install 'batchd[hdf5]' (not installed)" in text
    assert "batchd[tfrecord]" in text
