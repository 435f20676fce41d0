"""One sample's geometric fields on their way through the augmentation ops.

How a sample moves through the ops (``Sample``)
------------------------------------------------
Image and mask fields ("geometric" fields) share one geometry: every geometric op
applies the same parameters to all of them (images bilinear, masks nearest-neighbour).
Flips are never executed in the middle of a pipeline: they are kept as pending flags
and crops, resizes and rotations are mapped into the unflipped frame (a crop window is
mirrored, a rotation angle negated), which gives the same result. The pending flip is
done once, at the end, by ``cv2.flip(src, code, dst=out_row)``; crops are views of the
source. So ``random_crop`` + ``hflip`` costs one copy per image, from the memmap
straight into the response buffer. Arrays taken from the source are never written to:
an op that writes in place (``cutout``) copies first.

Channel conventions: arrays are HWC (or HW). Internally a trailing channel axis of 1
is dropped (OpenCV returns HW for one channel) and restored by writing into a reshaped
view of the output row. Colour ops assume RGB order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import PipelineError

__all__: list[str] = []

Array = NDArray[Any]


class Sample:
    """One sample's geometric fields in flight, with the pending flips (see module doc)."""

    __slots__ = ("arrays", "h", "hflip", "images", "masks", "owned", "sid", "vflip", "w")

    def __init__(
        self, sid: int, arrays: dict[str, Array], images: tuple[str, ...], masks: tuple[str, ...]
    ) -> None:
        self.sid = sid
        self.arrays = arrays
        shape = next(iter(arrays.values())).shape if arrays else (0, 0)
        self.h = int(shape[0])  # current height and width, shared by all geometric fields
        self.w = int(shape[1])
        self.images = images
        self.masks = masks
        self.owned: set[str] = set()  # names whose array we allocated (may write in place)
        self.hflip = False
        self.vflip = False

    def hw(self) -> tuple[int, int]:
        return self.h, self.w

    def flip_code(self) -> int | None:
        if self.hflip:
            return -1 if self.vflip else 1
        return 0 if self.vflip else None

    def crop(self, top: int, left: int, h: int, w: int) -> None:
        """Crop the logical (flipped) image to rows top..top+h, cols left..left+w; zero outside."""
        H, W = self.h, self.w
        self.h, self.w = h, w
        if self.vflip:
            top = H - top - h
        if self.hflip:
            left = W - left - w
        if top >= 0 and left >= 0 and top + h <= H and left + w <= W:
            for name, arr in self.arrays.items():
                self.arrays[name] = arr[top : top + h, left : left + w]
            return
        y0, y1 = max(top, 0), min(top + h, H)
        x0, x1 = max(left, 0), min(left + w, W)
        for name, arr in self.arrays.items():
            padded = np.zeros((h, w, *arr.shape[2:]), dtype=arr.dtype)
            if y0 < y1 and x0 < x1:
                padded[y0 - top : y1 - top, x0 - left : x1 - left] = arr[y0:y1, x0:x1]
            self.arrays[name] = padded
            self.owned.add(name)

    def too_small(self, index: int, op: str, h: int, w: int, extra: str = "") -> PipelineError:
        H, W = self.hw()
        return PipelineError(
            f"op {index} ({op}): sample {self.sid} is {H}x{W}{extra}, smaller than the crop "
            f"{h}x{w}; put a resize before it or use random_resized_crop",
            op_index=index,
            param="size",
        )
