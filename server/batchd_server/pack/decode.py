"""Packing's decoding: images read and decoded in blocks, and brought to one size.

Images are decoded in a thread pool (OpenCV releases the GIL), in blocks; the
packer writes each block in input order as it completes. ``_fit`` applies the
resize policy (resize, center-crop, letterbox); masks are resampled nearest-neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from numpy.typing import NDArray

from ..errors import PackError
from ..format import Encoded, decode_image
from .sources import Row

__all__: list[str] = []

Mode = Literal["raw", "encoded"]
Policy = Literal["resize", "center-crop", "letterbox"]


@dataclass
class Block:
    """A decoded block: ``ok[j]`` False means row j failed with ``errors[j]``."""

    ok: NDArray[np.bool_]
    errors: dict[int, str]
    images: Any  # raw: ndarray (k, H, W, C); encoded: list[Encoded | None]
    masks: Any = None
    mismatch: int | None = None
    """The first row whose size differs from the first image's: not a bad file but a
    property of the source (``--size`` fixes it, skipping does not)."""


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _load(src: Path | bytes, channels: int, *, mask: bool) -> tuple[bytes, NDArray[np.uint8]]:
    """Read (a path) and decode one image; ValueError with the reason if it is not usable."""
    if isinstance(src, bytes):
        buf = src
    else:
        try:
            buf = _read(src)
        except OSError as exc:
            raise ValueError(f"cannot read: {exc.strerror}") from None
    if not buf:
        raise ValueError("empty file")
    # libjpeg decodes a truncated JPEG with a warning and grey fill; a missing EOI marker says so.
    if buf[:2] == b"\xff\xd8" and buf.rfind(b"\xff\xd9") < 0:
        raise ValueError("truncated JPEG (no end-of-image marker)")
    img = decode_image(buf, channels, mask=mask)
    if img is None:
        kind = "a single-channel 8-bit image (a mask)" if mask else "an image"
        raise ValueError(
            f"not {kind} that OpenCV can decode (corrupt, truncated or another format)"
        )
    return buf, img


def _named(src: Path | bytes) -> str:
    return "the mask" if isinstance(src, bytes) else f"mask {src}"


def _fit(
    img: NDArray[np.uint8], hw: tuple[int, int], policy: Policy, nearest: bool
) -> NDArray[np.uint8]:
    """Bring an image to (height, width); masks use nearest-neighbour so labels stay labels."""
    import cv2

    h, w = hw
    ih, iw = img.shape[:2]
    if (ih, iw) == (h, w):
        return img
    if policy == "resize":
        sh, sw = h, w
    else:
        s = max(h / ih, w / iw) if policy == "center-crop" else min(h / ih, w / iw)
        sh, sw = max(1, round(ih * s)), max(1, round(iw * s))
        if policy == "center-crop":
            sh, sw = max(sh, h), max(sw, w)
        else:
            sh, sw = min(sh, h), min(sw, w)
    interp = (
        cv2.INTER_NEAREST
        if nearest
        else (cv2.INTER_AREA if sh < ih or sw < iw else cv2.INTER_LINEAR)
    )
    r = cv2.resize(img, (sw, sh), interpolation=interp)
    if policy == "resize":
        return cast("NDArray[np.uint8]", r)
    if policy == "center-crop":
        y, x = (sh - h) // 2, (sw - w) // 2
        return cast("NDArray[np.uint8]", r[y : y + h, x : x + w])
    out = np.zeros((h, w, *img.shape[2:]), np.uint8)
    y, x = (h - sh) // 2, (w - sw) // 2
    out[y : y + sh, x : x + sw] = r
    return out


@dataclass(frozen=True)
class Job:
    mode: Mode
    size: tuple[int, int] | None
    fixed_by_first: bool  # size came from the first image, not --size: refuse other sizes
    policy: Policy
    masks: bool
    channels: int = 3  # of the image: 3 RGB, 1 grey


def decode_block(rows: Sequence[Row], job: Job) -> Block:
    k = len(rows)
    ok = np.ones(k, bool)
    errors: dict[int, str] = {}
    if job.mode == "raw":
        assert job.size is not None
        h, w = job.size
        images: Any = np.empty((k, h, w, job.channels), np.uint8)
        masks: Any = np.empty((k, h, w), np.uint8) if job.masks else None
    else:
        images = [None] * k
        masks = [None] * k if job.masks else None
    mismatch = None
    for j, row in enumerate(rows):
        try:
            buf, img = _load(row.image, job.channels, mask=False)
            mbuf, mimg = None, None
            if row.mask is not None:
                try:
                    mbuf, mimg = _load(row.mask, 1, mask=True)
                except ValueError as exc:
                    raise ValueError(f"{_named(row.mask)}: {exc}") from None
                if mimg.shape != img.shape[:2]:
                    raise ValueError(
                        f"{_named(row.mask)} is {mimg.shape[0]}x{mimg.shape[1]}, the image "
                        f"{img.shape[0]}x{img.shape[1]}; a mask must match its image's size"
                    )
            if job.mode == "encoded":
                images[j] = Encoded(buf, img.shape[0], img.shape[1])
                if mbuf is not None and mimg is not None:
                    masks[j] = Encoded(mbuf, mimg.shape[0], mimg.shape[1])
                continue
            assert job.size is not None
            if job.fixed_by_first and img.shape[:2] != job.size:
                mismatch = j if mismatch is None else mismatch
                raise ValueError(
                    f"is {img.shape[0]}x{img.shape[1]}, "
                    f"the first image {job.size[0]}x{job.size[1]}; "
                    "the images differ in size: pass --size HxW (and --resize-policy) to bring "
                    "them all to one size, or --mode encoded to keep each image's own"
                )
            images[j] = _fit(img, job.size, job.policy, nearest=False).reshape(images.shape[1:])
            if mimg is not None:
                masks[j] = _fit(mimg, job.size, job.policy, nearest=True)
        except ValueError as exc:
            ok[j] = False
            errors[j] = str(exc)
    return Block(ok, errors, images, masks, mismatch)


def probe_size(rows: Sequence[Row], channels: int) -> tuple[int, int]:
    first = None
    for row in rows:
        try:
            img = _load(row.image, channels, mask=False)[1]
            return (img.shape[0], img.shape[1])
        except ValueError as exc:
            first = first or f"{row.name()}: {exc}"
    raise PackError(f"none of the {len(rows)} images decodes; the first: {first}")
