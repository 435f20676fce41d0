"""Writing one augmented sample into its batch row: the last step of every pipeline path.

Both paths of :class:`~batchd_server.augment.pipeline.Pipeline` (the general one and
the crop/flip windows) end the same way: value fields are checked and copied, and each
image or mask is written into the batch buffer with its pending flip folded into the
copy, or normalised to float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from ..errors import PipelineError

__all__ = ["Norm", "normalize_into", "put_values", "write_row"]

Array = NDArray[Any]
#: A normalisation: a uint8 lookup table (or None), and the float scale and offset.
Norm = tuple[Array | None, Array, Array]


def put_values(
    values: Sequence[tuple[str, tuple[int, ...], Array]],
    sample: Mapping[str, Any],
    r: int,
    sid: int,
) -> None:
    """Copy sample ``sid``'s value fields into row ``r`` of their buffers, checking shapes."""
    for name, shape, buf in values:
        value = sample[name]
        if np.shape(value) != shape:
            raise PipelineError(
                f"sample {sid}: field {name!r} has shape {np.shape(value)}, expected {shape}"
            )
        buf[r] = value  # setitem: 10x cheaper than copyto for a scalar label


def write_row(
    src: Array, dst: Array, shape: tuple[int, ...], norm: Norm | None, code: int | None
) -> None:
    """``src`` into the batch row ``dst`` (both seen as ``shape``), flipped by ``code``.

    ``code`` is OpenCV's flip code (None: no flip); the flip happens during the copy.
    """
    if dst.shape != shape:  # a trailing channel axis of 1, dropped for OpenCV
        dst = np.reshape(dst, shape, copy=False)
    if src.shape != shape:
        src = src.reshape(shape)
    if norm is not None:
        normalize_into(src, dst, norm, code)
    elif code is None:
        np.copyto(dst, src)
    elif cv2.flip(src, code, dst=dst) is not dst:
        raise AssertionError("cv2.flip did not write into the batch buffer")


def normalize_into(src: Array, dst: Array, norm: Norm, code: int | None) -> None:
    """Write normalised ``src`` (with the pending flip) into the float32 ``dst``."""
    table, scale, offset = norm
    if table is not None:
        # uint8: a per-channel float32 lookup table is ~7x faster than numpy's cast+multiply.
        cv2.LUT(src, table, dst=dst)
        if code is not None:
            cv2.flip(dst, code, dst=dst)
        return
    if code is not None:
        src = cv2.flip(src, code)
    np.multiply(src, scale if src.ndim == 3 else scale[0], out=dst)
    np.subtract(dst, offset if src.ndim == 3 else offset[0], out=dst)
