"""Synthetic scenes: a small, deterministic dataset that exercises the real path.

Each scene is a textured background (gradient + stripes + blurred noise) with 1-4
filled shapes of :data:`CLASSES`. The first shape is the *main* one: it is larger
than every other shape, and its class is the scene's ``label``. Shapes never
overlap (their bounding circles are kept apart), so every shape is fully visible
and ``count`` (the number of shapes) is an honest regression target.

On disk (``make_scenes(out, n)``)::

    out/
      images/<class>/<id>.jpg     the scene, JPEG (an image-folder tree: class = label)
      masks/<id>.png              uint8 HxW: 0 background, 1 + k where a shape of class k is
      scenes.csv                  image,mask,count,label (paths relative to out/)

Everything is a pure function of ``(seed, scene id, size)``: scene ``i`` draws from
``np.random.default_rng([seed, i])``, so the bytes do not depend on thread count
or on ``n``. Rendering runs in a thread pool (OpenCV releases the GIL). OpenCV is
imported by the functions that draw, so importing this module (``batchd --help``
imports the demo command) does not load it.
"""

from __future__ import annotations

import csv
import functools
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

__all__ = ["CLASSES", "Scene", "Shape", "SynthInfo", "make_scenes", "render_scene", "shape_mask"]

#: Class names; class ``k`` is ``CLASSES[k]`` and paints ``1 + k`` into the mask. Sorted, so
#: packing the ``images/`` tree (classes = sorted folder names) gives the CSV's labels.
CLASSES: tuple[str, ...] = ("circle", "cross", "square", "triangle")

_MAX_SHAPES = 4
_MAIN_RADIUS = (0.22, 0.32)  # fractions of the shorter side
_SMALL_RADIUS = (0.08, 0.14)
_GAP = 2.0  # pixels between bounding circles, so rasterised edges never touch
_PLACE_TRIES = 40
_JPEG_QUALITY = 90


@dataclass(frozen=True, slots=True, kw_only=True)
class Shape:
    """One filled shape: its class, centre (x, y), bounding radius and rotation."""

    cls: int
    cx: float
    cy: float
    radius: float
    angle: float  # radians; ignored for circles


@dataclass(frozen=True, slots=True, kw_only=True)
class Scene:
    """One rendered scene; ``shapes[0]`` is the main shape and gives ``label``."""

    image: NDArray[np.uint8]  # H x W x 3, BGR as OpenCV writes it
    mask: NDArray[np.uint8]  # H x W
    shapes: tuple[Shape, ...]

    @property
    def label(self) -> int:
        return self.shapes[0].cls

    @property
    def count(self) -> int:
        return len(self.shapes)


@dataclass(frozen=True, slots=True, kw_only=True)
class SynthInfo:
    """What :func:`make_scenes` wrote."""

    root: Path
    csv: Path
    n: int
    size: tuple[int, int]
    seed: int
    classes: tuple[str, ...]
    class_counts: tuple[int, ...]  # scenes per label, indexed like ``classes``


def _polygon(shape: Shape) -> NDArray[np.int32]:
    """Vertices of a non-circle shape, all within ``radius`` of the centre."""
    r = shape.radius
    if CLASSES[shape.cls] == "square":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif CLASSES[shape.cls] == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3]
    else:  # cross: a plus sign, arms a third of the radius wide, corners within r
        w, h = r * 0.33, r * 0.94
        pts = [
            (w, h), (w, w), (h, w), (h, -w), (w, -w), (w, -h),
            (-w, -h), (-w, -w), (-h, -w), (-h, w), (-w, w), (-w, h),
        ]  # fmt: skip
    c, s = math.cos(shape.angle), math.sin(shape.angle)
    rotated = [(shape.cx + x * c - y * s, shape.cy + x * s + y * c) for x, y in pts]
    return np.round(np.array(rotated)).astype(np.int32)


def _draw(canvas: NDArray[np.uint8], shape: Shape, color: tuple[int, ...], line: int) -> None:
    import cv2

    if CLASSES[shape.cls] == "circle":
        centre = (round(shape.cx), round(shape.cy))
        cv2.circle(canvas, centre, round(shape.radius), color, thickness=-1, lineType=line)
    else:
        cv2.fillPoly(canvas, [_polygon(shape)], color, lineType=line)


def shape_mask(shape: Shape, size: tuple[int, int]) -> NDArray[np.bool_]:
    """The pixels ``shape`` covers on an empty ``size`` (H, W) canvas."""
    import cv2

    canvas = np.zeros(size, np.uint8)
    _draw(canvas, shape, (1,), cv2.LINE_8)
    return canvas.astype(bool)


@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.flags.writeable = xx.flags.writeable = False  # shared between threads
    return yy, xx


def _background(rng: np.random.Generator, h: int, w: int) -> NDArray[np.uint8]:
    """Gradient between two colours, plus stripes at a random angle, plus smooth noise."""
    import cv2

    yy, xx = _grid(h, w)
    theta = rng.uniform(0, 2 * math.pi)
    t = xx * np.float32(math.cos(theta) / max(h, w)) + yy * np.float32(math.sin(theta) / max(h, w))
    t -= t.min()
    t /= max(float(t.max()), 1e-6)
    c0, c1 = rng.uniform(30, 225, size=(2, 3)).astype(np.float32)
    phi = rng.uniform(0, math.pi)
    k = 2 * math.pi / rng.uniform(6, 24)
    stripes = np.sin(xx * np.float32(k * math.cos(phi)) + yy * np.float32(k * math.sin(phi)))
    stripes *= np.float32(rng.uniform(0, 25))
    # noise drawn at half resolution and upsampled: smooth grain at a quarter of the cost
    noise = rng.standard_normal(size=((h + 1) // 2, (w + 1) // 2, 3), dtype=np.float32)
    noise *= np.float32(rng.uniform(5, 20))
    img = cv2.resize(noise, (w, h), interpolation=cv2.INTER_LINEAR)
    img += c0
    img += t[..., None] * (c1 - c0)
    img += stripes[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _place(
    rng: np.random.Generator, h: int, w: int, radius: float, placed: list[Shape]
) -> tuple[float, float] | None:
    for _ in range(_PLACE_TRIES):
        cx = rng.uniform(radius + 1, w - radius - 1)
        cy = rng.uniform(radius + 1, h - radius - 1)
        if all(math.hypot(cx - s.cx, cy - s.cy) > radius + s.radius + _GAP for s in placed):
            return cx, cy
    return None


def render_scene(index: int, *, size: tuple[int, int] = (128, 128), seed: int = 0) -> Scene:
    """Scene ``index``: a pure function of ``(seed, index, size)``.

    The main shape's class is ``index % len(CLASSES)``, so labels are balanced in any
    prefix of the ids; everything else is drawn from the scene's own generator.
    """
    import cv2

    h, w = size
    if h < 32 or w < 32:
        raise ValueError(f"scene size {size} is too small; use at least 32x32")
    rng = np.random.default_rng([seed, index])
    side = min(h, w)
    image = _background(rng, h, w)
    mask = np.zeros((h, w), np.uint8)
    wanted = int(rng.integers(1, _MAX_SHAPES + 1))
    shapes: list[Shape] = []
    for j in range(wanted):
        lo, hi = _MAIN_RADIUS if j == 0 else _SMALL_RADIUS
        radius = rng.uniform(lo, hi) * side
        cls = index % len(CLASSES) if j == 0 else int(rng.integers(len(CLASSES)))
        angle = rng.uniform(0, 2 * math.pi)
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        spot = _place(rng, h, w, radius, shapes)
        if spot is None:  # no room left: the scene simply holds fewer shapes
            break
        shape = Shape(cls=cls, cx=spot[0], cy=spot[1], radius=radius, angle=angle)
        _draw(image, shape, colour, cv2.LINE_AA)
        _draw(mask, shape, (1 + cls,), cv2.LINE_8)
        shapes.append(shape)
    return Scene(image=image, mask=mask, shapes=tuple(shapes))


def _write(path: Path, ext: str, img: NDArray[np.uint8], params: list[int]) -> None:
    import cv2

    ok, buf = cv2.imencode(ext, img, params)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 array of these shapes
        raise RuntimeError(f"OpenCV could not encode {path}")
    path.write_bytes(buf.tobytes())


def _make_one(index: int, out: Path, size: tuple[int, int], seed: int) -> tuple[str, str, int, int]:
    import cv2

    scene = render_scene(index, size=size, seed=seed)
    name = f"{index:06d}"
    image = Path("images") / CLASSES[scene.label] / f"{name}.jpg"
    mask = Path("masks") / f"{name}.png"
    _write(out / image, ".jpg", scene.image, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    _write(out / mask, ".png", scene.mask, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return image.as_posix(), mask.as_posix(), scene.count, scene.label


def make_scenes(
    out_dir: str | Path,
    n: int,
    *,
    size: tuple[int, int] = (128, 128),
    seed: int = 0,
    workers: int | None = None,
) -> SynthInfo:
    """Write ``n`` scenes under ``out_dir`` (see the module docstring for the layout).

    Deterministic: the same ``(n, size, seed)`` writes the same bytes. Existing files
    with the same names are overwritten.
    """
    if n < 1:
        raise ValueError(f"n={n}: make at least one scene")
    out = Path(out_dir)
    for cls in CLASSES:
        (out / "images" / cls).mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    threads = workers or os.cpu_count() or 1

    def rows() -> Iterator[tuple[str, str, int, int]]:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="synth") as pool:
            # map keeps id order, so the CSV is the same whatever the thread count
            yield from pool.map(lambda i: _make_one(i, out, size, seed), range(n))

    counts = [0] * len(CLASSES)
    csv_path = out / "scenes.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "mask", "count", "label"])
        for image, mask, count, label in rows():
            writer.writerow([image, mask, count, label])
            counts[label] += 1
    return SynthInfo(
        root=out,
        csv=csv_path,
        n=n,
        size=size,
        seed=seed,
        classes=CLASSES,
        class_counts=tuple(counts),
    )
