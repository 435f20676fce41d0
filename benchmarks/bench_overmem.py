"""Packs bigger than the server's memory: batchd against the disk's and the decoder's limits.

The server runs inside a memory cgroup (v1 ``memory.limit_in_bytes`` or v2
``memory.max``, as root) limited to ``--limit-share`` of the pack (0.4 by default),
so the page cache cannot hold the pack: what a container with a memory limit, or a
200 GB pack on a 64 GB box, does. Every contender starts from a cold page cache
(``/proc/sys/vm/drop_caches``) and runs for ``--seconds``; all in one run.

A raw pack (``--count`` 256x256 RGB images of noise: 1.5 GB for 8,000):

- ``disk-qdN``: the disk's random-read limit for the pack's sample size, N threads
  each ``pread``-ing whole samples in a random order, each sample once (queue depth
  1, 4, 16, 64); ``disk-direct-qdN`` the same with ``O_DIRECT`` (N = 16, 64). The
  disk's limit is the best of all six;
- ``dataloader-memmap``: a torch DataLoader (2 workers, ``np.memmap`` of the pack's
  image file, crop 224 + flip) inside the same cgroup;
- ``batchd-1``: one trainer (random_crop 224 + hflip, batch 256), defaults (direct reads);
- ``batchd-1-buffered``: the same with ``--no-direct-reads`` (``preadv`` + read-ahead);
- ``batchd-2-seeds``: two trainers with different seeds (aggregate images/s);
- ``batchd-4-same``: four trainers of the same job (their batches are computed once).

An encoded pack (``--encoded-count`` 256x256 JPEGs, q90, of the benchmark set's
images: about 19 KB each, 1.5 GB for 80,000), where decoding, not the disk, is the
limit (the disk reads such samples several times faster than two cores decode them):

- ``enc-decode-limit``: the pack's first 4,000 JPEGs decoded from memory by simplejpeg
  in a tight loop, one thread per core, no server and no cgroup: the work's ceiling;
- ``enc-dataloader-cv2``: a torch DataLoader (2 workers, ``pread`` + ``cv2.imdecode``
  of each sample, crop 224 + flip) inside the cgroup;
- ``enc-batchd-1``, ``enc-batchd-1-buffered``, ``enc-batchd-2-seeds``,
  ``enc-batchd-4-same``: as for the raw pack;
- ``enc-batchd-1-warm``: one trainer of a server with no memory limit, the pack in
  the page cache: what the limit costs.

For each batchd contender: images/s, the first batch's latency, bytes read from disk
per job and epoch over the pack's size (``batchd_disk_read_bytes`` from the server's
start on; 1.0 is ideal, or the block rounding of small samples for JPEGs), the
read-ahead hit rate (the share of bytes the gather read that were already in the page
cache) and the share of the gather threads' time spent waiting on the disk, crops
checked against the pack (a sample of rows of every run: each served crop must be a
crop of the stored image, mirrored or not), and OOM kills of the server
(``memory.oom_control``) during the run.

Run: ``python -m benchmarks.bench_overmem [--json] [--count 8000] [--seconds 20]
[--packs raw,encoded]``. Where no cgroup can be made (not root, no memory controller)
it says so and exits 0 with ``{"skipped": reason}``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._harness import _batchd_command, _healthy, free_port

WORK = Path(__file__).resolve().parent / "_work" / "overmem"
SIZE, CROP, BATCH = 256, 224, 256
AUGMENT = [{"op": "random_crop", "size": CROP}, {"op": "hflip"}]


# --- the cgroup ---------------------------------------------------------------------------


class Cgroup:
    """A memory cgroup of ours (v1 or v2); processes join it with :meth:`enter`."""

    def __init__(self, name: str, limit: int) -> None:
        v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        base = Path("/sys/fs/cgroup") if v2 else Path("/sys/fs/cgroup/memory")
        self.path = base / name
        self.v2 = v2
        self.path.mkdir(exist_ok=True)
        (self.path / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(limit))
        self.limit = limit

    def enter(self) -> None:  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def oom_kills(self) -> int:
        name = "memory.events" if self.v2 else "memory.oom_control"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0


def _cgroup_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make a memory cgroup and drop the page cache"
    if not (
        Path("/sys/fs/cgroup/cgroup.controllers").exists()
        or Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
    ):
        return "no memory cgroup controller (v1 or v2) here"
    return None


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


# --- data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pack:
    """A benchmark pack: its directory (dataset ``big``), sample count and image file."""

    path: Path
    count: int
    encoded: bool

    @property
    def images(self) -> Path:
        return self.path / ("image.data" if self.encoded else "image.raw")

    @property
    def nbytes(self) -> int:
        return self.images.stat().st_size

    def source(self) -> Callable[[int], NDArray[np.uint8]]:
        """``image(i)``: sample ``i`` as stored (decoded, for an encoded pack)."""
        if not self.encoded:
            arr = np.memmap(self.images, np.uint8, "r", shape=(self.count, SIZE, SIZE, 3))
            return lambda i: np.asarray(arr[i])
        from batchd_server.format import open_dataset

        ds = open_dataset(self.path)
        return lambda i: ds.image("image", i)


def make_pack(count: int) -> Pack:
    """A raw pack of ``count`` 256x256 RGB images of noise (incompressible) and labels."""
    from batchd_server import DatasetWriter, FieldSpec

    out = WORK / f"data{count}" / "big"
    if not out.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
        image = FieldSpec(
            name="image", dtype=np.dtype("u1"), shape=(SIZE, SIZE, 3), role="image",
            encoding="raw", channels=3,
        )  # fmt: skip
        rng = np.random.default_rng(0)
        with DatasetWriter(out, [image, _label_spec()]) as writer:
            for start in range(0, count, 500):
                n = min(500, count - start)
                block = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
                writer.append_block({"image": block, "label": np.arange(start, start + n)}, n)
            writer.commit({"by": "benchmarks/bench_overmem.py"})
    return Pack(out, count, encoded=False)


def make_jpeg_pack(count: int) -> Pack:
    """An encoded pack of ``count`` 256x256 JPEGs (q90) of the benchmark set's images."""
    import cv2

    from batchd_server import DatasetWriter, Encoded, FieldSpec

    from ._data import image

    out = WORK / f"jpeg{count}" / "big"
    if out.is_dir():
        return Pack(out, count, encoded=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = FieldSpec(
        name="image", dtype=np.dtype("u1"), shape=None, role="image", encoding="image",
        channels=3,
    )  # fmt: skip

    def encode(i: int) -> Encoded:
        bgr = cv2.cvtColor(image(i, SIZE)[0], cv2.COLOR_RGB2BGR)
        ok, jpg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        return Encoded(jpg.tobytes(), SIZE, SIZE)

    step = 2000
    with DatasetWriter(out, [spec, _label_spec()]) as writer, ThreadPoolExecutor() as pool:
        for start in range(0, count, step):  # cv2 releases the GIL: every core encodes
            ids = range(start, min(count, start + step))
            block = {"image": list(pool.map(encode, ids)), "label": np.asarray(ids)}
            writer.append_block(block, len(ids))
            print(f"[overmem] encoded {ids.stop:,}/{count:,}", file=sys.stderr, flush=True)
        writer.commit({"by": "benchmarks/bench_overmem.py"})
    return Pack(out, count, encoded=True)


def _label_spec() -> Any:
    from batchd_server import FieldSpec

    return FieldSpec(
        name="label", dtype=np.dtype("<i8"), shape=(), role="value", encoding="raw",
        channels=None,
    )  # fmt: skip


# --- contenders ---------------------------------------------------------------------------


def disk_limit(
    path: Path, count: int, depth: int, seconds: float, *, direct: bool = False
) -> float:
    """Random whole-sample preads per second at queue depth ``depth``, from a cold cache.

    Each sample is read at most once (one permutation shared by the threads): reads
    drawn with replacement would find earlier ones in the page cache, which this
    process is not limited from, and measure memory instead of the disk. ``direct``:
    with ``O_DIRECT`` into page-aligned buffers, past the page cache.
    """
    row = SIZE * SIZE * 3
    drop_caches()
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead around a read
    order = iter(np.random.default_rng(depth).permutation(count).tolist())
    lock = threading.Lock()
    done = [0] * depth
    stop = time.monotonic() + seconds

    def worker(w: int) -> None:
        buf = mmap.mmap(-1, row)  # page-aligned, as O_DIRECT needs
        while time.monotonic() < stop:
            with lock:
                i = next(order, None)
            if i is None:
                return
            os.preadv(fd, [buf], i * row)
            done[w] += 1

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(depth)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.close(fd)
    return sum(done) / (time.monotonic() - t0)


# Shared by both DataLoader contenders: images/s over ``seconds`` of epochs.
_LOOP = """
loader = DataLoader({dataset}(), batch_size=256, shuffle=True, num_workers=2)
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    for b in loader:
        n += len(b)
        if time.perf_counter() - t0 > seconds: break
print(n / (time.perf_counter() - t0))
"""

_LOADER = """
import sys, time, numpy as np, torch
from torch.utils.data import DataLoader, Dataset
path, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
class Memmap(Dataset):
    def __init__(self): self.arr = None
    def __len__(self): return count
    def __getitem__(self, i):
        if self.arr is None:
            self.arr = np.memmap(path, dtype=np.uint8, mode="r", shape=(count, 256, 256, 3))
        y, x = np.random.randint(0, 33, 2)
        img = np.array(self.arr[i, y:y + 224, x:x + 224])
        return torch.from_numpy(img[:, ::-1].copy() if np.random.rand() < 0.5 else img)
"""
_LOADER += _LOOP.format(dataset="Memmap")


_LOADER_JPEG = """
import os, sys, time, cv2, numpy as np, torch
from torch.utils.data import DataLoader, Dataset
pack, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
offsets = np.fromfile(os.path.join(pack, "image.offsets"), dtype="<i8")
class Jpeg(Dataset):
    def __init__(self): self.fd = None
    def __len__(self): return count
    def __getitem__(self, i):
        if self.fd is None:
            cv2.setNumThreads(1)
            self.fd = os.open(os.path.join(pack, "image.data"), os.O_RDONLY)
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        img = cv2.imdecode(np.frombuffer(os.pread(self.fd, hi - lo, lo), np.uint8), 1)
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        y, x = np.random.randint(0, 33, 2)
        img = img[y:y + 224, x:x + 224]
        img = img[:, ::-1] if np.random.rand() < 0.5 else img
        return torch.from_numpy(np.ascontiguousarray(img))
"""
_LOADER_JPEG += _LOOP.format(dataset="Jpeg")


def dataloader(pack: Pack, cg: Cgroup, seconds: float) -> float:
    drop_caches()
    script, target = (_LOADER_JPEG, pack.path) if pack.encoded else (_LOADER, pack.images)
    out = subprocess.run(
        [sys.executable, "-c", script, str(target), str(pack.count), str(seconds)],
        capture_output=True, text=True, preexec_fn=cg.enter, timeout=seconds * 4 + 120,
        check=True,
    )  # fmt: skip
    return float(out.stdout.split()[-1])


def decode_limit(pack: Pack, n: int = 4000) -> float:
    """simplejpeg decoding ``n`` of the pack's JPEGs from memory on every core (images/s)."""
    import simplejpeg

    from batchd_server.format import open_dataset

    from .bench_decode import decode_limit as tight_loop

    with open_dataset(pack.path) as ds:
        blobs = [bytes(ds.encoded("image", i)) for i in range(min(n, pack.count))]
    got = tight_loop(blobs, lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB"), 3)
    return float(got["images_per_s"]["median"])


@contextmanager
def server(data: Path, cg: Cgroup | None, args: list[str]) -> Iterator[str]:
    port = free_port()
    log = open(WORK / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [*_batchd_command(), "serve", "--data", str(data), "--port", str(port), *args],
        stdout=log, stderr=subprocess.STDOUT, preexec_fn=cg.enter if cg else None,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        while not _healthy(url, 1.0):
            if proc.poll() is not None:
                raise RuntimeError((WORK / "server.log").read_text()[-2000:])
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


def _trainer(url: str, seed: int, seconds: float, pack: Pack | None, out: list[Any]) -> None:
    try:
        _train(url, seed, seconds, pack, out)
    except Exception as exc:  # reported by batchd() with the others' results
        out.append({"error": f"{type(exc).__name__}: {exc}"})


def _is_crop_of(img: NDArray[np.uint8], src: NDArray[np.uint8]) -> bool:
    """True if ``img`` is some ``CROP`` crop of ``src``, mirrored or not."""
    return any(
        np.array_equal(img, v[y : y + CROP, x : x + CROP])
        for v in (src, src[:, ::-1])
        for y in range(SIZE - CROP + 1)
        for x in range(SIZE - CROP + 1)
        if v[y, x, 0] == img[0, 0, 0]
    )


def _train(url: str, seed: int, seconds: float, pack: Pack | None, out: list[Any]) -> None:
    from batchd import Client

    client = Client(url, "big", batch_size=BATCH, seed=seed, augment=AUGMENT, retry_deadline=10)
    n, first, epoch, t0 = 0, None, 0, time.perf_counter()
    checked = bad = 0
    source = pack.source() if pack else None
    while time.perf_counter() - t0 < seconds:
        for batch in client.iterate(epoch):
            n += len(batch["index"])
            if first is None:
                first = time.perf_counter() - t0
            if source is not None and checked < 64:  # the served crop is a crop of the pack's
                i = int(batch["index"][0])
                checked, bad = checked + 1, bad + (not _is_crop_of(batch["image"][0], source(i)))
            if time.perf_counter() - t0 > seconds:
                break
        epoch += 1
    out.append({"images": n, "s": time.perf_counter() - t0, "first_s": first, "bad": bad})


_READ_METRICS = {
    "batchd_disk_read_bytes_total": "disk",
    "batchd_read_ready_bytes_total": "ready",
    "batchd_read_waited_bytes_total": "waited",
    "batchd_read_wait_seconds_total": "wait_s",
}


def _read_metrics(url: str) -> dict[str, float]:
    """The server's read counters (summed over datasets) and its gather threads."""
    import urllib.request

    got = dict.fromkeys(_READ_METRICS.values(), 0.0)
    with urllib.request.urlopen(f"{url}/metrics") as resp:
        for line in resp.read().decode().splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name in _READ_METRICS:
                got[_READ_METRICS[name]] += float(line.split()[-1])
    with urllib.request.urlopen(f"{url}/v1/status") as resp:
        got["threads"] = float(json.loads(resp.read())["server"]["threads"])
    return got


def batchd(
    pack: Pack, cg: Cgroup | None, seeds: list[int], seconds: float, args: list[str]
) -> dict[str, Any]:
    """batchd trainers against a server in ``cg`` (cold cache), or in none (warm cache)."""
    if cg is None:
        for _ in range(2):  # read into the page cache, where the unlimited server keeps it
            with open(pack.images, "rb") as f:
                while f.read(16 << 20):
                    pass
    else:
        drop_caches()
    kills_before = cg.oom_kills() if cg else 0
    with server(pack.path.parent, cg, args) as url:
        # What the server read to start (its Python modules and libraries, after the
        # cache was dropped) is not the pack's: counted from here.
        start = _read_metrics(url)
        results: list[Any] = []
        threads = [
            threading.Thread(
                target=_trainer, args=(url, s, seconds, pack if i == 0 else None, results)
            )
            for i, s in enumerate(seeds)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        reads = _read_metrics(url)
        reads["disk"] -= start["disk"]
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError("; ".join(errors))
    images = sum(r["images"] for r in results)
    wall = max(r["s"] for r in results)
    disk, read = reads["disk"], reads["ready"] + reads["waited"]
    return {
        "images_per_s": images / wall,
        "first_batch_s": min(r["first_s"] or wall for r in results),
        "epochs": images / len(seeds) / pack.count,
        # Each job (distinct seed) reads the pack once per epoch at best: 1.0 is ideal.
        "disk_bytes_over_pack_per_job_epoch": disk
        / max(1e-9, images / len(seeds) * len(set(seeds)) / pack.count)
        / pack.nbytes,
        # Of the bytes the gather read with preadv, the share read ahead in time; and
        # the share of the gather threads' time spent blocked on the disk.
        "read_hit_rate": reads["ready"] / read if read else None,
        "read_wait_share": reads["wait_s"] / (wall * max(1.0, reads["threads"])),
        "wrong_crops": sum(r["bad"] for r in results),
        "oom_kills": (cg.oom_kills() - kills_before) if cg else 0,
    }


def _block_rounding(pack: Pack) -> float:
    """Bytes a read of every sample takes, in whole 4 KiB blocks, over the bytes stored.

    The disk (and the page cache) move whole blocks: a 19 KB JPEG is read as the five or
    six blocks it touches, so an epoch reads more than the pack's size, buffered or not.
    """
    o = np.fromfile(pack.path / "image.offsets", "<i8")
    heads, sizes = o[:-1] % 4096, np.diff(o)
    return float((-(-(heads + sizes) // 4096) * 4096).sum() / max(1, int(sizes.sum())))


def _raw_contenders(pack: Pack, cg: Cgroup, seconds: float) -> dict[str, Callable[[], Any]]:
    def disk(depth: int, direct: bool) -> Callable[[], float]:
        return lambda: disk_limit(pack.images, pack.count, depth, min(seconds, 8), direct=direct)

    return {
        **{f"disk-qd{d}": disk(d, False) for d in (1, 4, 16, 64)},
        **{f"disk-direct-qd{d}": disk(d, True) for d in (16, 64)},
        "dataloader-memmap": lambda: dataloader(pack, cg, seconds),
        "batchd-1": lambda: batchd(pack, cg, [1], seconds, []),
        "batchd-1-buffered": lambda: batchd(pack, cg, [1], seconds, ["--no-direct-reads"]),
        "batchd-2-seeds": lambda: batchd(pack, cg, [1, 2], seconds, []),
        "batchd-4-same": lambda: batchd(pack, cg, [1, 1, 1, 1], seconds, []),
    }


def _encoded_contenders(pack: Pack, cg: Cgroup, seconds: float) -> dict[str, Callable[[], Any]]:
    return {
        "enc-decode-limit": lambda: decode_limit(pack),
        "enc-dataloader-cv2": lambda: dataloader(pack, cg, seconds),
        "enc-batchd-1": lambda: batchd(pack, cg, [1], seconds, []),
        "enc-batchd-1-buffered": lambda: batchd(pack, cg, [1], seconds, ["--no-direct-reads"]),
        "enc-batchd-2-seeds": lambda: batchd(pack, cg, [1, 2], seconds, []),
        "enc-batchd-4-same": lambda: batchd(pack, cg, [1, 1, 1, 1], seconds, []),
        "enc-batchd-1-warm": lambda: batchd(pack, None, [1], seconds, []),
    }


def run(
    count: int, seconds: float, share: float, reps: int, *, packs: tuple[str, ...] = ("raw",),
    encoded_count: int = 80000,
) -> dict[str, Any]:  # fmt: skip
    problem = _cgroup_problem()
    if problem:
        return {"skipped": problem}
    report: dict[str, Any] = {"cache": "cold (drop_caches before each contender)", "runs": []}
    contenders: dict[str, Callable[[], Any]] = {}
    if "raw" in packs:
        raw = make_pack(count)
        cg = Cgroup("batchd_bench_overmem", int(raw.nbytes * share))
        report.update(pack_bytes=raw.nbytes, limit_bytes=cg.limit)
        contenders.update(_raw_contenders(raw, cg, seconds))
    if "encoded" in packs:
        enc = make_jpeg_pack(encoded_count)
        cg = Cgroup("batchd_bench_overmem_enc", int(enc.nbytes * share))
        report.update(
            encoded_pack_bytes=enc.nbytes,
            encoded_limit_bytes=cg.limit,
            encoded_block_rounding=_block_rounding(enc),
        )
        contenders.update(_encoded_contenders(enc, cg, seconds))
    for rep in range(reps):
        got: dict[str, Any] = {}
        for name, fn in contenders.items():
            print(f"[overmem] run {rep + 1}/{reps} {name}", file=sys.stderr, flush=True)
            try:
                got[name] = fn()
            except Exception as exc:  # recorded, the run goes on
                got[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        report["runs"].append(got)
    report["summary"] = _summary(report["runs"])
    return report


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs; each ratio is taken within its run, then the median.

    The disk here (a shared virtual disk) varies about 2x from minute to minute, so
    a contender is only compared with the disk as it was in the same run.
    """

    def value(run: dict[str, Any], name: str, key: str | None = None) -> float:
        v = run.get(name)
        v = v.get(key) if isinstance(v, dict) and key is not None else v
        return float(v) if isinstance(v, int | float) else float("nan")

    def disk(run: dict[str, Any]) -> float:  # the device's best, through the cache or past it
        lines = [f"disk-qd{d}" for d in (1, 4, 16, 64)] + [f"disk-direct-qd{d}" for d in (16, 64)]
        return max((x for x in (value(run, n) for n in lines) if x == x), default=float("nan"))

    def ratio(a: str, b: str) -> Callable[[dict[str, Any]], float]:
        return lambda r: value(r, a, "images_per_s") / value(r, b, "images_per_s")

    def total(name: str, key: str) -> int:
        return sum(int(v) for r in runs if (v := value(r, name, key)) == v)  # NaN: failed

    def med(f: Callable[[dict[str, Any]], float]) -> float:
        nums = [x for x in map(f, runs) if x == x]  # NaN: a contender that failed
        return statistics.median(nums) if nums else float("nan")

    raw = {
        "disk_best_reads_per_s": med(disk),
        "batchd_1_images_per_s": med(lambda r: value(r, "batchd-1", "images_per_s")),
        "batchd_1_over_disk": med(lambda r: value(r, "batchd-1", "images_per_s") / disk(r)),
        "batchd_1_buffered_over_disk": med(
            lambda r: value(r, "batchd-1-buffered", "images_per_s") / disk(r)
        ),
        "batchd_1_direct_over_buffered": med(
            lambda r: (
                value(r, "batchd-1", "images_per_s") / value(r, "batchd-1-buffered", "images_per_s")
            )
        ),
        "batchd_1_over_dataloader": med(
            lambda r: value(r, "batchd-1", "images_per_s") / value(r, "dataloader-memmap")
        ),
        "batchd_2_seeds_over_disk": med(
            lambda r: value(r, "batchd-2-seeds", "images_per_s") / disk(r)
        ),
        "batchd_4_same_disk_bytes_over_pack": med(
            lambda r: value(r, "batchd-4-same", "disk_bytes_over_pack_per_job_epoch")
        ),
        "batchd_2_seeds_disk_bytes_over_pack": med(
            lambda r: value(r, "batchd-2-seeds", "disk_bytes_over_pack_per_job_epoch")
        ),
        "first_batch_s": med(lambda r: value(r, "batchd-1", "first_batch_s")),
        "batchd_1_read_hit_rate": med(lambda r: value(r, "batchd-1", "read_hit_rate")),
        "batchd_1_read_wait_share": med(lambda r: value(r, "batchd-1", "read_wait_share")),
        "oom_kills": sum(
            total(n, "oom_kills") for n in ("batchd-1", "batchd-2-seeds", "batchd-4-same")
        ),
        "wrong_crops": total("batchd-1", "wrong_crops"),
    }
    enc = {
        "decode_limit_images_per_s": med(lambda r: value(r, "enc-decode-limit")),
        "batchd_1_images_per_s": med(lambda r: value(r, "enc-batchd-1", "images_per_s")),
        "batchd_1_over_decode_limit": med(
            lambda r: value(r, "enc-batchd-1", "images_per_s") / value(r, "enc-decode-limit")
        ),
        "batchd_1_over_warm": med(ratio("enc-batchd-1", "enc-batchd-1-warm")),
        "batchd_1_direct_over_buffered": med(ratio("enc-batchd-1", "enc-batchd-1-buffered")),
        "batchd_1_over_dataloader": med(
            lambda r: value(r, "enc-batchd-1", "images_per_s") / value(r, "enc-dataloader-cv2")
        ),
        "batchd_2_seeds_over_1": med(ratio("enc-batchd-2-seeds", "enc-batchd-1")),
        "batchd_4_same_over_1": med(ratio("enc-batchd-4-same", "enc-batchd-1")),
        "batchd_4_same_disk_bytes_over_pack": med(
            lambda r: value(r, "enc-batchd-4-same", "disk_bytes_over_pack_per_job_epoch")
        ),
        "first_batch_s": med(lambda r: value(r, "enc-batchd-1", "first_batch_s")),
        "batchd_1_read_wait_share": med(lambda r: value(r, "enc-batchd-1", "read_wait_share")),
        "oom_kills": sum(
            total(n, "oom_kills")
            for n in ("enc-batchd-1", "enc-batchd-2-seeds", "enc-batchd-4-same")
        ),
        "wrong_crops": total("enc-batchd-1", "wrong_crops")
        + total("enc-batchd-1-warm", "wrong_crops"),
    }
    return {
        **(raw if any("batchd-1" in r for r in runs) else {}),
        **({"encoded": enc} if any("enc-batchd-1" in r for r in runs) else {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=8000, help="images in the pack (8000: 1.5 GB)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--limit-share", type=float, default=0.4, help="cgroup limit / pack size")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument(
        "--packs", default="raw,encoded", help="which packs: raw, encoded or both (raw,encoded)"
    )
    ap.add_argument(
        "--encoded-count", type=int, default=80000, help="JPEGs in the encoded pack (80000: 1.5 GB)"
    )
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    packs = tuple(p.strip() for p in a.packs.split(",") if p.strip())
    if not packs or set(packs) - {"raw", "encoded"}:
        ap.error(f"--packs takes raw, encoded or raw,encoded, not {a.packs!r}")
    report = run(
        a.count, a.seconds, a.limit_share, a.reps, packs=packs, encoded_count=a.encoded_count
    )
    if a.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report.get("summary", report), indent=2))


if __name__ == "__main__":
    main()
