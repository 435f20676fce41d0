"""HDF5 sources, written with h5py: chunked, compressed datasets read in row slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from packimages import LABELS, N, nothing_left, reference_pack, rgb, same_as

from batchd_server import PackOptions, open_dataset, pack
from batchd_server.cli import cli
from batchd_server.errors import PackError

h5py = pytest.importorskip("h5py", reason="HDF5 needs the batchd[hdf5] extra")


@pytest.fixture
def ref(tmp_path: Path) -> Path:
    return reference_pack(tmp_path)


def _write(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "train/images",
            data=np.stack([rgb(k) for k in range(N)]),
            chunks=(2, 12, 16, 3),
            compression="gzip",
        )
        f.create_dataset("train/labels", data=LABELS)
        f.create_dataset("version", data=3)  # a scalar: left out
        f.create_dataset("names", data=np.array([b"cat", b"dog"], dtype="S3")[[0, 0, 0, 1, 1, 1]])
    return path


PICK = (("image", "train/images"), ("label", "train/labels"))


def test_datasets_round_trip_like_the_folder(ref: Path, tmp_path: Path) -> None:
    path = _write(tmp_path / "d.h5")
    s = pack(path, tmp_path / "ds", options=PackOptions(progress=False, fields=PICK))
    assert s.count == N
    same_as(ref, tmp_path / "ds")
    with open_dataset(tmp_path / "ds") as ds:
        assert ds.header["packing"]["kind"] == "hdf5"
        assert ds.header["packing"]["fields"] == {"image": "train/images", "label": "train/labels"}


def test_all_numeric_datasets_by_default(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.h5")
    s = pack(path, tmp_path / "ds", options=PackOptions(progress=False))
    assert sorted(s.fields) == ["train_images", "train_labels"]
    assert s.fields["train_images"].role == "image"
    assert any("'names'" in n and "'version'" in n for n in s.notes)
    assert any("'train/images' is stored as field 'train_images'" in n for n in s.notes)


def test_a_corrupt_chunk_names_the_dataset_and_rows(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.h5")
    with h5py.File(path, "r") as f:
        info = f["train/images"].id.get_chunk_info(1)  # rows 2..3
    raw = bytearray(path.read_bytes())
    for i in range(info.byte_offset + 10, info.byte_offset + 40):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(PackError, match=r"d\.h5:train/images: reading rows 0\.\.5 failed"):
        pack(path, tmp_path / "ds", options=PackOptions(fields=PICK))
    nothing_left(tmp_path, "ds")


def test_refusals(tmp_path: Path) -> None:
    (tmp_path / "x.h5").write_bytes(b"not hdf5")
    with pytest.raises(PackError, match=r"x\.h5: not a readable HDF5 file"):
        pack(tmp_path / "x.h5", tmp_path / "ds")
    path = _write(tmp_path / "d.h5")
    with pytest.raises(PackError, match=r"d\.h5:version: a scalar, not an array of samples"):
        pack(
            path,
            tmp_path / "ds",
            options=PackOptions(fields=(("a", "train/images"), ("b", "version"))),
        )
    nothing_left(tmp_path, "ds")


def test_cli_packs_hdf5(ref: Path, tmp_path: Path) -> None:
    path = _write(tmp_path / "d.hdf5")
    args = ["pack", str(path), str(tmp_path / "ds"), "-q"]
    result = CliRunner().invoke(
        cli, [*args, "--field", "image=train/images", "--field", "label=train/labels"]
    )
    assert result.exit_code == 0, result.output
    same_as(ref, tmp_path / "ds")
