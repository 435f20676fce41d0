"""The tar reader under the WebDataset format: the same members tarfile itself sees."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from batchd_server.errors import PackError
from batchd_server.pack.formats._tar import members

FILES = {
    "a/" + "long-directory-name/" * 6 + "0001.png": b"x" * 700,  # past ustar's 100 bytes
    "caf\u00e9/0002.cls": b"3",
    "empty.json": b"",
    "big.npy": bytes(range(256)) * 40,
}


def _write(path: Path, fmt: int, mode: str = "w") -> Path:
    with tarfile.open(path, mode, format=fmt) as tf:  # type: ignore[call-overload]
        d = tarfile.TarInfo("a")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "empty.json"
        tf.addfile(link)
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    "fmt",
    [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT],
    ids=["gnu", "pax", "ustar"],
)
def test_every_tar_format_reads_like_tarfile(tmp_path: Path, fmt: int) -> None:
    files = FILES
    if fmt == tarfile.USTAR_FORMAT:  # ustar: ASCII names, long paths in its prefix field
        files = {k.replace("\u00e9", "e"): v for k, v in FILES.items()}
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert [(n, d) for n, d, _ in members(path)] == list(files.items())


def test_directories_and_links_are_skipped_and_gzip_reads_too(tmp_path: Path) -> None:
    for name, mode in (("t.tar", "w"), ("t.tar.gz", "w:gz")):
        path = _write(tmp_path / name, tarfile.PAX_FORMAT, mode)
        got = list(members(path))
        assert [(n, d) for n, d, _ in got] == list(FILES.items()), name
        assert all(e is None for _, _, e in got)


def test_a_cut_shard_and_a_bad_header_are_the_last_item(tmp_path: Path) -> None:
    raw = _write(tmp_path / "t.tar", tarfile.GNU_FORMAT).read_bytes()
    (tmp_path / "cut.tar").write_bytes(raw[:3000])
    *ok, (_, data, error) = members(tmp_path / "cut.tar")
    assert data is None and error is not None and "cut short" in error
    assert len(ok) < len(FILES)
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(PackError, match=r"junk\.tar: not a tar file"):
        list(members(tmp_path / "junk.tar"))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(PackError, match=r"empty\.tar: an empty file"):
        list(members(tmp_path / "empty.tar"))
