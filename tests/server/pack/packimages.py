"""Small images for the packing tests: a seeded RGB array, written as a real file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

H, W = 12, 16


def rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path: Path, img: np.ndarray) -> Path:
    """Write an RGB (or gray) image; OpenCV wants BGR."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img[..., ::-1] if img.ndim == 3 else img)
    return path


# --------------------------------------------------------------------------- other formats

N = 6
LABELS = np.array([0, 0, 0, 1, 1, 1], np.int64)  # image k's class: cat for 0-2, dog for 3-5


def png(k: int) -> bytes:
    """Image k, rgb(k), as PNG bytes (lossless: decodes to exactly rgb(k))."""
    ok, buf = cv2.imencode(".png", rgb(k)[..., ::-1])
    assert ok
    return bytes(buf)


def reference_pack(tmp_path: Path) -> Path:
    """The six images packed from a folder: what every other format must reproduce."""
    from batchd_server import PackOptions, pack

    for k in range(N):
        save(tmp_path / "src" / ("cat" if k < 3 else "dog") / f"{k}.png", rgb(k))
    pack(tmp_path / "src", tmp_path / "ref", options=PackOptions(progress=False))
    return tmp_path / "ref"


def same_as(ref: Path, got: Path, image: str = "image", label: str = "label") -> None:
    """``got`` holds the reference pack's pixels and labels, in its order."""
    from batchd_server import open_dataset

    with open_dataset(ref) as a, open_dataset(got) as b:
        assert b.count == a.count
        if b.fields[image].encoding == "image":
            for k in range(b.count):
                np.testing.assert_array_equal(b.image(image, k), a.array("image")[k])
        else:
            np.testing.assert_array_equal(b.array(image), a.array("image"))
        np.testing.assert_array_equal(b.array(label), a.array("label"))
        assert b.fields[image].role == "image"


def nothing_left(parent: Path, name: str) -> None:
    """No ``name`` and no temp directory of it: a failed pack leaves nothing behind."""
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp")]
