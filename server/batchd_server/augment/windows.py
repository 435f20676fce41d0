"""Windows-only pipelines: flips and crops computed for a whole batch at once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .ops import CenterCrop, HFlip, Normalize, Op, RandomCrop, VFlip

__all__ = ["Windows", "windows_only"]


def windows_only(ops: tuple[Op, ...]) -> bool:
    """True when every op is a flip, a centre crop or an unpadded random crop: the whole
    pipeline is then one window + flip per sample, computed for a batch at once."""
    return all(
        isinstance(op, HFlip | VFlip | CenterCrop | Normalize)
        or (isinstance(op, RandomCrop) and op.padding == 0)
        for op in ops
    )


@dataclass
class Windows:
    """Per-row crop windows (in source pixels) and pending flips for a windows-only pipeline.

    The vectorised twin of running ``Sample.crop`` and the flips row by row (a test pins
    them equal): same draws, same integer arithmetic, one numpy pass per op.
    """

    top: NDArray[np.int64]
    left: NDArray[np.int64]
    h: int
    w: int
    hflip: NDArray[np.bool_]
    vflip: NDArray[np.bool_]

    def flip_codes(self) -> NDArray[np.int64]:
        """Per row, the ``cv2.flip`` code of the pending flips: 1 horizontal, 0 vertical,
        -1 both, and 2 for none (not an OpenCV code: callers copy instead)."""
        return np.select(
            [self.hflip & self.vflip, self.hflip, self.vflip], [-1, 1, 0], default=2
        ).astype(np.int64)

    @classmethod
    def compute(
        cls,
        ops: tuple[Op, ...],
        hw: tuple[int, int],
        draws: list[NDArray[np.float64] | None],
        n: int,
    ) -> Windows:
        H, W = hw
        win = cls(
            np.zeros(n, np.int64), np.zeros(n, np.int64), H, W, np.zeros(n, bool), np.zeros(n, bool)
        )
        for op, u in zip(ops, draws, strict=True):
            if isinstance(op, HFlip | VFlip):
                assert u is not None
                flags = win.hflip if isinstance(op, HFlip) else win.vflip
                flags ^= u[:, 0] < op.p
            elif isinstance(op, CenterCrop | RandomCrop):
                h, w = op.size
                if h > win.h or w > win.w:
                    raise op.error(f"size {h}x{w} is larger than the {win.h}x{win.w} input", "size")
                if isinstance(op, CenterCrop):
                    top = np.full(n, (win.h - h) // 2, np.int64)
                    left = np.full(n, (win.w - w) // 2, np.int64)
                else:
                    assert u is not None
                    top = np.minimum((u[:, 0] * (win.h - h + 1)).astype(np.int64), win.h - h)
                    left = np.minimum((u[:, 1] * (win.w - w + 1)).astype(np.int64), win.w - w)
                win.top += np.where(win.vflip, win.h - top - h, top)
                win.left += np.where(win.hflip, win.w - left - w, left)
                win.h, win.w = h, w
        return win
