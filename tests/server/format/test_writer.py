"""format/writer.py: atomic commit, overwrite, skips, chunk checksums, and refusals.

Round trips through the reader and the basic refusals are in test_format.py; these
tests read what the writer leaves on disk directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

from batchd_server.errors import PackError
from batchd_server.format import writer as writer_module
from batchd_server.format.header import HEADER_NAME, FieldSpec, fingerprint_of, read_header
from batchd_server.format.writer import DatasetWriter, Encoded

VEC = FieldSpec(
    name="vec", dtype=np.dtype("<f4"), shape=(3,), role="value", encoding="raw", channels=None
)
LABEL = FieldSpec(
    name="label", dtype=np.dtype("<i8"), shape=(), role="value", encoding="raw", channels=None
)
PIC = FieldSpec(
    name="pic", dtype=np.dtype("u1"), shape=None, role="image", encoding="image", channels=3
)
FIELDS = [VEC, LABEL, PIC]
N = 6


def samples() -> list[dict[str, Any]]:
    """N samples; the image bytes are not decoded by the writer, so any bytes do."""
    rng = np.random.default_rng(0)
    return [
        {
            "vec": rng.random(3).astype(np.float32),
            "label": np.int64(i),
            "pic": Encoded(bytes([i + 1]) * (i + 2), 4 + i, 5),
        }
        for i in range(N)
    ]


def block_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "vec": np.stack([r["vec"] for r in rows]),
        "label": np.array([r["label"] for r in rows]),
        "pic": [r["pic"] for r in rows],
    }


def write(out: Path, **kw: Any) -> Path:
    with DatasetWriter(out, FIELDS, **kw) as w:
        w.append_block(block_of(samples()), N)
        return w.commit()


def names(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


# ---------------------------------------------------------------- what lands on disk


def test_append_and_append_block_write_the_same_bytes(tmp_path: Path) -> None:
    rows = samples()
    with DatasetWriter(tmp_path / "one", FIELDS, chunk_size=16) as w:
        for r in rows:
            w.append(r)
        w.commit()
    with DatasetWriter(tmp_path / "block", FIELDS, chunk_size=16) as w:
        w.append_block(block_of(rows[:2]), 2)
        w.append_block(block_of(rows[2:]), N - 2)
        w.commit()
    files = names(tmp_path / "one")
    assert files == names(tmp_path / "block")
    assert files == sorted(
        [HEADER_NAME, "vec.raw", "label.raw", "pic.data", "pic.offsets", "pic.sizes"]
    )
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "block" / f).read_bytes(), f
    assert fingerprint_of(read_header(tmp_path / "one")) == fingerprint_of(
        read_header(tmp_path / "block")
    )


def test_data_files_hold_the_samples_little_endian(tmp_path: Path) -> None:
    out = write(tmp_path / "ds")
    rows = samples()
    vec = np.fromfile(out / "vec.raw", "<f4").reshape(N, 3)
    np.testing.assert_array_equal(vec, np.stack([r["vec"] for r in rows]))
    np.testing.assert_array_equal(np.fromfile(out / "label.raw", "<i8"), np.arange(N))
    data = (out / "pic.data").read_bytes()
    offsets = np.fromfile(out / "pic.offsets", "<i8")
    assert offsets.tolist() == [0, *np.cumsum([i + 2 for i in range(N)]).tolist()]
    for i, r in enumerate(rows):
        assert data[offsets[i] : offsets[i + 1]] == r["pic"].data
    sizes = np.fromfile(out / "pic.sizes", "<i4").reshape(N, 2)
    assert sizes.tolist() == [[4 + i, 5] for i in range(N)]


@pytest.mark.parametrize("chunk", [1, 7, 16, 1 << 20])
def test_chunk_checksums_match_the_file_whatever_the_write_sizes(
    tmp_path: Path, chunk: int
) -> None:
    out = write(tmp_path / "ds", chunk_size=chunk)
    header = read_header(out)
    assert header["chunk_size"] == chunk
    for fname, rec in header["files"].items():
        raw = (out / fname).read_bytes()
        assert rec["size"] == len(raw)
        assert rec["xxh3_64"] == xxhash.xxh3_64_hexdigest(raw)
        want = [xxhash.xxh3_64_hexdigest(raw[i : i + chunk]) for i in range(0, len(raw), chunk)]
        assert rec["chunks"] == want, fname


def test_header_records_fields_classes_packing_and_skips(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", FIELDS, classes=["cat", 7]) as w:
        w.skip("a/broken.png", "not an image")
        w.append(samples()[0])
        w.skip("sample 2", "truncated", row=2)
        w.commit({"source": "unit", "kind": "test"})
    header = read_header(tmp_path / "ds")
    assert header["count"] == 1
    assert header["classes"] == ["cat", "7"]  # class names are stored as strings
    assert header["fields"] == [f.to_json() for f in FIELDS]
    assert header["packing"]["source"] == "unit" and header["packing"]["kind"] == "test"
    assert "batchd" in header["packing"]
    assert header["skipped"] == [
        {"source": "a/broken.png", "row": None, "reason": "not an image"},
        {"source": "sample 2", "row": 2, "reason": "truncated"},
    ]


def test_only_skips_is_nothing_to_pack(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", FIELDS) as w:
        w.skip("x.png", "bad")
        with pytest.raises(PackError, match="nothing to pack: no sample was written"):
            w.commit()
    assert names(tmp_path) == []


# ---------------------------------------------------------------- atomic commit


def test_nothing_is_visible_until_commit(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", FIELDS) as w:
        w.append(samples()[0])
        assert not (tmp_path / "ds").exists()
        (tmp,) = tmp_path.iterdir()
        assert tmp.name.startswith(".ds.tmp-") and tmp == w.tmp
        assert w.commit() == tmp_path / "ds"
    assert names(tmp_path) == ["ds"]


def test_an_interrupt_inside_the_block_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), DatasetWriter(tmp_path / "ds", FIELDS) as w:
        w.append(samples()[0])
        raise KeyboardInterrupt
    assert names(tmp_path) == []


def test_a_failure_inside_commit_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_module, "_fsync_dir", fail)  # after the header, before rename
    with DatasetWriter(tmp_path / "ds", FIELDS) as w:
        w.append(samples()[0])
        with pytest.raises(OSError, match="No space"):
            w.commit()
    assert names(tmp_path) == []


def test_a_failed_overwrite_keeps_the_old_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = write(tmp_path / "ds")
    before = (out / HEADER_NAME).read_bytes()

    def fail(*_: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(DatasetWriter, "_publish", fail)
    with pytest.raises(OSError, match="Input/output"):
        write(out, overwrite=True)
    assert (out / HEADER_NAME).read_bytes() == before
    assert names(tmp_path) == ["ds"]


def test_commit_twice_is_refused(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", FIELDS) as w:
        w.append(samples()[0])
        w.commit()
        with pytest.raises(PackError, match="already committed or aborted"):
            w.commit()
    assert names(tmp_path) == ["ds"]  # the second commit did not abort the first


def test_a_dataset_that_appears_while_packing_is_not_replaced(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", FIELDS) as w:
        w.append(samples()[0])
        (tmp_path / "ds").mkdir()
        (tmp_path / "ds" / "theirs").write_text("keep")
        with pytest.raises(PackError, match="already exists; pass --overwrite"):
            w.commit()
    assert names(tmp_path) == ["ds"] and names(tmp_path / "ds") == ["theirs"]


# ---------------------------------------------------------------- overwrite


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename fallback"])
def test_overwrite_swaps_in_the_new_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:  # a libc or filesystem without renameat2
        monkeypatch.setattr(writer_module, "_renameat2", lambda *_: False)
    out = tmp_path / "ds"
    with DatasetWriter(out, [LABEL]) as w:
        w.append({"label": np.int64(41)})
        w.commit()
    write(out, overwrite=True)
    assert read_header(out)["count"] == N
    assert np.fromfile(out / "label.raw", "<i8").tolist() == list(range(N))
    assert names(tmp_path) == ["ds"]  # no .old- or .tmp- left beside it


def test_overwrite_of_an_empty_folder_is_allowed(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    write(tmp_path / "ds", overwrite=True)
    assert read_header(tmp_path / "ds")["count"] == N


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_overwrite_refuses_what_is_not_a_directory(tmp_path: Path, kind: str) -> None:
    real = write(tmp_path / "real")
    out = tmp_path / "ds"
    if kind == "file":
        out.write_text("notes")
    else:
        out.symlink_to(real)
    with pytest.raises(PackError, match="exists and is not a directory; refusing"):
        DatasetWriter(out, FIELDS, overwrite=True)
    assert names(tmp_path) == ["ds", "real"]


def test_a_parent_that_is_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("")
    with pytest.raises(PackError, match=r"data exists and is not a folder"):
        DatasetWriter(tmp_path / "data" / "ds", FIELDS)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("block", "n", "match"),
    [
        ({"label": np.zeros(2, "<i8")}, 3, r"field 'label': 2 samples for 3"),
        ({"label": np.zeros(3, "<i4")}, 3, r"field 'label': got int32 \(\), .*holds int64 \(\)"),
        ({"label": np.zeros((3, 1), "<i8")}, 3, r"got int64 \(1,\), .*holds int64 \(\)"),
    ],
)
def test_a_raw_block_is_refused_with_what_is_wrong(
    tmp_path: Path, block: dict[str, Any], n: int, match: str
) -> None:
    with DatasetWriter(tmp_path / "ds", [LABEL]) as w:
        with pytest.raises(PackError, match=match):
            w.append_block(block, n)
        assert w.count == 0
    assert names(tmp_path) == []


@pytest.mark.parametrize(
    ("pics", "match"),
    [
        ([Encoded(b"x", 1, 1)], r"field 'pic': 1 images for 2 samples"),
        ([Encoded(b"x", 1, 1), b"raw bytes"], "expected non-empty Encoded images, got bytes"),
        ([Encoded(b"x", 1, 1), Encoded(b"", 1, 1)], "expected non-empty Encoded images"),
    ],
)
def test_an_encoded_block_is_refused_with_what_is_wrong(
    tmp_path: Path, pics: list[Any], match: str
) -> None:
    with DatasetWriter(tmp_path / "ds", [PIC]) as w, pytest.raises(PackError, match=match):
        w.append_block({"pic": pics}, 2)
    assert names(tmp_path) == []


@pytest.mark.parametrize(
    "sample",
    [{"label": np.int64(1)}, {**samples()[0], "extra": 1}],
    ids=["missing field", "extra field"],
)
def test_append_refuses_a_sample_as_append_block_does(
    tmp_path: Path, sample: dict[str, Any]
) -> None:
    fields = r"has fields \[.*\], the dataset \['label', 'pic', 'vec'\]"
    with DatasetWriter(tmp_path / "ds", FIELDS) as w:
        with pytest.raises(PackError, match=fields):
            w.append(sample)
        assert w.count == 0
