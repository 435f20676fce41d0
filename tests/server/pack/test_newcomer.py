"""A newcomer's real folders (issue 16): masks and grey images keep one shape whatever
the storage mode, empty class folders and OS litter, numeric folder names as labels."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from packimages import H, W, rgb, save

from batchd.wire import decode_batch
from batchd_server import PackOptions, open_dataset, pack
from batchd_server.cli import cli
from batchd_server.errors import ConfigError, PackError
from batchd_server.serve.engine import Engine, EngineConfig
from batchd_server.serve.registry import Registry
from batchd_server.serve.request import BatchRequest


def serve_batch(root: Path, name: str, augment: str) -> tuple[Any, dict[str, Any]]:
    """Batch 0 (4 samples, in pack order) and the info with batch_fields, from a real engine."""
    eng = Engine(Registry(root), EngineConfig(threads=1))

    async def go() -> tuple[Any, dict[str, Any]]:
        req = BatchRequest(dataset=name, k=0, batch_size=4, shuffle=False, augment=augment)
        body = bytes((await eng.batch(req)).body)
        info = await eng.info(name, augment=augment)
        return decode_batch(body), info

    try:
        return asyncio.run(go())
    finally:
        eng.close()


# ------------------------------------------------------------------ one shape per field


@pytest.fixture
def seg(tmp_path: Path) -> Path:
    """A CSV of 4 RGB images with masks (values k+1)."""
    d = tmp_path / "seg"
    rows = ["image,mask"]
    for k in range(4):
        save(d / "img" / f"{k}.png", rgb(k))
        save(d / "masks" / f"{k}.png", np.full((H, W), k + 1, np.uint8))
        rows.append(f"img/{k}.png,masks/{k}.png")
    (d / "t.csv").write_text("\n".join(rows) + "\n")
    return d / "t.csv"


WHOLE = '[{"op":"center_crop","size":[12,16]}]'  # encoded images vary: a batch needs a size


@pytest.mark.parametrize("augment", [WHOLE, '[{"op":"random_crop","size":8},{"op":"hflip"}]'])
def test_a_mask_has_one_shape_raw_or_encoded(seg: Path, tmp_path: Path, augment: str) -> None:
    root = tmp_path / "data"
    for mode in ("raw", "encoded"):
        pack(seg, root / mode, mask_column="mask", options=PackOptions(mode=mode))  # type: ignore[arg-type]
    raw, raw_info = serve_batch(root, "raw", augment)
    enc, enc_info = serve_batch(root, "encoded", augment)
    side = H if augment == WHOLE else 8
    width = W if augment == WHOLE else 8
    assert raw.fields["mask"].shape == enc.fields["mask"].shape == (4, side, width)
    assert raw.fields["image"].shape == enc.fields["image"].shape == (4, side, width, 3)
    assert raw_info["batch_fields"] == enc_info["batch_fields"]
    assert enc_info["batch_fields"]["mask"]["shape"] == [side, width]
    np.testing.assert_array_equal(raw.fields["mask"], enc.fields["mask"])
    np.testing.assert_array_equal(raw.fields["image"], enc.fields["image"])  # PNG: lossless


@pytest.fixture
def grey_tree(tmp_path: Path) -> Path:
    """MNIST-like: 2 classes x 2 single-channel PNGs."""
    root = tmp_path / "digits"
    for k in range(4):
        g = np.random.default_rng(k).integers(0, 256, (H, W), dtype=np.uint8)
        save(root / str(k % 2) / f"{k}.png", g)
    return root


def test_grey_images_pack_and_serve_as_hxwx1_in_both_modes(grey_tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    for mode in ("raw", "encoded"):
        pack(grey_tree, root / mode, options=PackOptions(mode=mode, channels=1))  # type: ignore[arg-type]
    with open_dataset(root / "raw") as ds:
        assert ds.fields["image"].shape == (H, W, 1) and ds.fields["image"].channels == 1
        first = ds.array("image")[0]
    with open_dataset(root / "encoded") as ds:
        assert ds.fields["image"].channels == 1
        assert ds.image("image", 0).shape == (H, W, 1)
    want = cv2.imread(str(grey_tree / "0" / "0.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(first[:, :, 0], want)
    crop = '[{"op":"random_crop","size":8},{"op":"hflip"},{"op":"brightness","delta":0.2}]'
    for augment in (WHOLE, crop):
        raw, raw_info = serve_batch(root, "raw", augment)
        enc, enc_info = serve_batch(root, "encoded", augment)
        hw = (H, W) if augment == WHOLE else (8, 8)
        assert raw.fields["image"].shape == enc.fields["image"].shape == (4, *hw, 1)
        np.testing.assert_array_equal(raw.fields["image"], enc.fields["image"])
        assert raw_info["batch_fields"] == enc_info["batch_fields"]


def test_rgb_sources_packed_as_grey_are_converted(tmp_path: Path) -> None:
    save(tmp_path / "src" / "a" / "0.png", rgb(0))
    pack(tmp_path / "src", tmp_path / "ds", options=PackOptions(channels=1))
    with open_dataset(tmp_path / "ds") as ds:
        got = ds.array("image")[0, :, :, 0]
    want = cv2.cvtColor(rgb(0), cv2.COLOR_RGB2GRAY)
    assert np.abs(got.astype(int) - want).max() <= 1


def test_channels_option_validates() -> None:
    with pytest.raises(ConfigError, match="channels 2: use 3"):
        PackOptions(channels=2)


def test_saturation_on_a_grey_pack_says_it_needs_rgb(grey_tree: Path, tmp_path: Path) -> None:
    pack(grey_tree, tmp_path / "data" / "g", options=PackOptions(channels=1))
    with pytest.raises(Exception, match="needs 3-channel RGB images"):
        serve_batch(tmp_path / "data", "g", '[{"op":"saturation","range":[0.5,1.5]}]')


# ------------------------------------------------------------------ folder trees


def test_empty_class_folders_are_left_out_with_a_note(tmp_path: Path) -> None:
    src = tmp_path / "src"
    save(src / "cat" / "0.png", rgb(0))
    save(src / "dog" / "1.png", rgb(1))
    (src / "bird").mkdir()
    s = pack(src, tmp_path / "ds")
    assert "left out 1 empty class folder(s): 'bird'" in str(s) and "--keep-empty-classes" in str(s)
    with open_dataset(tmp_path / "ds") as ds:
        assert ds.classes == ["cat", "dog"]
        np.testing.assert_array_equal(ds.array("label"), [0, 1])
        assert ds.header["packing"]["notes"] == list(s.notes)
    s = pack(src, tmp_path / "kept", options=PackOptions(keep_empty_classes=True))
    with open_dataset(tmp_path / "kept") as ds:
        assert ds.classes == ["bird", "cat", "dog"]
        np.testing.assert_array_equal(ds.array("label"), [1, 2])


@pytest.mark.parametrize("litter", ["Thumbs.db", "desktop.ini", ".DS_Store", "._0.png"])
def test_os_litter_is_never_read(tmp_path: Path, litter: str) -> None:
    src = tmp_path / "src"
    save(src / "cat" / "0.png", rgb(0))
    (src / "cat" / litter).write_bytes(b"\x00junk the OS wrote")
    save(src / "@eaDir" / "0.png", rgb(5))  # a Synology index folder: not a class
    save(src / "cat" / "@eaDir" / "0.png@SynoEAStream", rgb(6))
    s = pack(src, tmp_path / "ds")
    assert s.count == 1 and s.skipped == []
    with open_dataset(tmp_path / "ds") as ds:
        assert ds.classes == ["cat"]


@pytest.fixture
def counts(tmp_path: Path) -> Path:
    """Folders named by a count, 0/ 2/ 10/: sorted as text, 10 comes before 2."""
    root = tmp_path / "fish"
    for k, n in enumerate(["0", "2", "10"]):
        save(root / n / f"{k}.png", rgb(k))
    return root


def test_numeric_folders_as_classes_say_the_order_is_text(counts: Path, tmp_path: Path) -> None:
    s = pack(counts, tmp_path / "ds")
    assert "sorted text order" in str(s) and "--label-from-folder int" in str(s)
    with open_dataset(tmp_path / "ds") as ds:
        assert ds.classes == ["0", "10", "2"]


@pytest.mark.parametrize(
    ("how", "dtype", "want"), [("int", np.int64, [0, 10, 2]), ("float", np.float32, [0, 10, 2])]
)
def test_label_from_folder_stores_the_number(
    counts: Path, tmp_path: Path, how: Any, dtype: Any, want: list[int]
) -> None:
    s = pack(counts, tmp_path / "ds", options=PackOptions(label_from_folder=how))
    assert "sorted text order" not in str(s)
    with open_dataset(tmp_path / "ds") as ds:
        assert ds.classes is None and ds.array("label").dtype == dtype
        # rows come folder by folder in sorted order: 0/, 10/, 2/
        np.testing.assert_array_equal(ds.array("label"), want)


def test_label_from_folder_refuses_a_name_that_is_not_a_number(
    counts: Path, tmp_path: Path
) -> None:
    save(counts / "many" / "9.png", rgb(9))
    with pytest.raises(PackError, match="'many' is not one"):
        pack(counts, tmp_path / "ds", options=PackOptions(label_from_folder="int"))
    assert not (tmp_path / "ds").exists()


def test_cli_channels_and_label_from_folder(counts: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    args = ["pack", str(counts), str(out), "-q", "--channels", "1", "--label-from-folder", "int"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    with open_dataset(out) as ds:
        assert ds.fields["image"].shape == (H, W, 1)
        assert sorted(ds.array("label").tolist()) == [0, 2, 10]
    csv = tmp_path / "t.csv"
    csv.write_text("image\nfish/0/0.png\n")
    result = CliRunner().invoke(
        cli, ["pack", str(csv), str(tmp_path / "c"), "--label-from-folder", "int"]
    )
    assert result.exit_code == 1 and "apply to an image folder" in str(result.exception)
