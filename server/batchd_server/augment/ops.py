"""The augmentation ops: their parameters and their OpenCV implementations.

Each op is a frozen dataclass built by :func:`parse_op` from one JSON object
``{"op": name, **params}``; :mod:`batchd_server.augment` chains them into a pipeline.

How a sample moves through the ops, the pending flips and the channel conventions
are described in :mod:`batchd_server.sample`; the parameter validators are in
:mod:`batchd_server.validators`, the batch-at-once path for flip-and-crop pipelines
in :mod:`batchd_server.windows`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import cv2
import numpy as np
from numpy.typing import NDArray

from ..errors import PipelineError
from .sample import Sample
from .validators import REQUIRED, Bad, Validator, float_in, int_in, per_channel, range_in, size_pair

__all__ = ["OPS", "Op", "parse_op"]

Array = NDArray[Any]

#: dtypes OpenCV resamples bilinearly (images under resize, rotate, random_resized_crop).
LINEAR_DTYPES = frozenset(np.dtype(t) for t in ("u1", "u2", "i2", "f4", "f8"))
#: dtypes OpenCV cannot warp even with nearest-neighbour (masks under rotate).
NO_WARP_DTYPES = frozenset(np.dtype(t) for t in ("?", "f2"))


# --- the ops -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Op:
    """Base of every op. ``index`` is its position in the pipeline (its random stream)."""

    name: ClassVar[str] = ""
    #: Uniform draws per sample this op consumes (always all of them, used or not).
    draws: ClassVar[int] = 0
    #: Changes geometry (applies to images and masks alike).
    geometric: ClassVar[bool] = False
    #: Needs uint8 images (a 256-entry lookup table or cv2 colour maths).
    uint8_only: ClassVar[bool] = False
    #: Resamples with bilinear interpolation (image dtypes limited to LINEAR_DTYPES).
    resamples: ClassVar[bool] = False
    spec: ClassVar[dict[str, tuple[Any, Validator]]] = {}

    index: int

    def params(self) -> dict[str, Any]:
        """Parameters with defaults filled, JSON-ready (lists, not tuples)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "index":
                continue
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def out_size(self, hw: tuple[int, int] | None) -> tuple[int, int] | None:
        """Height and width after this op (None: not known before the data is seen)."""
        return hw

    def apply(self, s: Sample, u: list[float]) -> None:
        raise NotImplementedError

    def error(self, message: str, param: str | None = None) -> PipelineError:
        return PipelineError(
            f"op {self.index} ({self.name}): {message}", op_index=self.index, param=param
        )


def _pick(u: float, n: int) -> int:
    """floor(u * n) for u in [0, 1), clamped: u * n can round up to n in float64."""
    return min(int(u * n), n - 1)


def _interp(s: Sample, name: str) -> int:
    return cv2.INTER_NEAREST if name in s.masks else cv2.INTER_LINEAR


def _resize(s: Sample, h: int, w: int) -> None:
    s.h, s.w = h, w
    for name, arr in s.arrays.items():
        # resize's INTER_NEAREST samples pixel corners, INTER_LINEAR pixel centres: half a
        # pixel apart. INTER_NEAREST_EXACT samples centres, so the mask stays on the image.
        interp = cv2.INTER_NEAREST_EXACT if name in s.masks else cv2.INTER_LINEAR
        s.arrays[name] = cv2.resize(arr, (w, h), interpolation=interp)
        s.owned.add(name)


@dataclass(frozen=True, kw_only=True)
class RandomResizedCrop(Op):
    """torchvision's RandomResizedCrop: area fraction in ``scale``, log-uniform aspect in
    ``ratio``, 10 tries then a centre crop with the ratio clamped; resized to ``size``."""

    name: ClassVar[str] = "random_resized_crop"
    draws: ClassVar[int] = 40
    geometric: ClassVar[bool] = True
    resamples: ClassVar[bool] = True
    spec: ClassVar[dict[str, tuple[Any, Validator]]] = {
        "size": (REQUIRED, size_pair),
        "scale": ((0.08, 1.0), range_in(0.0, 1.0, lo_open=True)),
        "ratio": ((3 / 4, 4 / 3), range_in(0.0, 100.0, lo_open=True)),
    }
    size: tuple[int, int]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def out_size(self, hw: tuple[int, int] | None) -> tuple[int, int]:
        return self.size

    def window(self, H: int, W: int, u: list[float]) -> tuple[int, int, int, int]:
        area = H * W
        lo, hi = self.scale
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for a in range(0, 40, 4):
            target = area * (lo + u[a] * (hi - lo))
            aspect = math.exp(log_lo + u[a + 1] * (log_hi - log_lo))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= W and 0 < h <= H:
                return _pick(u[a + 2], H - h + 1), _pick(u[a + 3], W - w + 1), h, w
        in_ratio = W / H
        if in_ratio < self.ratio[0]:
            w, h = W, min(H, max(1, round(W / self.ratio[0])))
        elif in_ratio > self.ratio[1]:
            h, w = H, min(W, max(1, round(H * self.ratio[1])))
        else:
            h, w = H, W
        return (H - h) // 2, (W - w) // 2, h, w

    def apply(self, s: Sample, u: list[float]) -> None:
        H, W = s.h, s.w
        s.crop(*self.window(H, W, u))
        _resize(s, *self.size)


@dataclass(frozen=True, kw_only=True)
class RandomCrop(Op):
    """A ``size`` window at a uniform position of the image zero-padded by ``padding``."""

    name: ClassVar[str] = "random_crop"
    draws: ClassVar[int] = 2
    geometric: ClassVar[bool] = True
    spec: ClassVar[dict[str, tuple[Any, Validator]]] = {
        "size": (REQUIRED, size_pair),
        "padding": (0, int_in(0, 4096)),
    }
    size: tuple[int, int]
    padding: int = 0

    def out_size(self, hw: tuple[int, int] | None) -> tuple[int, int]:
        if hw is not None:
            h, w = self.size
            p = self.padding
            if hw[0] + 2 * p < h or hw[1] + 2 * p < w:
                raise self.error(
                    f"size {h}x{w} is larger than the {hw[0]}x{hw[1]} input"
                    + (f" padded by {p}" if p else "")
                    + "; use a smaller size, add padding, or resize first",
                    "size",
                )
        return self.size

    def apply(self, s: Sample, u: list[float]) -> None:
        H, W = s.h, s.w
        h, w = self.size
        p = self.padding
        if H + 2 * p < h or W + 2 * p < w:
            raise s.too_small(self.index, self.name, h, w, f" (padded by {p})" if p else "")
        top = _pick(u[0], H + 2 * p - h + 1) - p
        left = _pick(u[1], W + 2 * p - w + 1) - p
        s.crop(top, left, h, w)


@dataclass(frozen=True, kw_only=True)
class CenterCrop(Op):
    """A ``size`` window at offset ((H - h) // 2, (W - w) // 2)."""

    name: ClassVar[str] = "center_crop"
    geometric: ClassVar[bool] = True
    spec: ClassVar[dict[str, tuple[Any, Validator]]] = {"size": (REQUIRED, size_pair)}
    size: tuple[int, int]

    def out_size(self, hw: tuple[int, int] | None) -> tuple[int, int]:
        if hw is not None and (hw[0] < self.size[0] or hw[1] < self.size[1]):
            raise self.error(
                f"size {self.size[0]}x{self.size[1]} is larger than the {hw[0]}x{hw[1]} input; "
                "use a smaller size or resize first",
                "size",
            )
        return self.size

    def apply(self, s: Sample, u: list[float]) -> None:
        H, W = s.h, s.w
        h, w = self.size
        if h > H or w > W:
            raise s.too_small(self.index, self.name, h, w)
        s.crop((H - h) // 2, (W - w) // 2, h, w)


@dataclass(frozen=True, kw_only=True)
class Resize(Op):
    """Resize to exactly ``size`` (an int means square, unlike torchvision's shorter side)."""

    name: ClassVar[str] = "resize"
    geometric: ClassVar[bool] = True
    resamples: ClassVar[bool] = True
    spec: ClassVar[dict[str, tuple[Any, Validator]]] = {"size": (REQUIRED, size_pair)}
    size: tuple[int, int]

    def out_size(self, hw: tuple[int, int] | None) -> tuple[int, int]:
        return self.size

    def apply(self, s: Sample, u: list[float]) -> None:
        if s.hw() != self.size:
            _resize(s, *self.size)


@dataclass(frozen=True, kw_only=True)
class HFlip(Op):
    """Mirror left-right with probability ``p``."""

    name: ClassVar[str] = "hflip"
    draws: ClassVar[int] = 1
    geometric: ClassVar[bool] = True
    spec: ClassVar[dict[str, tuple[Any, Validator]]] = {"p": (0.5, float_in(0.0, 1.0))}
    p: float = 0.5

    def apply(self, s: Sample, u: list[float]) -> None:
        if u[0] < self.p:
            s.hflip = not s.hflip


@dataclass(frozen=True, kw_only=True)
class VFlip(Op):
    """Mirror top-bottom with probability ``p``."""

    name: ClassVar[str] = "vflip"
    draws: ClassVar[int] = 1
    geometric: ClassVar[bool] = True
    spec: ClassVar[dict[str, tuple[Any, Validator]]] = {"p": (0.5, float_in(0.0, 1.0))}
    p: float = 0.5

    def apply(self, s: Sample, u: list[float]) -> None:
        if u[0] < self.p:
            s.vflip = not s.vflip


@dataclass(frozen=True, kw_only=True)
class Rotate(Op):
    """With probability ``p``, rotate about the centre by an angle uniform in
    [-degrees, degrees] (counter-clockwise positive); same size, corners filled with 0."""

    name: ClassVar[str] = "rotate"
    draws: ClassVar[int] = 2
    geometric: ClassVar[bool] = True
    resamples: ClassVar[bool] = True
    spec: ClassVar[dict[str, tuple[Any, Validator]]] = {
        "degrees": (REQUIRED, float_in(0.0, 180.0)),
        "p": (1.0, float_in(0.0, 1.0)),
    }
    degrees: float
    p: float = 1.0

    def apply(self, s: Sample, u: list[float]) -> None:
        if not u[0] < self.p:
            return
        angle = (2.0 * u[1] - 1.0) * self.degrees
        if s.hflip != s.vflip:  # one pending mirror: rotating the mirror image reverses the angle
            angle = -angle
        H, W = s.h, s.w
        m = cv2.getRotationMatrix2D(((W - 1) / 2.0, (H - 1) / 2.0), angle, 1.0)
        for name, arr in s.arrays.items():
            s.arrays[name] = cv2.warpAffine(
                arr,
                m,
                (W, H),
                flags=_interp(s, name),
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=0,
            )
            s.owned.add(name)


def _lut(s: Sample, table: Array) -> None:
    for name in s.images:
        s.arrays[name] = cv2.LUT(s.arrays[name], table)
        s.owned.add(name)


_RAMP = np.arange(256, dtype=np.float64)


@dataclass(frozen=True, kw_only=True)
class Brightness(Op):
    """Add an offset uniform in [-delta, delta] * 255 to every channel (uint8, saturating)."""

    name: ClassVar[str] = "brightness"
    draws: ClassVar[int] = 1
    uint8_only: ClassVar[bool] = True
    spec: ClassVar[dict[str, tuple[Any, Validator]]] = {"delta": (REQUIRED, float_in(0.0, 1.0))}
    delta: float

    def apply(self, s: Sample, u: list[float]) -> None:
        offset = (2.0 * u[0] - 1.0) * self.delta * 255.0
        _lut(s, np.clip(np.rint(_RAMP + offset), 0, 255).astype(np.uint8))


@dataclass(frozen=True, kw_only=True)
class Contrast(Op):
    """Scale the distance to the image's mean grey level by a factor uniform in ``range``."""

    name: ClassVar[str] = "contrast"
    draws: ClassVar[int] = 1
    uint8_only: ClassVar[bool] = True
    spec: ClassVar[dict[str, tuple[Any, Validator]]] = {"range": (REQUIRED, range_in(0.0, 100.0))}
    range: tuple[float, float]

    def apply(self, s: Sample, u: list[float]) -> None:
        factor = self.range[0] + u[0] * (self.range[1] - self.range[0])
        for name in s.images:
            arr = s.arrays[name]
            if arr.ndim == 3 and arr.shape[2] == 3:
                mean = cv2.mean(cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY))[0]
            else:
                mean = float(arr.mean())
            table = np.clip(np.rint((_RAMP - mean) * factor + mean), 0, 255).astype(np.uint8)
            s.arrays[name] = cv2.LUT(arr, table)
            s.owned.add(name)


@dataclass(frozen=True, kw_only=True)
class Saturation(Op):
    """Blend each RGB image with its greyscale by a factor uniform in ``range``
    (0: grey, 1: unchanged, >1: more saturated)."""

    name: ClassVar[str] = "saturation"
    draws: ClassVar[int] = 1
    uint8_only: ClassVar[bool] = True
    spec: ClassVar[dict[str, tuple[Any, Validator]]] = {"range": (REQUIRED, range_in(0.0, 100.0))}
    range: tuple[float, float]

    def apply(self, s: Sample, u: list[float]) -> None:
        factor = self.range[0] + u[0] * (self.range[1] - self.range[0])
        for name in s.images:
            arr = s.arrays[name]
            grey = cv2.cvtColor(cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
            s.arrays[name] = cv2.addWeighted(arr, factor, grey, 1.0 - factor, 0.0)
            s.owned.add(name)


@dataclass(frozen=True, kw_only=True)
class Cutout(Op):
    """With probability ``p``, zero a ``size`` rectangle centred at a uniform pixel (clipped
    at the borders) in every image field. Masks are left as they are: the object is still
    there, only hidden, so its label stays."""

    name: ClassVar[str] = "cutout"
    draws: ClassVar[int] = 3
    spec: ClassVar[dict[str, tuple[Any, Validator]]] = {
        "size": (REQUIRED, size_pair),
        "p": (0.5, float_in(0.0, 1.0)),
    }
    size: tuple[int, int]
    p: float = 0.5

    def apply(self, s: Sample, u: list[float]) -> None:
        if not u[0] < self.p:
            return
        H, W = s.h, s.w
        h, w = self.size
        y0 = _pick(u[1], H) - h // 2
        x0 = _pick(u[2], W) - w // 2
        y0, y1 = max(y0, 0), min(y0 + h, H)
        x0, x1 = max(x0, 0), min(x0 + w, W)
        if s.vflip:
            y0, y1 = H - y1, H - y0
        if s.hflip:
            x0, x1 = W - x1, W - x0
        for name in s.images:
            if name not in s.owned:
                s.arrays[name] = s.arrays[name].copy()
                s.owned.add(name)
            s.arrays[name][y0:y1, x0:x1] = 0


@dataclass(frozen=True, kw_only=True)
class Normalize(Op):
    """``(x / 255 - mean) / std`` per channel for uint8 images, ``(x - mean) / std`` for
    other dtypes; float32 HWC out. Must be the last op. Sending uint8 and normalising on
    the GPU moves 4x fewer bytes; use this when the trainer cannot."""

    name: ClassVar[str] = "normalize"
    spec: ClassVar[dict[str, tuple[Any, Validator]]] = {
        "mean": (REQUIRED, per_channel(positive=False)),
        "std": (REQUIRED, per_channel(positive=True)),
    }
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def coefficients(self, dtype: np.dtype[Any]) -> tuple[Array, Array]:
        """(scale, offset) with out = x * scale - offset, float32, one per channel."""
        std = np.asarray(self.std, dtype=np.float64)
        mean = np.asarray(self.mean, dtype=np.float64)
        unit = 255.0 if dtype == np.uint8 else 1.0
        return (1.0 / (unit * std)).astype(np.float32), (mean / std).astype(np.float32)

    def apply(self, s: Sample, u: list[float]) -> None:  # done by the final write
        pass


OPS: dict[str, type[Op]] = {
    cls.name: cls
    for cls in (
        RandomResizedCrop,
        RandomCrop,
        CenterCrop,
        Resize,
        HFlip,
        VFlip,
        Rotate,
        Brightness,
        Contrast,
        Saturation,
        Cutout,
        Normalize,
    )
}


def parse_op(index: int, raw: Any) -> Op:
    """Validate one ``{"op": name, **params}`` object; PipelineError names op, index and param."""
    where = f"op {index}"
    if not isinstance(raw, Mapping):
        raise PipelineError(
            f'{where}: each op must be an object like {{"op": "hflip", "p": 0.5}}, got {raw!r}',
            op_index=index,
        )
    name = raw.get("op")
    if not isinstance(name, str) or name not in OPS:
        raise PipelineError(
            f"{where}: unknown op {name!r}; known ops: {', '.join(sorted(OPS))}",
            op_index=index,
            param="op",
        )
    cls = OPS[name]
    where = f"op {index} ({name})"
    unknown = sorted(str(k) for k in raw if k != "op" and k not in cls.spec)
    if unknown:
        raise PipelineError(
            f"{where}: unknown parameter {unknown[0]!r}; allowed: {', '.join(sorted(cls.spec))}",
            op_index=index,
            param=unknown[0],
        )
    kwargs: dict[str, Any] = {}
    for param, (default, check) in cls.spec.items():
        if param not in raw:
            if default is REQUIRED:
                raise PipelineError(
                    f"{where}: missing required parameter {param!r}", op_index=index, param=param
                )
            kwargs[param] = default
            continue
        try:
            kwargs[param] = check(raw[param], where)
        except Bad as exc:
            raise PipelineError(f"{where}: {param} {exc}", op_index=index, param=param) from None
    return cls(index=index, **kwargs)
