"""WebDataset tar shards, written with the standard library's tarfile."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from packimages import LABELS, N, nothing_left, png, reference_pack, same_as

from batchd_server import PackOptions, open_dataset, pack
from batchd_server.cli import cli
from batchd_server.errors import PackError
from batchd_server.pack.formats.webdataset import split_key


@pytest.fixture
def ref(tmp_path: Path) -> Path:
    return reference_pack(tmp_path)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _sample(k: int) -> dict[str, bytes]:
    return {
        "png": png(k),
        "cls": str(int(LABELS[k])).encode(),
        "json": json.dumps({"score": k / 2, "caption": "a cat"}).encode(),
        "depth.npy": _npy(np.full((2, 3), k, np.float32)),
        "txt": b"a caption",
    }


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for key, parts in samples.items():
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _shards(tmp_path: Path) -> None:
    for s in range(2):
        keys = range(s * 3, s * 3 + 3)
        write_shard(tmp_path / f"shard-{s:03d}.tar", {f"d/{k:06d}": _sample(k) for k in keys})


def test_keys_split_at_the_basenames_first_dot() -> None:
    assert split_key("train/0001.seg.png") == ("train/0001", "seg.png")
    assert split_key("a.b/c.jpg") == ("a.b/c", "jpg")
    assert split_key("noext") == ("noext", "")


@pytest.mark.parametrize("mode", ["raw", "encoded"])
def test_shards_round_trip_like_the_folder(ref: Path, tmp_path: Path, mode: str) -> None:
    _shards(tmp_path)
    opts = PackOptions(mode=mode, progress=False, block=2, workers=2)  # type: ignore[arg-type]
    s = pack(str(tmp_path / "shard-{000..001}.tar"), tmp_path / "ds", options=opts)
    assert s.count == N and any("['txt']" in n for n in s.notes)
    same_as(ref, tmp_path / "ds")
    with open_dataset(tmp_path / "ds") as ds:
        assert sorted(ds.fields) == ["depth", "image", "label", "score"]
        np.testing.assert_allclose(ds.array("score"), np.arange(N) / 2)
        np.testing.assert_array_equal(ds.array("depth")[4], np.full((2, 3), 4, np.float32))
        assert ds.header["packing"]["kind"] == "webdataset"


def test_field_picks_by_extension(tmp_path: Path) -> None:
    _shards(tmp_path)
    opts = PackOptions(fields=(("image", "png"), ("y", "cls")))
    pack(tmp_path / "shard-000.tar", tmp_path / "ds", options=opts)
    with open_dataset(tmp_path / "ds") as ds:
        assert sorted(ds.fields) == ["image", "y"]
        np.testing.assert_array_equal(ds.array("y"), LABELS[:3])


def test_a_bad_member_is_named_and_skip_records_it(tmp_path: Path) -> None:
    samples = {f"{k:06d}": _sample(k) for k in range(4)}
    samples["000002"]["png"] = png(2)[:50]
    write_shard(tmp_path / "s.tar", samples)
    with pytest.raises(PackError, match=r"s\.tar: sample '000002' \(000002\.png\): not an image"):
        pack(tmp_path / "s.tar", tmp_path / "ds")
    nothing_left(tmp_path, "ds")
    s = pack(
        tmp_path / "s.tar", tmp_path / "ds", options=PackOptions(on_error="skip", max_skipped=1)
    )
    assert s.count == 3 and "000002.png" in s.skipped[0]["source"]
    samples["000002"]["png"] = png(2)
    samples["000001"]["cls"] = b"cat"
    write_shard(tmp_path / "c.tar", samples)
    with pytest.raises(PackError, match=r"sample '000001' .*cls: b'cat' is not an integer label"):
        pack(tmp_path / "c.tar", tmp_path / "x")
    nothing_left(tmp_path, "x")


def test_a_cut_or_corrupt_shard_is_named(tmp_path: Path) -> None:
    write_shard(tmp_path / "s.tar", {f"{k:06d}": _sample(k) for k in range(4)})
    raw = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(PackError, match=r"cut\.tar: sample .*(cut short|damaged)"):
        pack(tmp_path / "cut.tar", tmp_path / "ds")
    nothing_left(tmp_path, "ds")
    with tarfile.open(tmp_path / "s.tar") as tf:
        third = tf.getmembers()[7]  # a header in the middle of the shard
    bad = bytearray(raw)
    bad[third.offset + 3] ^= 0xFF
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    with pytest.raises(
        PackError, match=rf"bad\.tar: .*a corrupt tar header at byte {third.offset}"
    ):
        pack(tmp_path / "bad.tar", tmp_path / "ds", options=PackOptions(on_error="stop"))
    nothing_left(tmp_path, "ds")


def test_cli_packs_a_brace_pattern(ref: Path, tmp_path: Path) -> None:
    _shards(tmp_path)
    pattern = str(tmp_path / "shard-{000..001}.tar")
    result = CliRunner().invoke(cli, ["pack", pattern, str(tmp_path / "ds"), "-q"])
    assert result.exit_code == 0, result.output
    same_as(ref, tmp_path / "ds")
    result = CliRunner().invoke(
        cli, ["pack", str(tmp_path / "shard-{000..002}.tar"), str(tmp_path / "x")]
    )
    assert result.exit_code == 1 and "shard-002.tar: no such file" in str(result.exception)


def test_a_mask_member_pairs_with_its_image_and_sizes_must_agree(tmp_path: Path) -> None:
    import cv2
    from packimages import rgb

    def grey(k: int, h: int = 12, w: int = 16) -> bytes:
        return bytes(cv2.imencode(".png", (rgb(k, h, w)[..., 0] % 3).astype(np.uint8))[1])

    samples = {f"{k:06d}": {"png": png(k), "mask.png": grey(k)} for k in range(3)}
    write_shard(tmp_path / "seg.tar", samples)
    pack(tmp_path / "seg.tar", tmp_path / "ds", options=PackOptions(size=(6, 8)))
    with open_dataset(tmp_path / "ds") as ds:
        assert ds.fields["mask"].role == "mask" and ds.array("mask").shape == (3, 6, 8)
        assert set(np.unique(ds.array("mask"))) <= {0, 1, 2}  # nearest-neighbour: labels stay
    samples["000001"] = {
        "png": bytes(cv2.imencode(".png", rgb(1, 20, 20))[1]),
        "mask.png": grey(1, 20, 20),
    }
    write_shard(tmp_path / "mixed.tar", samples)
    with pytest.raises(
        PackError, match=r"sample '000001' .*is 20x20, the first image 12x16.*--size"
    ):
        pack(tmp_path / "mixed.tar", tmp_path / "x", options=PackOptions(on_error="skip"))
    nothing_left(tmp_path, "x")


def test_a_tight_read_ahead_in_bytes_keeps_order(
    ref: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchd_server.pack import stream

    monkeypatch.setattr(stream, "_MAX_HELD", 1)  # every block written before the next is read
    _shards(tmp_path)
    opts = PackOptions(progress=False, block=1, workers=4)
    pack(str(tmp_path / "shard-*.tar"), tmp_path / "ds", options=opts)
    same_as(ref, tmp_path / "ds")
