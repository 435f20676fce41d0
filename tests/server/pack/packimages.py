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
