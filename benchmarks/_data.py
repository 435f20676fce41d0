"""The benchmark datasets, generated here (no downloads) and cached under ``_work/``.

One image set of ``n`` images of ``size`` x ``size`` RGB, in every form a contender reads::

    _work/s<size>-n<n>-v1/
      files/<class>/<id>.jpg|png   an image-folder tree (JPEG for 256, PNG for 64 as in
                                   the memmap report); label = class directory
      array.npy                    uint8 (n, size, size, 3) RGB: the decoded files
      labels.npy                   int64 (n,)
      data/<name>/                 raw batchd pack (decoded pixels), served by ``batchd serve``
      data/<name>_jpeg/            encoded pack (the JPEG bytes; 256 set only)
      complete.json                written last: the set is whole (sizes, bytes)

Image ``i`` is a pure function of ``i``: a smooth random background with a little
grain (so JPEGs have realistic sizes) and one filled shape whose kind is the label.
A set is built in a temporary directory and renamed into place, so an interrupted
run never leaves a half set that a later run would trust.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from ._harness import BenchError

__all__ = ["CLASSES", "ImageSet", "ensure_packs", "image", "image_set"]

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "bar")
_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class ImageSet:
    """Paths of one generated set; every form holds the same images in the same order."""

    root: Path
    size: int
    count: int
    ext: str
    name: str
    """Dataset name of the raw pack (a directory under ``data_dir``)."""
    files: tuple[Path, ...]
    labels: NDArray[np.int64]

    @property
    def files_dir(self) -> Path:
        return self.root / "files"

    @property
    def array_path(self) -> Path:
        return self.root / "array.npy"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def pack_dir(self) -> Path:
        return self.data_dir / self.name

    @property
    def encoded_name(self) -> str | None:
        jpeg = f"{self.name}_jpeg"
        return jpeg if (self.data_dir / jpeg).is_dir() else None

    def sizes(self) -> dict[str, int]:
        """Bytes on disk of each form."""
        out = {
            "files": sum(f.stat().st_size for f in self.files),
            "array_npy": self.array_path.stat().st_size,
        }
        for d in sorted(self.data_dir.iterdir()) if self.data_dir.is_dir() else []:
            out[f"pack:{d.name}"] = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        return out


def image(i: int, size: int) -> tuple[NDArray[np.uint8], int]:
    """Image ``i`` (RGB uint8) and its label; a pure function of ``(i, size)``."""
    rng = np.random.default_rng([20240601, i])
    label = int(i % len(CLASSES))
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    img = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    grain = rng.integers(-12, 13, size=(size, size, 3), dtype=np.int16)
    img = np.clip(img.astype(np.int16) + grain, 0, 255).astype(np.uint8)
    color = tuple(int(c) for c in rng.integers(0, 256, size=3))
    cx, cy = (int(v) for v in rng.integers(size // 4, 3 * size // 4, size=2))
    r = int(rng.integers(size // 8, size // 4))
    thick = max(1, size // 32)
    match CLASSES[label]:
        case "circle":
            cv2.circle(img, (cx, cy), r, color, -1)
        case "square":
            cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), color, -1)
        case "triangle":
            pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], dtype=np.int32)
            cv2.fillPoly(img, [pts], color)
        case "ring":
            cv2.circle(img, (cx, cy), r, color, thick * 2)
        case _:
            cv2.rectangle(img, (cx - r, cy - thick * 2), (cx + r, cy + thick * 2), color, -1)
    return img, label


def _file_path(root: Path, i: int, ext: str) -> Path:
    return root / "files" / CLASSES[i % len(CLASSES)] / f"{i:07d}.{ext}"


def _write_range(root: Path, start: int, stop: int, size: int, ext: str) -> None:
    cv2.setNumThreads(1)
    arr = np.load(root / "array.npy", mmap_mode="r+")
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if ext == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    for i in range(start, stop):
        img, _ = image(i, size)
        ok, enc = cv2.imencode(f".{ext}", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), params)
        if not ok:
            raise BenchError(f"cv2.imencode failed for image {i}")
        _file_path(root, i, ext).write_bytes(enc.tobytes())
        # The array holds what decoding the file gives, exactly what every loader sees.
        decoded = cv2.imdecode(enc, cv2.IMREAD_COLOR)
        if decoded is None:
            raise BenchError(f"cv2.imdecode failed on image {i} just encoded")
        arr[i] = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    arr.flush()


def _pack(images: ImageSet, out: Path, *, encoded: bool) -> None:
    """Write a batchd pack of the set with the library's writer (atomic: temp dir + rename).

    Fed from ``array.npy`` (raw) or the files' bytes (encoded) in blocks, in the set's
    order, so sample ``i`` of the pack is image ``i`` of every other form.
    """
    from batchd_server import DatasetWriter, Encoded, FieldSpec

    size = images.size
    label = FieldSpec(
        name="label", dtype=np.dtype("<i8"), shape=(), role="value", encoding="raw", channels=None
    )
    if encoded:
        img = FieldSpec(
            name="image",
            dtype=np.dtype("u1"),
            shape=None,
            role="image",
            encoding="image",
            channels=3,
        )
    else:
        img = FieldSpec(
            name="image",
            dtype=np.dtype("u1"),
            shape=(size, size, 3),
            role="image",
            encoding="raw",
            channels=3,
        )
    arr = np.load(images.array_path, mmap_mode="r")
    block = 1024
    with DatasetWriter(out, [img, label], classes=list(CLASSES)) as writer:
        for start in range(0, images.count, block):
            stop = min(start + block, images.count)
            data: Any
            if encoded:
                data = [
                    Encoded(images.files[i].read_bytes(), size, size) for i in range(start, stop)
                ]
            else:
                data = arr[start:stop]
            writer.append_block({"image": data, "label": images.labels[start:stop]}, stop - start)
        writer.commit({"source": str(images.files_dir), "by": "benchmarks/_data.py"})


def ensure_packs(images: ImageSet, *, encoded: bool = False) -> None:
    """Pack the set for batchd (raw, and the encoded JPEG pack if asked) unless already done.

    Separate from :func:`image_set` so the contenders that do not use batchd run
    without the server package. The writer builds a hidden temporary directory and
    renames it, so the server (which serves every directory under ``data/``) never
    sees half a pack. (The packing CLI's own speed is contender 7, bench_pack.)
    """
    wanted = [(images.name, False)] + ([(f"{images.name}_jpeg", True)] if encoded else [])
    images.data_dir.mkdir(exist_ok=True)
    for name, enc in wanted:
        if not (images.data_dir / name).is_dir():
            _pack(images, images.data_dir / name, encoded=enc)


def image_set(work_dir: Path, *, size: int, count: int) -> ImageSet:
    """The set of ``count`` ``size``x``size`` images, built on first use and cached."""
    ext = "jpg" if size >= 128 else "png"
    name = f"img{size}"
    root = work_dir / f"s{size}-n{count}-v{_VERSION}"
    if not (root / "complete.json").exists():
        _build(root, size=size, count=count, ext=ext)
    labels = np.load(root / "labels.npy")
    files = tuple(_file_path(root, i, ext) for i in range(count))
    return ImageSet(
        root=root, size=size, count=count, ext=ext, name=name, files=files, labels=labels
    )


def _build(root: Path, *, size: int, count: int, ext: str) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for cls in CLASSES:
        (tmp / "files" / cls).mkdir(parents=True)
    arr = np.lib.format.open_memmap(
        tmp / "array.npy", mode="w+", dtype=np.uint8, shape=(count, size, size, 3)
    )
    del arr
    labels = np.arange(count, dtype=np.int64) % len(CLASSES)
    np.save(tmp / "labels.npy", labels)
    # cv2 releases the GIL in drawing and coding, so threads use every core.
    workers = max(1, os.cpu_count() or 1)
    step = max(1, -(-count // (workers * 8)))
    with ThreadPoolExecutor(workers) as pool:
        futures = [
            pool.submit(_write_range, tmp, s, min(s + step, count), size, ext)
            for s in range(0, count, step)
        ]
        for f in futures:
            f.result()
    (tmp / "data").mkdir()
    meta: dict[str, Any] = {"size": size, "count": count, "ext": ext, "version": _VERSION}
    (tmp / "complete.json").write_text(json.dumps(meta))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
