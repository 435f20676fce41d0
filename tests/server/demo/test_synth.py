"""Synthetic scenes: deterministic, masks exactly where the shapes are, CSV as documented."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from batchd_server.demo.synth import CLASSES, make_scenes, render_scene, shape_mask


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_same_seed_same_bytes_whatever_the_thread_count(tmp_path: Path) -> None:
    a = make_scenes(tmp_path / "a", 24, size=(64, 64), seed=7, workers=1)
    b = make_scenes(tmp_path / "b", 24, size=(64, 64), seed=7, workers=3)
    files_a, files_b = _tree_bytes(a.root), _tree_bytes(b.root)
    assert len(files_a) == 2 * 24 + 1
    assert files_a == files_b


def test_another_seed_other_scenes(tmp_path: Path) -> None:
    a = _tree_bytes(make_scenes(tmp_path / "a", 8, size=(64, 64), seed=0).root)
    b = _tree_bytes(make_scenes(tmp_path / "b", 8, size=(64, 64), seed=1).root)
    differing = [name for name in a if name.endswith(".png") and a[name] != b.get(name)]
    assert len(differing) >= 7


def test_a_scene_does_not_depend_on_n(tmp_path: Path) -> None:
    small = make_scenes(tmp_path / "small", 5, size=(64, 64))
    large = make_scenes(tmp_path / "large", 12, size=(64, 64))
    rows = _rows(small.csv)
    assert rows == _rows(large.csv)[:5]
    for row in rows:
        assert (small.root / row["image"]).read_bytes() == (large.root / row["image"]).read_bytes()


@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_mask_is_exactly_the_shapes(size: tuple[int, int]) -> None:
    for index in range(40):
        scene = render_scene(index, size=size, seed=3)
        assert scene.image.shape == (*size, 3)
        assert scene.mask.shape == size
        covered = np.zeros(size, bool)
        for shape in scene.shapes:
            footprint = shape_mask(shape, size)
            assert footprint.sum() > 20, f"scene {index}: {CLASSES[shape.cls]} draws almost nothing"
            # every pixel of the shape carries its class, none was painted over
            assert (scene.mask[footprint] == 1 + shape.cls).all(), f"scene {index}"
            assert not (covered & footprint).any(), f"scene {index}: shapes overlap"
            covered |= footprint
        assert (scene.mask[~covered] == 0).all(), f"scene {index}: mask pixels outside every shape"


def test_main_shape_is_the_label_and_the_largest() -> None:
    for index in range(40):
        scene = render_scene(index, size=(128, 128))
        assert 1 <= scene.count <= 4
        assert scene.label == index % len(CLASSES)
        main, *others = scene.shapes
        assert all(main.radius > s.radius for s in others)


def test_shapes_differ_between_classes() -> None:
    # the label must be learnable from the shape: same centre and radius, different pixels
    from batchd_server.demo.synth import Shape

    masks = [
        shape_mask(Shape(cls=k, cx=32, cy=32, radius=20, angle=0.3), (64, 64))
        for k in range(len(CLASSES))
    ]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert (masks[i] ^ masks[j]).sum() > 100, (CLASSES[i], CLASSES[j])


def test_files_and_csv(tmp_path: Path) -> None:
    info = make_scenes(tmp_path / "out", 40, size=(64, 64), seed=5)
    assert info.csv == tmp_path / "out" / "scenes.csv"
    with info.csv.open(newline="") as f:
        header = next(csv.reader(f))
    assert header == ["image", "mask", "count", "label"]
    rows = _rows(info.csv)
    assert len(rows) == 40
    for i, row in enumerate(rows):
        label, count = int(row["label"]), int(row["count"])
        assert row["image"] == f"images/{CLASSES[label]}/{i:06d}.jpg"
        assert row["mask"] == f"masks/{i:06d}.png"
        image = cv2.imread(str(info.root / row["image"]), cv2.IMREAD_COLOR)
        mask = cv2.imread(str(info.root / row["mask"]), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.shape == (64, 64, 3)
        assert mask is not None and mask.dtype == np.uint8 and mask.shape == (64, 64)
        # the PNG is lossless: it is the rendered mask, byte for byte
        assert np.array_equal(mask, render_scene(i, size=(64, 64), seed=5).mask)
        # count is what a reader of the files would count: one blob per shape
        blobs, _ = cv2.connectedComponents((mask > 0).astype(np.uint8), connectivity=8)
        assert blobs - 1 == count, f"row {i}"
        assert 1 + label in np.unique(mask)
        assert set(np.unique(mask)) <= set(range(1 + len(CLASSES)))


def test_classes_are_balanced_and_counts_vary(tmp_path: Path) -> None:
    info = make_scenes(tmp_path, 203, size=(64, 64))
    assert info.classes == CLASSES
    assert sum(info.class_counts) == 203
    assert max(info.class_counts) - min(info.class_counts) <= 1
    rows = _rows(info.csv)
    assert [int(r["label"]) for r in rows].count(0) == info.class_counts[0]
    assert {int(r["count"]) for r in rows} == {1, 2, 3, 4}
    for k, name in enumerate(CLASSES):
        assert len(list((tmp_path / "images" / name).glob("*.jpg"))) == info.class_counts[k]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one scene"):
        make_scenes("unused", 0)
    with pytest.raises(ValueError, match="too small"):
        render_scene(0, size=(16, 16))
