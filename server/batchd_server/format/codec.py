"""Image codecs: JPEG/PNG bytes to pixels, for the packer and for encoded fields at serve time."""

from __future__ import annotations

from typing import cast

import numpy as np
from numpy.typing import NDArray

__all__ = ["decode_image"]


def decode_image(
    buf: bytes | bytearray | memoryview | NDArray[np.uint8], channels: int, *, mask: bool
) -> NDArray[np.uint8] | None:
    """Decode JPEG/PNG/WebP bytes to RGB ``HxWx3`` (``channels=3``) or ``HxW`` (1).

    A mask (``mask=True``) must already be 8-bit single-channel: its values are labels,
    and converting colour to grey would invent new ones. A grey image (``channels=1``)
    is converted from whatever the file holds, as a colour image is to RGB.
    Returns None if the bytes are not an image of that kind; the caller knows the file
    and says so in its error.
    """
    import cv2

    arr = np.frombuffer(buf, np.uint8)
    if arr.size == 0:
        return None
    if mask:
        img = cv2.imdecode(arr, cv2.IMREAD_UNCHANGED)
        if img is None or img.ndim != 2 or img.dtype != np.uint8:
            return None
        return cast("NDArray[np.uint8]", img)
    if channels == 1:
        return cast("NDArray[np.uint8] | None", cv2.imdecode(arr, cv2.IMREAD_GRAYSCALE))
    img = cv2.imdecode(arr, cv2.IMREAD_COLOR)
    if img is None:
        return None
    return cast("NDArray[np.uint8]", cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
