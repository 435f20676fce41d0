"""The pack format: round trips, atomic writes, and every way a pack can be refused."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import xxhash

from batchd import BatchdError
from batchd_server.errors import FormatError, PackError
from batchd_server.format import open_dataset, verify
from batchd_server.format.header import FORMAT_VERSION, HEADER_NAME, MAGIC, FieldSpec
from batchd_server.format.writer import DatasetWriter, Encoded

N = 5
U1 = np.dtype("u1")


def spec(
    name: str, dtype: str, shape: tuple[int, ...] | None, role: Any, channels: int | None = None
) -> FieldSpec:
    enc = "image" if shape is None else "raw"
    return FieldSpec(
        name=name, dtype=np.dtype(dtype), shape=shape, role=role, encoding=enc, channels=channels
    )


FIELDS = [
    spec("image", "u1", (6, 8, 3), "image", 3),
    spec("mask", "u1", (6, 8), "mask", 1),
    spec("label", "<i8", (), "value"),
    spec("target", "<f4", (), "value"),
    spec("vec", "<f4", (4,), "value"),
    spec("flag", "|b1", (), "value"),
    spec("jpeg", "u1", None, "image", 3),
    spec("seg", "u1", None, "mask", 1),
]


def png(img: np.ndarray) -> bytes:
    """PNG bytes of an RGB (HxWx3) or gray (HxW) image."""
    ok, buf = cv2.imencode(".png", img[..., ::-1] if img.ndim == 3 else img)
    assert ok
    return buf.tobytes()


def make_data(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (N, 6, 8, 3), dtype=np.uint8),
        "mask": rng.integers(0, 4, (N, 6, 8), dtype=np.uint8),
        "label": np.arange(N, dtype=np.int64) * 7 - 3,
        "target": rng.random(N).astype(np.float32),
        "vec": rng.random((N, 4)).astype(np.float32),
        "flag": np.arange(N) % 2 == 0,
        # encoded images of varying sizes
        "jpeg": [rng.integers(0, 256, (5 + i, 9 - i, 3), dtype=np.uint8) for i in range(N)],
        "seg": [rng.integers(0, 3, (4 + i, 3), dtype=np.uint8) for i in range(N)],
    }


def write(
    out: Path, data: dict[str, Any] | None = None, chunk_size: int = 1 << 20, **kw: Any
) -> Path:
    data = data or make_data()
    with DatasetWriter(out, FIELDS, classes=["a", "b"], chunk_size=chunk_size, **kw) as w:
        block = {k: v for k, v in data.items() if k not in ("jpeg", "seg")}
        block["jpeg"] = [Encoded(png(x), *x.shape[:2]) for x in data["jpeg"]]
        block["seg"] = [Encoded(png(x), *x.shape[:2]) for x in data["seg"]]
        w.append_block(block, N)
        return w.commit({"source": "test"})


@pytest.fixture
def ds_path(tmp_path: Path) -> Path:
    return write(tmp_path / "ds")


def test_round_trip_every_field_type(ds_path: Path) -> None:
    data = make_data()
    with open_dataset(ds_path) as ds:
        assert ds.count == N and ds.name == "ds" and ds.classes == ["a", "b"]
        assert list(ds.fields) == [f.name for f in FIELDS]
        assert ds.fields["vec"] == FIELDS[4]
        for name in ("image", "mask", "label", "target", "vec", "flag"):
            arr = ds.array(name)
            assert isinstance(arr, np.memmap) and not arr.flags.writeable
            assert arr.dtype == data[name].dtype and arr.shape == data[name].shape
            np.testing.assert_array_equal(arr, data[name])
        for i in range(N):
            np.testing.assert_array_equal(ds.image("jpeg", i), data["jpeg"][i])
            np.testing.assert_array_equal(ds.image("seg", i), data["seg"][i])
            assert bytes(ds.encoded("jpeg", i)) == png(data["jpeg"][i])
            assert tuple(ds.sizes("jpeg")[i]) == data["jpeg"][i].shape[:2]
        assert ds.header["packing"]["source"] == "test" and ds.header["skipped"] == []
        ds.check()
    verify(ds_path)


def test_header_layout_is_little_endian_and_versioned(ds_path: Path) -> None:
    raw = (ds_path / HEADER_NAME).read_bytes()
    assert raw[:8] == MAGIC
    version, bom, n = struct.unpack_from("<IIQ", raw, 8)
    assert (version, bom) == (FORMAT_VERSION, 0x01020304)
    assert len(raw) == 24 + n + 8
    assert struct.unpack_from("<Q", raw, 24 + n)[0] == xxhash.xxh3_64_intdigest(raw[: 24 + n])
    header = json.loads(raw[24 : 24 + n])
    assert header["files"]["image.raw"]["size"] == N * 6 * 8 * 3


def test_fingerprint_follows_content_not_packing_notes(tmp_path: Path) -> None:
    a = write(tmp_path / "a")
    b = write(tmp_path / "b")
    c = write(tmp_path / "c", make_data(seed=1))
    with open_dataset(a) as da, open_dataset(b) as db, open_dataset(c) as dc:
        assert da.fingerprint == db.fingerprint != dc.fingerprint
        assert len(da.fingerprint) == 32


def test_accessors_refuse_wrong_fields(ds_path: Path) -> None:
    with open_dataset(ds_path) as ds:
        with pytest.raises(KeyError, match="no field 'nope'"):
            ds.array("nope")
        with pytest.raises(ValueError, match="image-encoded"):
            ds.array("jpeg")
        with pytest.raises(ValueError, match="raw-encoded"):
            ds.encoded("image", 0)
        with pytest.raises(IndexError):
            ds.image("jpeg", N)


# ---------------------------------------------------------------- writer validation


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ([spec("index", "<i8", (), "value")], "reserved"),
        ([spec("a", "<i8", (), "value"), spec("a", "<f4", (), "value")], "repeat"),
        ([], "at least one field"),
    ],
)
def test_writer_refuses_bad_fields(tmp_path: Path, fields: list[FieldSpec], match: str) -> None:
    with pytest.raises(PackError, match=match):
        DatasetWriter(tmp_path / "x", fields)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"name": "bad-name"}, "field name"),
        ({"dtype": np.dtype("O")}, "dtype"),
        ({"dtype": np.dtype("<c8")}, "dtype"),
        ({"shape": (0, 3)}, "positive"),
        ({"role": "image"}, "raw image"),
        ({"encoding": "zip"}, "encoding"),
    ],
)
def test_field_spec_validates(kw: dict[str, Any], match: str) -> None:
    base: dict[str, Any] = {
        "name": "x",
        "dtype": np.dtype("<f4"),
        "shape": (2,),
        "role": "value",
        "encoding": "raw",
        "channels": None,
    }
    with pytest.raises(ValueError, match=match):
        FieldSpec(**(base | kw))


def test_writer_refuses_a_wrong_block(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "x", [spec("v", "<f4", (2,), "value")]) as w:
        with pytest.raises(PackError, match="holds float32"):
            w.append_block({"v": np.zeros((3, 3), np.float32)}, 3)
        with pytest.raises(PackError, match="fields"):
            w.append_block({"w": np.zeros((3, 2), np.float32)}, 3)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(ds_path: Path) -> None:
    with pytest.raises(PackError, match="--overwrite"):
        write(ds_path)


def test_overwrite_replaces_a_dataset_and_leaves_no_debris(ds_path: Path) -> None:
    with open_dataset(ds_path) as ds:
        old = ds.fingerprint
    write(ds_path, make_data(seed=3), overwrite=True)
    with open_dataset(ds_path) as ds:
        assert ds.fingerprint != old
    assert [p.name for p in ds_path.parent.iterdir()] == ["ds"]


def test_overwrite_refuses_a_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"precious")
    with pytest.raises(PackError, match="not a batchd dataset"):
        write(tmp_path / "photos", overwrite=True)
    assert (tmp_path / "photos" / "cat.png").read_bytes() == b"precious"


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError),
        DatasetWriter(tmp_path / "x", [spec("v", "<i8", (), "value")]) as w,
    ):
        w.append({"v": np.int64(1)})
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with DatasetWriter(tmp_path / "y", [spec("v", "<i8", (), "value")]):
        pass  # left without commit
    assert list(tmp_path.iterdir()) == []
    with (
        pytest.raises(PackError, match="nothing to pack"),
        DatasetWriter(tmp_path / "z", [spec("v", "<i8", (), "value")]) as w,
    ):
        w.commit()
    assert list(tmp_path.iterdir()) == []


def test_open_refuses_an_unfinished_temp_dir(ds_path: Path) -> None:
    tmp = ds_path.parent / ".ds.tmp-0123abcd"
    shutil.copytree(ds_path, tmp)  # what a pack killed just before its rename leaves
    with pytest.raises(FormatError, match="unfinished pack"):
        open_dataset(tmp)


# ---------------------------------------------------------------- corruption


def rewrite_header(path: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Change the header JSON and re-seal it with a valid checksum."""
    raw = (path / HEADER_NAME).read_bytes()
    (n,) = struct.unpack_from("<Q", raw, 16)
    header = json.loads(raw[24 : 24 + n])
    mutate(header)
    body = json.dumps(header).encode()
    head = raw[:16] + struct.pack("<Q", len(body)) + body
    (path / HEADER_NAME).write_bytes(head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)))


def truncate(p: Path, size: int | None = None) -> None:
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 1 if size is None else size)


def flip(p: Path, at: int) -> None:
    with open(p, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def set_version(p: Path, v: int) -> None:
    with open(p, "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", v))


def decreasing_offsets(p: Path) -> None:
    o = np.fromfile(p, "<i8")
    o[1], o[2] = o[2], o[1]
    o.tofile(p)


CORRUPTIONS: list[tuple[str, str, Callable[[Path], None], str]] = [
    ("truncated raw", "image.raw", truncate, "is 719 bytes, the header implies 720"),
    ("truncated data", "jpeg.data", truncate, "truncated or replaced"),
    ("grown raw", "label.raw", lambda p: p.write_bytes(p.read_bytes() + b"x"), "implies 40"),
    ("0-byte raw", "vec.raw", lambda p: truncate(p, 0), "is 0 bytes"),
    ("0-byte header", HEADER_NAME, lambda p: truncate(p, 0), "too short"),
    ("truncated header", HEADER_NAME, truncate, "truncated or corrupt"),
    ("missing raw", "target.raw", os.remove, "missing"),
    ("missing offsets", "seg.offsets", os.remove, "missing"),
    ("missing header", HEADER_NAME, os.remove, "not a batchd dataset"),
    ("bad magic", HEADER_NAME, lambda p: flip(p, 1), "bad magic"),
    ("flipped header byte", HEADER_NAME, lambda p: flip(p, 40), "header checksum mismatch"),
    (
        "future version",
        HEADER_NAME,
        lambda p: set_version(p, 7),
        r"newer batchd \(format v7\); upgrade",
    ),
    ("old version", HEADER_NAME, lambda p: set_version(p, 0), "version 0 is not supported"),
    ("decreasing offsets", "jpeg.offsets", decreasing_offsets, "offsets decrease at sample 1"),
]


@pytest.mark.parametrize(
    ("what", "fname", "corrupt", "match"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS]
)
def test_corrupt_pack_refused_by_open_and_verify(
    ds_path: Path, what: str, fname: str, corrupt: Callable[[Path], None], match: str
) -> None:
    corrupt(ds_path / fname)
    for attempt in (open_dataset, verify):
        with pytest.raises(FormatError, match=match) as info:
            attempt(ds_path)
        assert info.value.path == ds_path / fname, what
        assert isinstance(info.value, BatchdError)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda h: h.update(count=0), "count 0"),
        (lambda h: h.update(count=N + 1), "the fields imply"),
        (lambda h: h.update(fields="x"), "'fields'"),
        (lambda h: h["fields"][0].update(dtype="|O"), "unsupported dtype"),
        (lambda h: h["fields"][0].update(shape=[2**40, 2**40, 3]), "no file can hold"),
        (lambda h: h["files"].pop("label.raw"), "does not match the fields"),
        (lambda h: h["files"]["label.raw"].update(chunks=[]), "chunk checksums"),
        (lambda h: h["fields"].append(h["fields"][0]), "declared twice"),
        (lambda h: h["fields"][2].update(name="index"), "reserved"),
        (lambda h: h.update(classes=[1, 2]), "classes"),
    ],
)
def test_lying_header_refused(
    ds_path: Path, mutate: Callable[[dict[str, Any]], None], match: str
) -> None:
    rewrite_header(ds_path, mutate)
    with pytest.raises(FormatError, match=match) as info:
        open_dataset(ds_path)
    assert info.value.path.parent == ds_path


def test_offsets_must_end_at_the_data_size(ds_path: Path) -> None:
    o = np.fromfile(ds_path / "seg.offsets", "<i8")
    o[-1] -= 1
    o.tofile(ds_path / "seg.offsets")
    with pytest.raises(FormatError, match="not from 0 to the data size") as info:
        open_dataset(ds_path)
    assert info.value.path == ds_path / "seg.offsets"


def test_verify_names_the_bad_chunk(tmp_path: Path) -> None:
    data = make_data()
    data["image"] = np.random.default_rng(5).integers(0, 256, (N, 6, 8, 3), dtype=np.uint8)
    path = write(tmp_path / "ds", data, chunk_size=128)
    flip(path / "image.raw", 300)  # bytes 256-384: chunk 2 of 6
    with open_dataset(path):
        pass  # sizes are intact: open (cheap) cannot tell
    with pytest.raises(FormatError, match=r"chunk 2/6 \(bytes 256-384\)") as info:
        verify(path)
    assert info.value.path == path / "image.raw"


def test_undecodable_encoded_sample_names_field_and_sample(ds_path: Path) -> None:
    o = np.fromfile(ds_path / "jpeg.offsets", "<i8")
    with open(ds_path / "jpeg.data", "r+b") as f:
        f.seek(int(o[3]))
        f.write(b"\0" * 16)
    with open_dataset(ds_path) as ds, pytest.raises(FormatError, match="'jpeg' sample 3") as info:
        ds.image("jpeg", 3)
    assert info.value.path == ds_path / "jpeg.data"


def test_check_catches_truncation_and_replacement(ds_path: Path) -> None:
    with open_dataset(ds_path) as ds:
        ds.check()
        truncate(ds_path / "image.raw", 100)
        with pytest.raises(FormatError, match="changed size since open") as info:
            ds.check()
        assert info.value.path == ds_path / "image.raw"
    with open_dataset(write(ds_path.parent / "b")) as ds:
        new = ds.path / "label.tmp"
        new.write_bytes((ds.path / "label.raw").read_bytes())
        os.replace(new, ds.path / "label.raw")
        with pytest.raises(FormatError, match="replaced since open"):
            ds.check()
    with pytest.raises(FormatError, match="closed"):
        ds.check()


def test_verify_progress_goes_to_stderr(ds_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    verify(ds_path, progress=True)
    err = capsys.readouterr().err
    assert "verify" in err and "100%" in err


def test_a_pack_swapped_while_it_opens_pairs_its_header_with_its_own_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repack renamed into place between the header read and the files' opens.

    Seen under load in tests/reliability: the old header's fingerprint served with the
    new pack's pixels. The files now come from the directory the header came from.
    """
    from batchd_server.format import reader
    from serverproc import tiny_pack

    live, new = tiny_pack(tmp_path / "ds", seed=0), tiny_pack(tmp_path / "new", seed=1)
    with open_dataset(live) as ds:
        old_print, old_images = ds.fingerprint, np.array(ds.array("image"))
    real = reader.read_header

    def swap_after_reading(path: Path, dir_fd: int | None = None) -> dict[str, Any]:
        header = real(path, dir_fd)
        os.rename(live, tmp_path / "old")
        os.rename(new, live)
        return header

    monkeypatch.setattr(reader, "read_header", swap_after_reading)
    with open_dataset(live) as ds:
        assert ds.fingerprint == old_print
        np.testing.assert_array_equal(ds.array("image"), old_images)
