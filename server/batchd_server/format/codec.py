"""Image codecs: JPEG/PNG/WebP bytes to pixels, for the packer and for encoded fields.

JPEGs are decoded by simplejpeg (libjpeg-turbo, straight to RGB or grey): on this
project's benchmark images it decodes about 1.4-2x as fast as OpenCV, which decodes
to BGR and needs a conversion after. Both use libjpeg-turbo's accurate integer DCT
and smooth chroma upsampling, so they give the same pixels (tests/server/format/
test_codec.py pins it on baseline, progressive and grey JPEGs). OpenCV decodes
everything else (PNG, WebP, masks) and the JPEGs simplejpeg refuses (CMYK, or damage
OpenCV tolerates). :data:`DECODERS` names the versions, as the status reports them.
``BATCHD_JPEG_DECODER=opencv`` in the environment leaves simplejpeg out.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray

__all__ = ["DECODERS", "decode_image"]

_JPEG_SOI = b"\xff\xd8"

#: ``BATCHD_JPEG_DECODER=opencv`` makes OpenCV decode JPEGs too (the same pixels, slower):
#: for side-by-side benchmarks, or a machine where simplejpeg misbehaves.
JPEG_DECODER_ENV = "BATCHD_JPEG_DECODER"

_simplejpeg: Any = None
if os.environ.get(JPEG_DECODER_ENV, "simplejpeg").lower() != "opencv":
    with contextlib.suppress(ImportError):  # without it OpenCV decodes JPEGs, to the same pixels
        import simplejpeg

        _simplejpeg = simplejpeg


def _versions() -> dict[str, str]:
    out = {"jpeg": "opencv", "other": "opencv"}
    if _simplejpeg is not None:
        out["jpeg"] = f"simplejpeg {_simplejpeg.__version__}"
    return out


#: Which library decodes JPEGs and which decodes other formats (names and versions).
DECODERS = _versions()


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
    arr = np.frombuffer(buf, np.uint8)
    if arr.size == 0:
        return None
    if not mask and _simplejpeg is not None and arr[:2].tobytes() == _JPEG_SOI:
        try:
            img = _simplejpeg.decode_jpeg(arr, colorspace="GRAY" if channels == 1 else "RGB")
        except ValueError:
            pass  # CMYK, or damage OpenCV may still read: OpenCV decides below
        else:
            return cast("NDArray[np.uint8]", img[:, :, 0] if channels == 1 else img)
    import cv2

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
