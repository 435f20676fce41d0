"""``.npy`` / ``.npz`` sources: written with numpy's own writers, packed without loading."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from packimages import LABELS, H, N, W, nothing_left, reference_pack, rgb, same_as

from batchd_server import PackOptions, open_dataset, pack
from batchd_server.cli import cli
from batchd_server.errors import ConfigError, PackError


def _images() -> np.ndarray:
    return np.stack([rgb(k) for k in range(N)])


@pytest.fixture
def folder_pack(tmp_path: Path) -> Path:
    return reference_pack(tmp_path)


def test_npy_files_round_trip_like_the_folder(folder_pack: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", _images())
    np.save(tmp_path / "y.npy", LABELS)
    opts = PackOptions(progress=False, fields=(("image", "x"), ("label", "y")))
    s = pack([tmp_path / "x.npy", tmp_path / "y.npy"], tmp_path / "ds", options=opts)
    assert s.count == N
    same_as(folder_pack, tmp_path / "ds")
    with open_dataset(tmp_path / "ds") as ds:
        assert ds.header["packing"]["kind"] == "npy"
        assert ds.header["packing"]["fields"] == {"image": "x", "label": "y"}


@pytest.mark.parametrize("writer", [np.savez, np.savez_compressed])
def test_npz_stored_and_compressed_round_trip(
    writer: object, folder_pack: Path, tmp_path: Path
) -> None:
    writer(tmp_path / "d.npz", image=_images(), label=LABELS)  # type: ignore[operator]
    pack(tmp_path / "d.npz", tmp_path / "ds", options=PackOptions(progress=False))
    same_as(folder_pack, tmp_path / "ds")


def test_npz_members_are_memory_mapped_not_loaded(tmp_path: Path) -> None:
    from contextlib import ExitStack

    from batchd_server.pack.formats.npy import _npz_members

    np.savez(tmp_path / "d.npz", image=_images(), label=LABELS)
    with ExitStack() as stack:
        members = _npz_members(tmp_path / "d.npz", stack)
        assert all(isinstance(arr, np.memmap) for arr, _ in members.values())
        np.testing.assert_array_equal(members["image"][0], _images())


def test_mnist_layout_needs_a_pick_and_a_channel_axis(tmp_path: Path) -> None:
    grey = np.random.default_rng(0).integers(0, 256, (5, H, W), dtype=np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=grey, y_train=np.arange(5), x_test=grey[:2])
    with pytest.raises(PackError, match=r"differ in length.*--field image=x_train"):
        pack(tmp_path / "mnist.npz", tmp_path / "ds", options=PackOptions(progress=False))
    nothing_left(tmp_path, "ds")
    picked = (("image", "x_train"), ("label", "y_train"))
    s = pack(tmp_path / "mnist.npz", tmp_path / "a", options=PackOptions(fields=picked))
    assert any("--feature-shape image=12,16,1" in n for n in s.notes)
    opts = PackOptions(fields=picked, feature_shapes=(("image", (H, W, 1)),))
    pack(tmp_path / "mnist.npz", tmp_path / "b", options=opts)
    with open_dataset(tmp_path / "b") as ds:
        assert ds.fields["image"].role == "image" and ds.fields["image"].channels == 1
        np.testing.assert_array_equal(ds.array("image")[..., 0], grey)


def test_refusals_name_the_file_and_leave_nothing(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(PackError, match=r"obj\.npy: holds Python objects"):
        pack(tmp_path / "obj.npy", tmp_path / "ds")
    np.save(tmp_path / "x.npy", _images())
    (tmp_path / "cut.npy").write_bytes((tmp_path / "x.npy").read_bytes()[:-100])
    with pytest.raises(PackError, match=r"cut\.npy: not a readable \.npy"):
        pack(tmp_path / "cut.npy", tmp_path / "ds")
    with pytest.raises(PackError, match=r"no 'nope' to take with --field; it holds \['x'\]"):
        pack(tmp_path / "x.npy", tmp_path / "ds", options=PackOptions(fields=(("a", "nope"),)))
    with pytest.raises(PackError, match="cannot hold"):
        pack(
            tmp_path / "x.npy",
            tmp_path / "ds",
            options=PackOptions(feature_shapes=(("x", (7, 7)),)),
        )
    with pytest.raises(ConfigError, match="packed as they are"):
        pack(tmp_path / "x.npy", tmp_path / "ds", options=PackOptions(size=(8, 8)))
    nothing_left(tmp_path, "ds")


def test_a_corrupt_compressed_member_is_named(tmp_path: Path) -> None:
    big = np.random.default_rng(1).integers(0, 4, (400, 64), dtype=np.uint8)
    np.savez_compressed(tmp_path / "d.npz", image=big)
    raw = bytearray((tmp_path / "d.npz").read_bytes())
    with zipfile.ZipFile(tmp_path / "d.npz") as zf:
        info = zf.getinfo("image.npy")
    mid = info.header_offset + 30 + len("image.npy") + info.compress_size // 2
    raw[mid] ^= 0xFF
    (tmp_path / "d.npz").write_bytes(bytes(raw))
    with pytest.raises(PackError, match=r"d\.npz:image") as err:
        pack(tmp_path / "d.npz", tmp_path / "ds", options=PackOptions(progress=False))
    assert "nothing was written" in str(err.value) or "truncated" in str(err.value)
    nothing_left(tmp_path, "ds")


def test_cli_packs_npy_files(folder_pack: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", _images())
    np.save(tmp_path / "y.npy", LABELS)
    args = ["pack", str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), str(tmp_path / "ds")]
    result = CliRunner().invoke(cli, [*args, "-q", "--field", "image=x", "--field", "label=y"])
    assert result.exit_code == 0, result.output
    assert "Packed 6 samples" in result.output
    same_as(folder_pack, tmp_path / "ds")
    result = CliRunner().invoke(cli, [*args, "--field", "image"])
    assert result.exit_code == 2 and "give NAME=KEY" in result.output
