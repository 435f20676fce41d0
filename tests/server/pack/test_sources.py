"""pack/sources.py: folder trees and CSVs read into rows and targets, samples converted.

These call the source readers directly (no decoding, no writer); test_pack.py and
test_newcomer.py pack the same inputs end to end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from packimages import rgb

from batchd_server.errors import ConfigError, PackError
from batchd_server.format import Encoded
from batchd_server.pack.sources import (
    Row,
    check_labels,
    convert_sample,
    is_litter,
    read_csv,
    scan_folder,
    spec_for,
)


def touch(path: Path, data: bytes = b"x") -> Path:
    """A file whose content does not matter: sources never decode what they scan."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def tree(root: Path, files: list[str]) -> Path:
    for f in files:
        touch(root / f)
    return root


# ---------------------------------------------------------------- scan_folder


def test_scan_folder_rows_labels_and_classes(tmp_path: Path) -> None:
    root = tree(tmp_path / "src", ["dog/b.png", "dog/a.png", "cat/z.png", "dog/deep/c.png"])
    got = scan_folder(root)
    assert got.classes == ["cat", "dog"] and got.kind == "folder"
    # Folder by folder in sorted order; files at any depth, sorted by path.
    assert got.rows == [
        Row(root / "cat/z.png", None),
        Row(root / "dog/a.png", None),
        Row(root / "dog/b.png", None),
        Row(root / "dog/deep/c.png", None),
    ]
    assert got.values["label"].dtype == np.int64
    assert got.values["label"].tolist() == [0, 1, 1, 1]
    assert got.extra == {"label_from_folder": "class"} and got.notes == []


def test_scan_folder_ignores_litter_files_and_folders(tmp_path: Path) -> None:
    root = tree(
        tmp_path / "src",
        [
            "cat/0.png",
            "cat/Thumbs.db",
            "cat/desktop.ini",
            "cat/.DS_Store",
            "cat/._0.png",
            "cat/@eaDir/0.png@SynoEAStream",
            "cat/.cache/1.png",
            "@eaDir/2.png",
            ".git/HEAD",
            "readme.txt",  # a file at the top is not a class
        ],
    )
    got = scan_folder(root)
    assert got.classes == ["cat"]
    assert [r.image.relative_to(root).as_posix() for r in got.rows] == ["cat/0.png"]


@pytest.mark.parametrize(
    ("name", "litter"),
    [(".DS_Store", True), ("Thumbs.db", True), ("@eaDir", True), ("thumbs.png", False)],
)
def test_is_litter(name: str, litter: bool) -> None:
    assert is_litter(name) is litter


def test_empty_class_folders_left_out_or_kept(tmp_path: Path) -> None:
    root = tree(tmp_path / "src", ["cat/0.png", "dog/1.png"])
    (root / "ant").mkdir()
    (root / "bee").mkdir()
    left = scan_folder(root)
    assert left.classes == ["cat", "dog"] and left.values["label"].tolist() == [0, 1]
    assert left.notes == [
        "left out 2 empty class folder(s): 'ant', 'bee' "
        "(pass --keep-empty-classes to keep them as classes)"
    ]
    kept = scan_folder(root, keep_empty_classes=True)
    assert kept.classes == ["ant", "bee", "cat", "dog"]
    assert kept.values["label"].tolist() == [2, 3]  # numbered with the empty ones counted
    assert kept.notes == ["2 folder(s) hold no files: 'ant', 'bee'"]


def test_a_folder_of_litter_only_is_empty(tmp_path: Path) -> None:
    root = tree(tmp_path / "src", ["cat/0.png", "dog/.DS_Store"])
    assert scan_folder(root).classes == ["cat"]


@pytest.mark.parametrize(
    ("how", "dtype", "want"),
    [("int", np.int64, [-3, 0, 0, 12]), ("float", np.float32, [-3.0, 0.5, 0.5, 12.0])],
)
def test_label_from_folder_reads_the_name_as_the_number(
    tmp_path: Path, how: Any, dtype: Any, want: list[float]
) -> None:
    names = ["-3", "0.5" if how == "float" else "0", "12"]
    root = tree(tmp_path / "src", [f"{names[0]}/a", f"{names[1]}/a", f"{names[1]}/b", "12/a"])
    got = scan_folder(root, label_from=how)
    assert got.classes is None and got.extra == {"label_from_folder": how}
    assert got.values["label"].dtype == dtype
    # Sorted as text: "-3" < "0..." < "12"; each folder's number repeated per file.
    assert got.values["label"].tolist() == want


def test_label_from_folder_int_keeps_empty_folders_with_a_note(tmp_path: Path) -> None:
    root = tree(tmp_path / "src", ["1/a", "2/a"])
    (root / "3").mkdir()
    got = scan_folder(root, label_from="int")
    assert got.values["label"].tolist() == [1, 2]
    assert got.notes == ["1 folder(s) hold no files: '3'"]


def test_numeric_class_folders_get_a_note_about_text_order(tmp_path: Path) -> None:
    root = tree(tmp_path / "src", ["2/a", "10/a"])
    got = scan_folder(root)
    assert got.classes == ["10", "2"]
    assert len(got.notes) == 1 and "sorted text order ('10', '2')" in got.notes[0]
    assert "--label-from-folder int" in got.notes[0]


@pytest.mark.parametrize(
    ("files", "kw", "error", "match"),
    [
        (["top.png"], {}, PackError, "no class subfolders; an image-folder tree has one"),
        ([], {"label_from": "name"}, ConfigError, "label_from 'name': use class, int or float"),
        (["1/a", "one/a", "two/a"], {"label_from": "int"}, PackError, "'one', 'two' is not one"),
        (["1.5/a"], {"label_from": "int"}, PackError, "--label-from-folder int reads each"),
        (["9" * 30 + "/a"], {"label_from": "int"}, PackError, "does not fit in int64"),
    ],
)
def test_scan_folder_refusals(
    tmp_path: Path, files: list[str], kw: dict[str, Any], error: type[Exception], match: str
) -> None:
    root = tree(tmp_path / "src", files)
    root.mkdir(exist_ok=True)
    with pytest.raises(error, match=match):
        scan_folder(root, **kw)


def test_class_folders_without_files_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "a").mkdir(parents=True)
    (root / "b" / "deeper").mkdir(parents=True)
    with pytest.raises(PackError, match=r"the class folders \['a', 'b'\] hold no files"):
        scan_folder(root, keep_empty_classes=True)


# ---------------------------------------------------------------- read_csv


def csv_file(tmp_path: Path, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / "set" / "labels.csv"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def test_read_csv_rows_targets_and_mask(tmp_path: Path) -> None:
    path = csv_file(
        tmp_path,
        "path , seg,count,score\n"
        "img/a.png,m/a.png,3,0.5\n"
        "\n"  # blank lines are skipped, and later lines keep their numbers
        " img/b.png , m/b.png ,-1,2\n",
    )
    got = read_csv(path, "seg")
    base = path.parent
    assert got.rows == [
        Row(base / "img/a.png", base / "m/a.png", "line 2"),
        Row(base / "img/b.png", base / "m/b.png", "line 4"),
    ]
    assert got.rows[1].name() == f"{base / 'img/b.png'} (line 4)"
    assert list(got.values) == ["count", "score"]
    assert got.values["count"].dtype == np.int64 and got.values["count"].tolist() == [3, -1]
    assert got.values["score"].dtype == np.float32 and got.values["score"].tolist() == [0.5, 2.0]
    assert got.kind == "csv" and got.classes is None
    assert got.extra == {"path_column": "path", "mask_column": "seg", "targets": ["count", "score"]}


def test_read_csv_without_mask_and_with_a_bom(tmp_path: Path) -> None:
    path = csv_file(tmp_path, "filename,y\nimg/a.png,1e3\n", encoding="utf-8-sig")
    got = read_csv(path, None)
    assert got.rows == [Row(path.parent / "img/a.png", None, "line 2")]
    assert got.values["y"].dtype == np.float32 and got.values["y"].tolist() == [1000.0]
    assert got.extra["path_column"] == "filename"


def test_an_int_too_big_for_int64_is_read_as_float(tmp_path: Path) -> None:
    got = read_csv(csv_file(tmp_path, "image,big\na,1\nb,99999999999999999999\n"), None)
    assert got.values["big"].dtype == np.float32
    assert got.values["big"].tolist() == [1.0, np.float32(1e20)]


@pytest.mark.parametrize(
    ("text", "mask", "match"),
    [
        ("image,y\na.png,1\nb.png,1\nc.png,two\n", None, r"line 4: column 'y' holds 'two'"),
        ("image,y\n\n\na.png, \n", None, r"line 4: column 'y' holds '', not a number"),
        ("image,y\na.png,1\nb.png\n", None, "line 3: 1 cells, the header has 2"),
        ('image,y\n"a\nb.png",x\nc.png,1\n', None, r"line 2: column 'y' holds 'x'"),
        ('image,y\n"a\nb.png",1\nc.png\n', None, "line 4: 1 cells, the header has 2"),
        ("image,m\na.png,m.png\n,m.png\n", "m", "line 3: empty 'image' cell"),
        ("image,m\na.png,\n", "m", "line 2: empty mask cell in 'm'"),
        ("image,y\n", None, "a header but no rows"),
        ("\n\n", None, "empty; a CSV needs a header row"),
        ("Image,y\na.png,1\n", None, r"no image path column; name one of \['image', 'path'"),
        ("image,Index\na.png,1\n", None, "'Index' clashes with a field batchd names itself"),
    ],
)
def test_read_csv_refusals_name_the_line(
    tmp_path: Path, text: str, mask: str | None, match: str
) -> None:
    path = csv_file(tmp_path, text)
    with pytest.raises(PackError, match=match) as info:
        read_csv(path, mask)
    assert str(info.value).startswith(str(path))


def test_read_csv_refuses_what_is_not_utf8_text(tmp_path: Path) -> None:
    path = csv_file(tmp_path, "image,y\ncaf\xe9.png,1\n", encoding="latin-1")
    with pytest.raises(PackError, match=r"not UTF-8 text \(invalid continuation byte at byte"):
        read_csv(path, None)


# ---------------------------------------------------------------- convert_sample


def png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


FIELDS = [
    spec_for("image", np.dtype("u1"), None, None),
    spec_for("seg", np.dtype("u1"), None, "mask"),
    spec_for("y", np.dtype("<f4"), (2,), None),
]
IMAGES = {"image": png(rgb(0, 5, 7)), "seg": png(np.zeros((5, 7), np.uint8))}


def test_spec_for_picks_the_role_and_encoding() -> None:
    image, seg, y = FIELDS
    assert (image.role, image.encoding, image.channels) == ("image", "image", 3)
    assert (seg.role, seg.encoding, seg.channels) == ("mask", "image", 1)
    assert (y.role, y.encoding, y.channels) == ("value", "raw", None)
    raw = spec_for("image", np.dtype("u1"), (4, 4, 1), None)
    assert (raw.role, raw.channels) == ("image", 1)
    with pytest.raises(PackError, match="field 'mask': a raw mask is uint8 HxW"):
        spec_for("mask", np.dtype("<f4"), (4, 4), "mask")


def test_convert_sample_decodes_sizes_and_casts() -> None:
    got = convert_sample(3, {**IMAGES, "y": [1, 2]}, FIELDS)
    assert isinstance(got, dict)
    assert got["image"] == Encoded(IMAGES["image"], 5, 7)
    assert got["seg"] == Encoded(IMAGES["seg"], 5, 7)
    assert got["y"].dtype == np.float32 and got["y"].tolist() == [1.0, 2.0]


def test_convert_sample_returns_a_reason_for_an_image_that_does_not_decode() -> None:
    got = convert_sample(0, {**IMAGES, "image": b"not a png", "y": [0, 0]}, FIELDS)
    assert got == "field 'image': the bytes are not a decodable image"
    colour = png(rgb(1, 5, 7))
    got = convert_sample(0, {"image": colour, "seg": colour, "y": [0, 0]}, FIELDS)
    assert got == "field 'seg': the bytes are not a decodable single-channel 8-bit mask"


@pytest.mark.parametrize(
    ("sample", "match"),
    [
        ({"image": b"x", "y": [0, 0]}, r"sample 7 has fields \['image', 'y'\], the first sample"),
        (
            {"image": "a.png", "seg": b"x", "y": [0, 0]},
            "field 'image': expected image bytes, got str",
        ),
        (
            {**IMAGES, "y": [0, 0, 0]},
            r"field 'y': shape \(3,\), the first .*\(2,\)",
        ),
        ({**IMAGES, "y": ["a", "b"]}, "field 'y': <U1 does not cast to float32"),
        ({**IMAGES, "y": [1 + 1j, 0]}, "complex128 does not cast to float32"),
    ],
)
def test_convert_sample_refuses_a_malformed_sample(sample: dict[str, Any], match: str) -> None:
    with pytest.raises(PackError, match=match):
        convert_sample(7, sample, FIELDS)


def test_convert_sample_refuses_a_float_for_an_int_field() -> None:
    fields = [spec_for("n", np.dtype("<i8"), (), None)]
    assert convert_sample(0, {"n": np.int32(4)}, fields) == {"n": np.int64(4)}
    with pytest.raises(PackError, match="sample 0 field 'n': float64 does not cast to int64"):
        convert_sample(0, {"n": 4.5}, fields)


# ---------------------------------------------------------------- check_labels


def test_check_labels_passes_labels_in_range() -> None:
    check_labels(np.array([0, 1, 2, 2, 0]), 3, 0)
    check_labels(np.array([], np.int64), 3, 0)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ([0, 3, 5], "label of sample 101 is 3, outside 0..2 for 3 classes"),
        ([0, 1, -1], "label of sample 102 is -1, outside 0..2"),
    ],
)
def test_check_labels_names_the_first_bad_sample(labels: list[int], match: str) -> None:
    with pytest.raises(PackError, match=match):
        check_labels(np.array(labels), 3, 100)
