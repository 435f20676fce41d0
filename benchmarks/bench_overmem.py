"""A raw pack bigger than the server's memory: batchd against the disk's own limit.

The server runs inside a memory cgroup (v1 ``memory.limit_in_bytes`` or v2
``memory.max``, as root) limited to ``--limit-share`` of the pack (0.4 by default),
so the page cache cannot hold the pack: what a container with a memory limit, or a
200 GB pack on a 64 GB box, does. Every contender starts from a cold page cache
(``/proc/sys/vm/drop_caches``) and runs for ``--seconds``; all in one run:

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

For each batchd contender: images/s, the first batch's latency, bytes read from disk
per job and epoch over the pack's size (``batchd_disk_read_bytes``; 1.0 is ideal), the
read-ahead hit rate (the share of bytes the gather read that were already in the page
cache) and the share of the gather threads' time spent waiting on the disk, crops
checked against the pack, and OOM kills of the server during the run.

It also records whether the server was OOM-killed (``memory.oom_control``) and checks
that the bytes served equal the pack's (every batch's crop is compared with a crop of
the pack read directly, for a sample of rows).

Run: ``python -m benchmarks.bench_overmem [--json] [--count 8000] [--seconds 20]``.
Where no cgroup can be made (not root, no memory controller) it says so and exits 0
with ``{"skipped": reason}``.
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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

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


def make_pack(count: int) -> Path:
    """A raw pack of ``count`` 256x256 RGB images of noise (incompressible) and labels."""
    from batchd_server import DatasetWriter, FieldSpec

    data = WORK / f"data{count}"
    out = data / "big"
    if out.is_dir():
        return out
    data.mkdir(parents=True, exist_ok=True)
    image = FieldSpec(
        name="image", dtype=np.dtype("u1"), shape=(SIZE, SIZE, 3), role="image",
        encoding="raw", channels=3,
    )  # fmt: skip
    label = FieldSpec(
        name="label", dtype=np.dtype("<i8"), shape=(), role="value", encoding="raw",
        channels=None,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    with DatasetWriter(out, [image, label]) as writer:
        for start in range(0, count, 500):
            n = min(500, count - start)
            block = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
            writer.append_block({"image": block, "label": np.arange(start, start + n)}, n)
        writer.commit({"by": "benchmarks/bench_overmem.py"})
    return out


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
loader = DataLoader(Memmap(), batch_size=256, shuffle=True, num_workers=2)
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    for b in loader:
        n += len(b)
        if time.perf_counter() - t0 > seconds: break
print(n / (time.perf_counter() - t0))
"""


def dataloader(pack: Path, count: int, cg: Cgroup, seconds: float) -> float:
    drop_caches()
    out = subprocess.run(
        [sys.executable, "-c", _LOADER, str(pack / "image.raw"), str(count), str(seconds)],
        capture_output=True, text=True, preexec_fn=cg.enter, timeout=seconds * 4 + 120,
        check=True,
    )  # fmt: skip
    return float(out.stdout.split()[-1])


@contextmanager
def server(data: Path, cg: Cgroup, args: list[str]) -> Iterator[str]:
    port = free_port()
    log = open(WORK / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [*_batchd_command(), "serve", "--data", str(data), "--port", str(port), *args],
        stdout=log, stderr=subprocess.STDOUT, preexec_fn=cg.enter,
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


def _trainer(url: str, seed: int, seconds: float, pack: Path | None, out: list[Any]) -> None:
    try:
        _train(url, seed, seconds, pack, out)
    except Exception as exc:  # reported by batchd() with the others' results
        out.append({"error": f"{type(exc).__name__}: {exc}"})


def _train(url: str, seed: int, seconds: float, pack: Path | None, out: list[Any]) -> None:
    from batchd import Client

    client = Client(url, "big", batch_size=BATCH, seed=seed, augment=AUGMENT, retry_deadline=10)
    n, first, epoch, t0 = 0, None, 0, time.perf_counter()
    checked = bad = 0
    shape = (_count(pack), SIZE, SIZE, 3) if pack else (0,)
    ref = np.memmap(pack / "image.raw", np.uint8, "r", shape=shape) if pack else None
    while time.perf_counter() - t0 < seconds:
        for batch in client.iterate(epoch):
            n += len(batch["index"])
            if first is None:
                first = time.perf_counter() - t0
            if ref is not None and checked < 64:  # the served crop is some crop of the pack's
                i, img = int(batch["index"][0]), batch["image"][0]
                src = np.asarray(ref[i])
                found = any(
                    np.array_equal(img, v[y : y + CROP, x : x + CROP])
                    for v in (src, src[:, ::-1])
                    for y in range(SIZE - CROP + 1)
                    for x in range(SIZE - CROP + 1)
                    if v[y, x, 0] == img[0, 0, 0]
                )
                checked, bad = checked + 1, bad + (not found)
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
    pack: Path, cg: Cgroup, seeds: list[int], seconds: float, args: list[str]
) -> dict[str, Any]:
    drop_caches()
    kills_before = cg.oom_kills()
    with server(pack.parent, cg, args) as url:
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
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError("; ".join(errors))
    images = sum(r["images"] for r in results)
    wall = max(r["s"] for r in results)
    disk, read = reads["disk"], reads["ready"] + reads["waited"]
    return {
        "images_per_s": images / wall,
        "first_batch_s": min(r["first_s"] or wall for r in results),
        "epochs": images / len(seeds) / _count(pack),
        # Each job (distinct seed) reads the pack once per epoch at best: 1.0 is ideal.
        "disk_bytes_over_pack_per_job_epoch": disk
        / max(1e-9, images / len(seeds) * len(set(seeds)) / _count(pack))
        / (pack / "image.raw").stat().st_size,
        # Of the bytes the gather read with preadv, the share read ahead in time; and
        # the share of the gather threads' time spent blocked on the disk.
        "read_hit_rate": reads["ready"] / read if read else None,
        "read_wait_share": reads["wait_s"] / (wall * max(1.0, reads["threads"])),
        "wrong_crops": sum(r["bad"] for r in results),
        "oom_kills": cg.oom_kills() - kills_before,
    }


def _count(pack: Path) -> int:
    return (pack / "image.raw").stat().st_size // (SIZE * SIZE * 3)


def run(count: int, seconds: float, share: float, reps: int) -> dict[str, Any]:
    problem = _cgroup_problem()
    if problem:
        return {"skipped": problem}
    pack = make_pack(count)
    size = (pack / "image.raw").stat().st_size
    cg = Cgroup("batchd_bench_overmem", int(size * share))
    report: dict[str, Any] = {
        "pack_bytes": size,
        "limit_bytes": cg.limit,
        "cache": "cold (drop_caches before each contender)",
        "runs": [],
    }
    contenders: dict[str, Callable[[], Any]] = {
        **{
            f"disk-qd{d}": (lambda d=d: disk_limit(pack / "image.raw", count, d, min(seconds, 8)))
            for d in (1, 4, 16, 64)
        },
        **{
            f"disk-direct-qd{d}": (
                lambda d=d: disk_limit(pack / "image.raw", count, d, min(seconds, 8), direct=True)
            )
            for d in (16, 64)
        },
        "dataloader-memmap": lambda: dataloader(pack, count, cg, seconds),
        "batchd-1": lambda: batchd(pack, cg, [1], seconds, []),
        "batchd-1-buffered": lambda: batchd(pack, cg, [1], seconds, ["--no-direct-reads"]),
        "batchd-2-seeds": lambda: batchd(pack, cg, [1, 2], seconds, []),
        "batchd-4-same": lambda: batchd(pack, cg, [1, 1, 1, 1], seconds, []),
    }
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
        return max(x for x in (value(run, n) for n in lines) if x == x)

    def total(name: str, key: str) -> int:
        return sum(int(v) for r in runs if (v := value(r, name, key)) == v)  # NaN: failed

    def med(f: Callable[[dict[str, Any]], float]) -> float:
        nums = [x for x in map(f, runs) if x == x]  # NaN: a contender that failed
        return statistics.median(nums) if nums else float("nan")

    return {
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=8000, help="images in the pack (8000: 1.5 GB)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--limit-share", type=float, default=0.4, help="cgroup limit / pack size")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    report = run(a.count, a.seconds, a.limit_share, a.reps)
    if a.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report.get("summary", report), indent=2))


if __name__ == "__main__":
    main()
