"""Raw packs at the copy limit: one trainer against tf.data holding the array in RAM (issue 19).

All in one run, warm page cache, batch 256, images/s as median (min-max) of ``--reps``
timed epochs after a warm-up one:

- ``copy-limit``: the work itself, no server: one thread copies a random 224 crop of
  each of 2,000 images, visited in a random order, out of the resident array (each row
  one memcpy), and again mirrored with ``cv2.flip``. In µs per image: the floor of the
  server's CPU per image;
- ``batchd-{tcp,uds}-{shm,bytes}``: ``batchd.Client.iterate`` over the raw pack,
  random crop 224 + flip, over TCP to 127.0.0.1 or a unix socket, with shared-memory
  bodies (the default there) or ``--no-shm``; each with the server's CPU per image
  (``/proc/<pid>/stat``);
- ``tfdata-ram``: tf.data with the whole array in the trainer's RAM, its best pipeline
  (``from_tensor_slices`` over indices, ``map(gather + random_crop + flip,
  num_parallel_calls=..., deterministic=False)``, batch, prefetch; the faster of
  ``AUTOTUNE`` and one call per core, both timed: ``bench_decode.tf_best``). TensorFlow runs
  in its own virtual environment (``python -m benchmarks.bench_decode --setup-tf``);
  without it the line is skipped with the reason;
- ``batchd-tcp-flip64`` / ``dataloader-memmap-flip64``: the 64x64 set, flip only (3 MB
  batches): batchd against the torch DataLoader (2 workers) over ``np.memmap``.

Run: ``python -m benchmarks.bench_raw [--count 20000] [--count64 20000] [--reps 3] [--json]``;
``--out FILE`` also writes the JSON record.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._data import ensure_packs, image_set
from ._harness import BenchConfig, serve, stat
from .bench_decode import _cpu_s, run_tf, tf_best
from .bench_loaders import WORKLOADS
from .bench_loaders import run as run_contender

WORK = Path(__file__).parent / "_work"
CROP = [{"op": "random_crop", "size": [224, 224]}, {"op": "hflip", "p": 0.5}]
FLIP = [{"op": "hflip", "p": 0.5}]

_TF_SCRIPT = r"""
import json, sys, time
import numpy as np
import tensorflow as tf
array_path, crop, reps, batch, parallel = json.loads(sys.stdin.read())
images = tf.constant(np.load(array_path))  # the whole array, in this process's RAM
n = int(images.shape[0])
AUTO = tf.data.AUTOTUNE if parallel is None else parallel

def sample(i):
    img = tf.gather(images, i)
    img = tf.image.random_crop(img, [crop, crop, 3])
    return tf.image.random_flip_left_right(img), i

ds = (tf.data.Dataset.from_tensor_slices(tf.range(n, dtype=tf.int64))
      .shuffle(n, reshuffle_each_iteration=True)
      .map(sample, num_parallel_calls=AUTO, deterministic=False)
      .batch(batch).prefetch(AUTO if parallel is None else 4))
if parallel is not None:  # fixed: no autotuning at all (its periods doubled up to 10 s here)
    options = tf.data.Options()
    options.autotune.enabled = False
    ds = ds.with_options(options)
rates = []
for rep in range(reps + 1):
    t, got = time.perf_counter(), 0
    for x, _ in ds:
        got += int(x.shape[0])
    if rep:
        rates.append(got / (time.perf_counter() - t))
print(json.dumps({"rates": rates, "version": tf.__version__}))
"""


def copy_limit(array: np.ndarray[Any, Any], crop: int, samples: int = 2000) -> dict[str, Any]:
    """µs per image for one thread copying a random crop out of memory, plain and flipped.

    The plain copy moves each crop row as one run of ``crop * 3`` bytes (a memcpy); the
    flipped one mirrors the pixels with ``cv2.flip`` straight into the output. 2,000
    images of 196 KB visited in a random order: out of memory, not the CPU cache.
    """
    import cv2

    rng = random.Random(0)
    n, h, w = array.shape[:3]
    rows = array.reshape(n, h, w * 3)
    order = [rng.randrange(n) for _ in range(samples)]
    out = np.empty((samples, crop, crop, 3), dtype=np.uint8)
    out_rows = out.reshape(samples, crop, crop * 3)
    for j in order:  # every image in the page cache and mapped
        out[0] = array[j, :crop, :crop]
    windows = [(j, rng.randrange(h - crop + 1), rng.randrange(w - crop + 1)) for j in order]
    plain, flipped = [], []
    for _ in range(5):
        t = time.perf_counter()
        for i, (j, y, x) in enumerate(windows):
            out_rows[i] = rows[j, y : y + crop, x * 3 : (x + crop) * 3]
        plain.append((time.perf_counter() - t) / samples * 1e6)
        t = time.perf_counter()
        for i, (j, y, x) in enumerate(windows):
            cv2.flip(array[j, y : y + crop, x : x + crop], 1, dst=out[i])
        flipped.append((time.perf_counter() - t) / samples * 1e6)
    return {
        "us_per_image": stat(plain).as_dict(),
        "flipped_us_per_image": stat(flipped).as_dict(),
        "samples": samples,
    }


def batchd_line(
    data_dir: Path,
    name: str,
    augment: list[dict[str, Any]],
    reps: int,
    *,
    uds: bool,
    args: list[str],
) -> dict[str, Any]:
    import batchd

    with (
        serve(data_dir, uds=uds, args=args) as server,
        batchd.Client(server.url, name, batch_size=256, seed=0, augment=augment) as client,
    ):
        n = sum(int(b["index"].shape[0]) for b in client.iterate(0))  # warm-up
        passes, cpu = [], []
        for epoch in range(1, reps + 1):
            t, cpu0 = time.perf_counter(), _cpu_s(server.pid)
            got = sum(int(b["index"].shape[0]) for b in client.iterate(epoch))
            passes.append(got / (time.perf_counter() - t))
            cpu.append((_cpu_s(server.pid) - cpu0) / got * 1e6)
            assert got == n, f"epoch {epoch}: {got} images, the warm-up {n}"
    return {
        "images_per_s": stat(passes).as_dict(),
        "server_cpu_us_per_image": stat(cpu).as_dict(),
    }


def tf_line(array_path: Path, crop: int, reps: int) -> dict[str, Any]:
    return tf_best(
        lambda parallel: run_tf(_TF_SCRIPT, [str(array_path), crop, reps, 256, parallel])
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="images in the 256 set")
    parser.add_argument("--count64", type=int, default=20_000, help="images in the 64 set")
    parser.add_argument("--reps", type=int, default=3, help="timed epochs per line")
    parser.add_argument("--json", action="store_true", help="print the JSON record")
    parser.add_argument("--out", type=Path, help="also write the JSON record here")
    args = parser.parse_args(argv)

    images = image_set(WORK, size=256, count=args.count)
    ensure_packs(images)
    lines: dict[str, dict[str, Any]] = {}
    lines["copy-limit"] = copy_limit(np.load(images.array_path, mmap_mode="r"), 224)
    for transport in ("tcp", "uds"):
        for body, extra in (("shm", []), ("bytes", ["--no-shm"])):
            lines[f"batchd-{transport}-{body}"] = batchd_line(
                images.data_dir, images.name, CROP, args.reps, uds=transport == "uds", args=extra
            )
    lines["tfdata-ram"] = tf_line(images.array_path, 224, args.reps)

    small = image_set(WORK, size=64, count=args.count64)
    ensure_packs(small)
    lines["batchd-tcp-flip64"] = batchd_line(
        small.data_dir, small.name, FLIP, args.reps, uds=False, args=[]
    )
    cfg = BenchConfig(mode="raw", n256=args.count, n64=args.count64, repeats=args.reps)
    (dl,) = run_contender("dataloader_memmap", WORKLOADS[1], small, cfg)
    lines["dataloader-memmap-flip64"] = {"images_per_s": dl.images_per_s.as_dict()}

    def med(key: str, what: str = "images_per_s") -> float | None:
        got = lines[key].get(what)
        return None if got is None else float(got["median"])

    ratios: dict[str, float] = {}
    for a, b in (
        ("batchd-tcp-shm", "tfdata-ram"),
        ("batchd-uds-shm", "tfdata-ram"),
        ("batchd-tcp-bytes", "tfdata-ram"),
        ("batchd-tcp-shm", "batchd-tcp-bytes"),
        ("batchd-uds-shm", "batchd-uds-bytes"),
        ("batchd-tcp-flip64", "dataloader-memmap-flip64"),
    ):
        x, y = med(a), med(b)
        if x is not None and y is not None:
            ratios[f"{a} / {b}"] = round(x / y, 2)
    copy_us = med("copy-limit", "us_per_image")
    for key in lines:
        cpu = med(key, "server_cpu_us_per_image") if key.startswith("batchd-") else None
        if cpu is not None and copy_us and not key.endswith("flip64"):
            ratios[f"{key} server cpu / copy"] = round(cpu / copy_us, 2)
    record = {
        "bench": "raw",
        "count": args.count,
        "count64": args.count64,
        "reps": args.reps,
        "cache": "warm (one untimed epoch first; the sets are read before timing)",
        "load_avg_1m": os.getloadavg()[0],
        "lines": lines,
        "ratios": ratios,
    }
    for key, line in lines.items():
        if "skipped" in line:
            print(f"{key:26s} skipped: {line['skipped']}")
        elif key == "copy-limit":
            s = line["us_per_image"]
            f = line["flipped_us_per_image"]
            print(
                f"{key:26s} {s['median']:8.1f} us/image ({s['min']:.1f}-{s['max']:.1f}); "
                f"flipped {f['median']:.1f}"
            )
        else:
            s = line["images_per_s"]
            cpu = line.get("server_cpu_us_per_image")
            extra = f"  server {cpu['median']:.0f} us/image" if cpu else ""
            print(f"{key:26s} {s['median']:8.0f} images/s ({s['min']:.0f}-{s['max']:.0f}){extra}")
    for name, r in ratios.items():
        print(f"  {name}: {r}x")
    if args.json:
        print(json.dumps(record, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
