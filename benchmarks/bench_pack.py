"""Packing speed: a folder of 64x64 PNGs into a raw pack, against the naive loop.

The naive loop is the one from the memmap report that motivated batchd (700k
64x64 PNGs packed in 12,550 s, ~56 images/s)::

    for i, path in enumerate(paths):
        img = cv2.imread(path); img = cv2.resize(img, (64, 64)); mm[i] = img

Both contenders read the same files from a warm page cache (the files were just
written), so this measures decode + write, not the disk.

Then the same images from each other source ``batchd pack`` reads (``formats`` in the
JSON, images/s beside the folder's): TFRecord, WebDataset tar and Parquet hold the
same PNG bytes, so they differ from the folder by their readers (one file opened,
not thousands; CRC-32C and protobuf for TFRecord); ``.npy`` and HDF5 hold the decoded
pixels, so theirs is a copy with no decoding at all. A format whose extra is not
installed is listed under ``formats_skipped`` with the reason. Run::

    python -m benchmarks.bench_pack [--quick] [--json] [--count N] [--workers N] [--no-formats]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from batchd_server.pack import PackOptions, pack

SIZE = 64
CLASSES = 10
REFERENCE_NAIVE = 700_000 / 12_550  # images/s in the report


def make_images(root: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` PNGs with a smooth background and grain, so they compress like photos."""
    rng = np.random.default_rng(seed)
    paths = []
    for c in range(CLASSES):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = cv2.resize(small, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
        img = cv2.add(img, rng.integers(0, 24, img.shape, dtype=np.uint8))
        p = root / f"class{i % CLASSES:02d}" / f"{i:07d}.png"
        cv2.imwrite(str(p), img)
        paths.append(p)
    return sorted(paths)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def naive(paths: list[Path], out: Path) -> float:
    """The one-image-at-a-time loop; returns seconds."""
    t = time.perf_counter()
    mm = np.lib.format.open_memmap(
        out, mode="w+", dtype=np.uint8, shape=(len(paths), SIZE, SIZE, 3)
    )
    for i, p in enumerate(paths):
        img = cv2.imread(str(p))
        img = cv2.resize(img, (SIZE, SIZE))
        mm[i] = img
    mm.flush()
    del mm
    return time.perf_counter() - t


def batchd_pack(src: Path, out: Path, workers: int | None) -> float:
    t = time.perf_counter()
    pack(
        src,
        out,
        options=PackOptions(size=(SIZE, SIZE), workers=workers, progress=False, overwrite=True),
    )
    return time.perf_counter() - t


def write_sources(paths: list[Path], work: Path) -> dict[str, list[Path]]:
    """The same images as each other format's files: ``{format: [paths]}`` (where installed)."""
    import io
    import json as _json
    import tarfile

    from batchd_server.pack.formats import FORMATS

    labels = np.asarray([int(p.parent.name[-2:]) for p in paths], np.int64)
    missing = {f.name for f in FORMATS if f.missing()}
    out: dict[str, list[Path]] = {}
    pixels = np.stack([cv2.imread(str(p))[..., ::-1] for p in paths])
    np.save(work / "x.npy", pixels)
    np.save(work / "y.npy", labels)
    out["npy"] = [work / "x.npy", work / "y.npy"]
    with tarfile.open(work / "shard.tar", "w") as tf:
        for i, p in enumerate(paths):
            for ext, data in (("png", p.read_bytes()), ("cls", str(labels[i]).encode())):
                info = tarfile.TarInfo(f"{i:07d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    out["webdataset"] = [work / "shard.tar"]
    if "tfrecord" not in missing:
        import google_crc32c

        from benchmarks._tfrecord import example_png

        with open(work / "train.tfrecord", "wb") as f:
            for i, p in enumerate(paths):
                f.write(example_png(p.read_bytes(), int(labels[i]), google_crc32c.value))
        out["tfrecord"] = [work / "train.tfrecord"]
    if "parquet" not in missing:
        import pyarrow as pa
        import pyarrow.parquet as pq

        image = pa.array(
            [{"bytes": p.read_bytes(), "path": p.name} for p in paths],
            pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
        table = pa.table({"image": image, "label": pa.array(labels)})
        hf = {
            "info": {
                "features": {
                    "label": {
                        "_type": "ClassLabel",
                        "names": [f"class{c:02d}" for c in range(CLASSES)],
                    }
                }
            }
        }
        pq.write_table(
            table.replace_schema_metadata({b"huggingface": _json.dumps(hf).encode()}),
            work / "train.parquet",
        )
        out["parquet"] = [work / "train.parquet"]
    if "hdf5" not in missing:
        import h5py

        with h5py.File(work / "data.h5", "w") as f:
            f.create_dataset("image", data=pixels, chunks=(256, SIZE, SIZE, 3))
            f.create_dataset("label", data=labels)
        out["hdf5"] = [work / "data.h5"]
    return out


def format_pack(name: str, sources: list[Path], out: Path, workers: int | None) -> float:
    t = time.perf_counter()
    fields: tuple[tuple[str, str], ...] = ()
    size: tuple[int, int] | None = (SIZE, SIZE)
    if name == "npy":  # decoded arrays: packed as they are, no --size
        fields, size = (("image", "x"), ("label", "y")), None
    elif name == "hdf5":
        size = None
    elif name == "tfrecord":
        fields = (("image", "image/encoded"), ("label", "image/class/label"))
    elif name == "webdataset":
        fields = (("image", "png"), ("label", "cls"))
    opts = PackOptions(size=size, workers=workers, progress=False, overwrite=True, fields=fields)
    pack(sources, out, options=opts, fmt=name)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="2,000 images, one repeat")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument(
        "--count", type=int, default=None, help="images (default 20,000; 2,000 with --quick)"
    )
    ap.add_argument(
        "--naive-count", type=int, default=None, help="images for the naive loop (default: same)"
    )
    ap.add_argument(
        "--repeats", type=int, default=None, help="timed passes (default 3; 1 with --quick)"
    )
    ap.add_argument(
        "--workers", type=int, default=None, help="decode threads (default: one per core)"
    )
    ap.add_argument(
        "--no-formats",
        action="store_true",
        help="only the folder: skip packing the same images from the other formats",
    )
    args = ap.parse_args(argv)
    count = args.count or (2_000 if args.quick else 20_000)
    repeats = args.repeats or (1 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="batchd-bench-pack-"))
    try:
        log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr))
        log(f"writing {count:,} {SIZE}x{SIZE} PNGs to {work} ...")
        paths = make_images(work / "src", count)
        naive_paths = paths[: args.naive_count or count]
        batchd_pack(work / "src", work / "warm", args.workers)  # warm-up: page cache, thread pool
        cpu0 = _cpu()
        packs = [batchd_pack(work / "src", work / "ds", args.workers) for _ in range(repeats)]
        # CPU seconds per image do not depend on what else the machine runs; wall time does.
        pack_cpu = (_cpu() - cpu0) / (repeats * count)
        cpu0 = _cpu()
        naives = [naive(naive_paths, work / "naive.npy") for _ in range(repeats)]
        naive_cpu = (_cpu() - cpu0) / (repeats * len(naive_paths))
        formats: dict[str, float] = {}
        skipped: dict[str, str] = {}
        if not args.no_formats:
            from batchd_server.pack.formats import FORMATS

            log("writing the same images as npy, tar, TFRecord, Parquet, HDF5 ...")
            sources = write_sources(paths, work)
            for f in FORMATS:
                if f.name in ("folder", "csv"):
                    continue
                if f.name not in sources:
                    skipped[f.name] = f"pip install 'batchd[{f.extra}]'"
                    continue
                format_pack(f.name, sources[f.name], work / "warm", args.workers)
                best = min(
                    format_pack(f.name, sources[f.name], work / f"ds-{f.name}", args.workers)
                    for _ in range(repeats)
                )
                formats[f.name] = count / best
        cores = len(os.sched_getaffinity(0))
        best_pack, best_naive = min(packs), min(naives)
        result: dict[str, Any] = {
            "benchmark": "pack 64x64 PNG folder -> raw",
            "images": count,
            "naive_images": len(naive_paths),
            "repeats": repeats,
            "batchd_seconds": packs,
            "naive_seconds": naives,
            "batchd_images_per_s": count / best_pack,
            "naive_images_per_s": len(naive_paths) / best_naive,
            "speedup_vs_naive": (count / best_pack) / (len(naive_paths) / best_naive),
            "speedup_vs_reference_56_per_s": (count / best_pack) / REFERENCE_NAIVE,
            "batchd_cpu_us_per_image": pack_cpu * 1e6,
            "naive_cpu_us_per_image": naive_cpu * 1e6,
            "batchd_images_per_s_if_cores_idle": cores / pack_cpu,
            "formats": {"folder": count / best_pack, **formats},
            "formats_skipped": skipped,
            "loadavg_1min": os.getloadavg()[0],
            "bytes_png": sum(p.stat().st_size for p in paths),
            "env": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "numpy": np.__version__,
                "opencv": cv2.__version__,
                "machine": platform.machine(),
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        r = result
        print(f"{'contender':<28}{'images/s':>12}{'best s':>10}")
        print(f"{'batchd pack (raw)':<28}{r['batchd_images_per_s']:>12,.0f}{min(packs):>10.2f}")
        print(
            f"{'naive imread/resize/memmap':<28}"
            f"{r['naive_images_per_s']:>12,.0f}{min(naives):>10.2f}"
        )
        print(
            f"speedup {r['speedup_vs_naive']:.1f}x the naive loop here, "
            f"{r['speedup_vs_reference_56_per_s']:.0f}x the report's 56 images/s; "
            f"{r['env']['cpus']} CPUs"
        )
        for name, rate in r["formats"].items():
            note = " (decoded arrays: no decoding)" if name in ("npy", "hdf5") else ""
            print(f"{'batchd pack from ' + name:<28}{rate:>12,.0f}{'':>10}{note}")
        for name, why in r["formats_skipped"].items():
            print(f"{'batchd pack from ' + name:<28}{'skipped':>12}  {why}")
        print(
            f"CPU per image: batchd {r['batchd_cpu_us_per_image']:.0f} us, "
            f"naive {r['naive_cpu_us_per_image']:.0f} us; "
            "with idle cores batchd would do "
            f"~{r['batchd_images_per_s_if_cores_idle']:,.0f} images/s "
            f"(load average during the run: {r['loadavg_1min']:.2f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
