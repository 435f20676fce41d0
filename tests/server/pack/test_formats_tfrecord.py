"""TFRecord sources: files written by the documented byte layout, read without TensorFlow."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from packimages import LABELS, N, nothing_left, png, reference_pack, rgb, same_as

from batchd_server import PackOptions, open_dataset, pack
from batchd_server.cli import cli
from batchd_server.errors import PackError

pytest.importorskip("google_crc32c", reason="TFRecord needs the batchd[tfrecord] extra")

import tfrecords as tfr  # its writer needs google_crc32c too

from batchd_server.pack.formats.tfrecord import parse_example


@pytest.fixture
def ref(tmp_path: Path) -> Path:
    return reference_pack(tmp_path)


def _encoded(k: int) -> bytes:
    return tfr.example(
        {
            "image/encoded": tfr.bytes_feature(png(k)),
            "image/format": tfr.bytes_feature(b"png"),
            "image/class/label": tfr.int64_feature(int(LABELS[k])),
        }
    )


def _mnist_like(k: int) -> bytes:
    """The layout the TensorFlow users bring: index, label, image_string (raw pixels)."""
    return tfr.example(
        {
            "index": tfr.int64_feature(k, packed=False),
            "label": tfr.int64_feature(int(LABELS[k]), packed=False),
            "image_string": tfr.bytes_feature(rgb(k).tobytes()),
        }
    )


PICK = (("image", "image/encoded"), ("label", "image/class/label"))


def test_the_crc_and_the_wire_format_are_the_documented_ones() -> None:
    import google_crc32c

    assert google_crc32c.value(b"123456789") == 0xE3069283  # CRC-32C's check value
    data = tfr.example(
        {
            "neg": tfr.int64_feature(-3, 7),
            "one": tfr.int64_feature(5, packed=False),
            "f": tfr.float_feature(0.5, -2.0, packed=False),
            "fp": tfr.float_feature(1.5),
            "b": tfr.bytes_feature(b"ab", b""),
        }
    )
    got = parse_example(data)
    assert got["neg"][0] == "int64" and list(got["neg"][1]) == [-3, 7]
    assert list(got["one"][1]) == [5] and list(got["f"][1]) == [0.5, -2.0]
    assert list(got["fp"][1]) == [1.5] and got["b"] == ("bytes", [b"ab", b""])
    with pytest.raises(ValueError, match="runs past"):
        parse_example(data[:-3])


@pytest.mark.parametrize("mode", ["raw", "encoded"])
def test_encoded_images_round_trip_like_the_folder(ref: Path, tmp_path: Path, mode: str) -> None:
    tfr.write(tmp_path / "a.tfrecord", [_encoded(k) for k in range(3)])
    tfr.write(tmp_path / "b.tfrecord", [_encoded(k) for k in range(3, N)])
    opts = PackOptions(mode=mode, progress=False, fields=PICK, block=2, workers=2)  # type: ignore[arg-type]
    s = pack(str(tmp_path / "*.tfrecord"), tmp_path / "ds", options=opts)
    assert s.count == N and s.skipped == []
    same_as(ref, tmp_path / "ds")
    with open_dataset(tmp_path / "ds") as ds:
        assert ds.header["packing"]["kind"] == "tfrecord"
        if mode == "encoded":
            assert bytes(ds.encoded("image", 4)) == png(4)


def test_mnist_layout_raw_bytes_reshaped_gzip(ref: Path, tmp_path: Path) -> None:
    body = b"".join(tfr.frame(_mnist_like(k)) for k in range(N))
    (tmp_path / "mnist.tfrecord.gz").write_bytes(gzip.compress(body))
    opts = PackOptions(progress=False, feature_shapes=(("image_string", (12, 16, 3)),))
    s = pack(tmp_path / "mnist.tfrecord.gz", tmp_path / "ds", options=opts)
    assert any("'index' is stored as field 'source_index'" in n for n in s.notes)
    same_as(ref, tmp_path / "ds", image="image_string")
    with open_dataset(tmp_path / "ds") as ds:
        np.testing.assert_array_equal(ds.array("source_index"), np.arange(N))
    # without the shape, the bytes are a flat uint8 field, and the pack says how to reshape
    s = pack(tmp_path / "mnist.tfrecord.gz", tmp_path / "flat", options=PackOptions())
    assert s.fields["image_string"].shape == (12 * 16 * 3,)


def _records(tmp_path: Path) -> tuple[Path, bytes]:
    body = b"".join(tfr.frame(_encoded(k)) for k in range(N))
    return tmp_path / "t.tfrecord", body


def test_a_bad_data_crc_names_the_record_and_skip_records_it(tmp_path: Path) -> None:
    path = tmp_path / "t.tfrecord"
    frames = [tfr.frame(_encoded(k)) for k in range(N)]
    bad = bytearray(frames[2])
    bad[40] ^= 0x01  # a bit flip inside record 2's data
    path.write_bytes(b"".join([*frames[:2], bytes(bad), *frames[3:]]))
    with pytest.raises(PackError, match=r"t\.tfrecord record 2: the data's CRC-32C does not match"):
        pack(path, tmp_path / "ds", options=PackOptions(fields=PICK))
    nothing_left(tmp_path, "ds")
    opts = PackOptions(fields=PICK, on_error="skip", max_skipped=1)
    s = pack(path, tmp_path / "ds", options=opts)
    assert s.count == N - 1
    assert s.skipped[0]["source"].endswith("t.tfrecord record 2") and s.skipped[0]["row"] == 2
    assert "CRC-32C" in s.skipped[0]["reason"]


def test_a_truncated_file_and_a_bad_length_crc_are_named(tmp_path: Path) -> None:
    path, body = _records(tmp_path)
    path.write_bytes(body[:-10])
    with pytest.raises(PackError, match=rf"t\.tfrecord record {N - 1}: truncated"):
        pack(path, tmp_path / "ds", options=PackOptions(fields=PICK))
    nothing_left(tmp_path, "ds")
    s = pack(
        path, tmp_path / "ds", options=PackOptions(fields=PICK, on_error="skip", max_skipped=1)
    )
    assert s.count == N - 1 and "truncated" in s.skipped[0]["reason"]
    broken = bytearray(body)
    broken[9] ^= 0xFF  # record 0's length CRC: nothing after it can be found
    path.write_bytes(bytes(broken))
    with pytest.raises(PackError, match=r"t\.tfrecord record 0 \(byte 0\): the length's CRC-32C"):
        pack(path, tmp_path / "x", options=PackOptions(fields=PICK, on_error="skip"))
    nothing_left(tmp_path, "x")


def test_an_undecodable_image_is_named_by_record(tmp_path: Path) -> None:
    bad = tfr.example(
        {
            "image/encoded": tfr.bytes_feature(png(0)[:40]),
            "image/format": tfr.bytes_feature(b"png"),
            "image/class/label": tfr.int64_feature(0),
        }
    )
    tfr.write(tmp_path / "t.tfrecord", [_encoded(0), bad, _encoded(1)])
    with pytest.raises(PackError, match=r"t\.tfrecord record 1: not an image"):
        pack(tmp_path / "t.tfrecord", tmp_path / "ds", options=PackOptions(fields=PICK))
    nothing_left(tmp_path, "ds")


def test_mismatched_records_stop_naming_the_feature(tmp_path: Path) -> None:
    odd = tfr.example({"label": tfr.int64_feature(1, 2), "image_string": tfr.bytes_feature(b"x")})
    tfr.write(tmp_path / "t.tfrecord", [_mnist_like(0), odd])
    with pytest.raises(PackError, match=r"record 1: holds \['image_string', 'label'\]"):
        pack(tmp_path / "t.tfrecord", tmp_path / "ds")
    pick = (("image_string", "image_string"), ("label", "label"))
    with pytest.raises(PackError, match=r"record 1: field 'image_string' has shape \(1,\)"):
        pack(tmp_path / "t.tfrecord", tmp_path / "ds", options=PackOptions(fields=pick))
    nothing_left(tmp_path, "ds")


def test_cli_packs_a_glob_of_tfrecords(ref: Path, tmp_path: Path) -> None:
    for i in range(2):
        tfr.write(tmp_path / f"train-{i}.tfrecord", [_encoded(k) for k in range(i * 3, i * 3 + 3)])
    result = CliRunner().invoke(
        cli,
        [
            "pack",
            str(tmp_path / "train-*.tfrecord"),
            str(tmp_path / "ds"),
            "-q",
            "--field",
            "image=image/encoded",
            "--field",
            "label=image/class/label",
        ],
    )
    assert result.exit_code == 0, result.output
    same_as(ref, tmp_path / "ds")
    result = CliRunner().invoke(
        cli, ["pack", str(tmp_path / "nope-*.tfrecord"), str(tmp_path / "x")]
    )
    assert result.exit_code == 1 and "matches no file" in str(result.exception)
