"""Parquet sources, written with pyarrow's own writer, in the Hugging Face image layout too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from packimages import LABELS, N, nothing_left, png, reference_pack, same_as

from batchd_server import PackOptions, open_dataset, pack
from batchd_server.cli import cli
from batchd_server.errors import PackError

pa = pytest.importorskip("pyarrow", reason="Parquet needs the batchd[parquet] extra")
pq = pytest.importorskip("pyarrow.parquet", reason="Parquet needs the batchd[parquet] extra")

HF = {
    "info": {
        "features": {
            "image": {"_type": "Image"},
            "label": {"_type": "ClassLabel", "names": ["cat", "dog"]},
        }
    }
}


@pytest.fixture
def ref(tmp_path: Path) -> Path:
    return reference_pack(tmp_path)


def hf_table(keys: range) -> object:
    """What ``datasets`` writes for an Image and a ClassLabel column (and a caption)."""
    image = pa.array(
        [{"bytes": png(k), "path": f"{k}.png"} for k in keys],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    table = pa.table(
        {
            "image": image,
            "label": pa.array([int(LABELS[k]) for k in keys], pa.int64()),
            "caption": pa.array([f"photo {k}" for k in keys]),
            "box": pa.array([[k, k + 1.0] for k in keys], pa.list_(pa.float32())),
        }
    )
    return table.replace_schema_metadata({b"huggingface": json.dumps(HF).encode()})


def test_hf_layout_round_trips_with_its_class_names(ref: Path, tmp_path: Path) -> None:
    (tmp_path / "hf" / "data").mkdir(parents=True)
    pq.write_table(hf_table(range(3)), tmp_path / "hf" / "data" / "train-00000-of-00002.parquet")
    pq.write_table(hf_table(range(3, N)), tmp_path / "hf" / "data" / "train-00001-of-00002.parquet")
    s = pack(tmp_path / "hf", tmp_path / "ds", options=PackOptions(progress=False, block=2))
    assert s.count == N and any("['caption']" in n for n in s.notes)
    same_as(ref, tmp_path / "ds")
    with open_dataset(tmp_path / "ds") as ds:
        assert ds.classes == ["cat", "dog"]
        np.testing.assert_array_equal(ds.array("box")[2], [2, 3])
        assert ds.header["packing"]["kind"] == "parquet"


def test_plain_binary_images_encoded_mode(ref: Path, tmp_path: Path) -> None:
    table = pa.table({"jpg": pa.array([png(k) for k in range(N)]), "y": pa.array(LABELS.tolist())})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=4)
    opts = PackOptions(mode="encoded", fields=(("image", "jpg"), ("label", "y")))
    pack(tmp_path / "t.parquet", tmp_path / "ds", options=opts)
    same_as(ref, tmp_path / "ds")
    with open_dataset(tmp_path / "ds") as ds:
        assert ds.classes is None and bytes(ds.encoded("image", 5)) == png(5)


def _corrupt(tmp_path: Path) -> Path:
    """Three row groups of two rows, uncompressed, page checksums on; row group 1 hit."""
    path = tmp_path / "c.parquet"
    pq.write_table(
        hf_table(range(N)),
        path,
        row_group_size=2,
        compression="none",
        write_page_checksum=True,
    )
    col = pq.ParquetFile(path).metadata.row_group(1).column(0)  # the image bytes
    raw = bytearray(path.read_bytes())
    raw[col.data_page_offset + col.total_compressed_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


def test_a_corrupt_page_names_the_file_and_row_group(tmp_path: Path) -> None:
    path = _corrupt(tmp_path)
    with pytest.raises(
        PackError, match=r"c\.parquet row 2 \(row group 1\): row group 1 \(rows 2..3\)"
    ):
        pack(path, tmp_path / "ds")
    nothing_left(tmp_path, "ds")
    s = pack(path, tmp_path / "ds", options=PackOptions(on_error="skip", max_skipped="50%"))
    assert s.count == N - 2
    assert [x["row"] for x in s.skipped] == [2, 3] and "row group 1" in s.skipped[0]["reason"]


def test_refusals(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(PackError, match=r"x\.parquet: not a readable Parquet file"):
        pack(tmp_path / "x.parquet", tmp_path / "ds")
    pq.write_table(hf_table(range(2)), tmp_path / "t.parquet")
    with pytest.raises(PackError, match="column 'caption' is string"):
        pack(
            tmp_path / "t.parquet", tmp_path / "ds", options=PackOptions(fields=(("c", "caption"),))
        )
    nothing_left(tmp_path, "ds")


def test_cli_packs_a_parquet_file(ref: Path, tmp_path: Path) -> None:
    pq.write_table(hf_table(range(N)), tmp_path / "train.parquet")
    result = CliRunner().invoke(
        cli, ["pack", str(tmp_path / "train.parquet"), str(tmp_path / "ds"), "-q"]
    )
    assert result.exit_code == 0, result.output
    same_as(ref, tmp_path / "ds")


def _save_to_disk(folder: Path, keys: range) -> Path:
    """What ``Dataset.save_to_disk`` writes: Arrow stream files, listed in state.json."""
    folder.mkdir(parents=True)
    table = hf_table(keys)
    with (
        pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as writer,
    ):
        for batch in table.to_batches(max_chunksize=4):
            writer.write_batch(batch)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": "train"}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text(json.dumps(HF["info"]))
    return folder


def test_a_save_to_disk_folder_round_trips(ref: Path, tmp_path: Path) -> None:
    src = _save_to_disk(tmp_path / "saved" / "train", range(N))
    (tmp_path / "saved" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(PackError, match=r"a DatasetDict .* pack one split's folder .*saved/train"):
        pack(tmp_path / "saved", tmp_path / "ds")
    s = pack(src, tmp_path / "ds", options=PackOptions(progress=False, block=3))
    assert s.count == N
    same_as(ref, tmp_path / "ds")
    with open_dataset(tmp_path / "ds") as ds:
        assert ds.classes == ["cat", "dog"]
    arrow = src / "data-00000-of-00001.arrow"
    arrow.write_bytes(arrow.read_bytes()[:-200])
    with pytest.raises(
        PackError, match=r"data-00000-of-00001\.arrow: record batch 1 \(from row 4\)"
    ):
        pack(src, tmp_path / "x")
    nothing_left(tmp_path, "x")
