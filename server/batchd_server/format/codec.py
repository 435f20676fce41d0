"""Image codecs: JPEG/PNG bytes to pixels, for the packer and for encoded fields at serve time."""

from __future__ import annotations

from typing import cast

import numpy as np
from numpy.typing import NDArray

__all__ = ["decode_image"]


def decode_image(
    buf: bytes | bytearray | memoryview | NDArray[np.uint8], channels: int
) -> NDArray[np.uint8] | None:
    """Decode JPEG/PNG bytes to RGB HxWx3 (channels=3) or single-channel uint8 HxW (1).

    Returns None if the bytes are not an image of that kind (a mask must be 8-bit
    single-channel). The caller knows the file and says so in its error.
    """
    import cv2

    arr = np.frombuffer(buf, np.uint8)
    if arr.size == 0:
        return None
    if channels == 3:
        img = cv2.imdecode(arr, cv2.IMREAD_COLOR)
        if img is None:
            return None
        return cast("NDArray[np.uint8]", cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    img = cv2.imdecode(arr, cv2.IMREAD_UNCHANGED)
    if img is None or img.ndim != 2 or img.dtype != np.uint8:
        return None
    return cast("NDArray[np.uint8]", img)
