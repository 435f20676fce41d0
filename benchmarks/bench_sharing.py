"""Contender 6: several trainer processes on one machine, one server vs one loader each.

Configurations, each with 1, 2 and 4 concurrent trainer processes reading one epoch
of the 256x256 set (random crop 224 + flip, batch 256):

    batchd_same       every trainer runs the same job (same seed and epoch) against one server
    batchd_seeds      every trainer has its own seed, one server
    dataloader_cache  no server: each trainer a DataLoader with 2 workers over the
                      compressed JPEG bytes it caches in-process (read once at start-up)

The server listens on a unix socket, as trainers on the server's own host should use it,
so finished batches reach the trainers as shared-memory files (docs/protocol.md).

Trainers are separate processes that set up, then wait on a shared "go" file per
pass so their import and cache-filling time is not in the window; the aggregate rate is all
images delivered over (last end - first start). Server CPU is psutil's user+system
time of the server process across the window. Memory is the peak, sampled every
0.5 s, of the processes' proportional anonymous set (Pss_Anon, from
/proc/PID/smaps_rollup, so pages shared by forked workers count once) plus every byte of
the server's shared-memory directory (/dev/shm/batchd-PID-*: its cached batch bodies,
mapped by trainers or not, counted once), plus the dataset's page-cache residency
(mincore) at the end; summing plain RSS would count
a memory-mapped pack once per process and the page cache again, so the sum of RSS
is recorded too, but only as a reference.

Each trainer process reads the warm-up epoch and the timed ones (one process per
trainer per configuration, as a real trainer reads many epochs); the harness opens
each pass's window for all of them at once (see ``_passes``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # dev extra, no stubs installed

from ._data import ImageSet, ensure_packs
from ._harness import BenchConfig, BenchError, page_cache_bytes, serve, stat

__all__ = ["MODES", "run", "trainer_main"]

MODES: dict[str, str] = {
    "batchd_same": "batchd, same job",
    "batchd_seeds": "batchd, different seeds",
    "dataloader_cache": "DataLoader x2 each, in-process byte cache",
}
_AUGMENT: list[dict[str, Any]] = [
    {"op": "random_crop", "size": [224, 224]},
    {"op": "hflip", "p": 0.5},
]


# --- the trainer process -----------------------------------------------------------------
#
# A trainer reads several epochs (the warm-up pass, then the timed ones) in one process,
# as a real trainer does; before each it touches ``<dir>/ready-<t>-<j>`` and waits for
# ``<dir>/go-<j>``, then writes ``<dir>/out-<t>-<j>.json``. So every trainer of a
# configuration starts pass j together, and set-up (imports, filling a cache, forking
# DataLoader workers) stays outside the timed window.


def _wait_for(go: Path, limit_s: float) -> None:
    stop_at = time.monotonic() + limit_s
    while not go.exists():
        if time.monotonic() > stop_at:
            raise BenchError(f"no go signal ({go}) within {limit_s:.0f} s")
        time.sleep(0.002)


def _tree_cpu() -> float:
    """CPU seconds of this process and its live children (DataLoader workers)."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def _passes(args: argparse.Namespace, one_epoch: Callable[[int], int]) -> None:
    sync = Path(args.sync)
    for j, epoch in enumerate(args.epochs):
        (sync / f"ready-{args.index}-{j}").touch()
        _wait_for(sync / f"go-{j}", args.limit)
        cpu0, t0 = _tree_cpu(), time.time()
        n = one_epoch(epoch)
        t1 = time.time()
        result = {"images": n, "start": t0, "end": t1, "cpu_s": _tree_cpu() - cpu0}
        tmp = sync / f".out-{args.index}-{j}.json"
        tmp.write_text(json.dumps(result))
        tmp.rename(sync / f"out-{args.index}-{j}.json")


def _batchd_trainer(args: argparse.Namespace) -> None:
    import batchd

    client = batchd.Client(
        args.url, args.name, batch_size=args.batch_size, seed=args.seed, augment=_AUGMENT
    )
    _passes(args, lambda epoch: sum(int(b["index"].shape[0]) for b in client.iterate(epoch)))


class _CachedBytesDataset:
    """The JPEG bytes of every file, read once into this process; decode per sample."""

    def __init__(self, blobs: list[bytes], labels: list[int], crop: int) -> None:
        self.blobs, self.labels, self.crop = blobs, labels, crop

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import cv2
        import numpy as np

        from .bench_loaders import _augment, _worker_rng

        bgr = cv2.imdecode(np.frombuffer(self.blobs[i], np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise OSError(f"cv2.imdecode could not decode cached image {i}")
        rgb = np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)
        img = _augment(rgb, self.crop, _worker_rng)
        return {"image": img, "label": self.labels[i]}


def _dataloader_trainer(args: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import DataLoader

    from .bench_loaders import _seed_worker

    files = Path(args.files_list).read_text().splitlines()
    blobs = [Path(f).read_bytes() for f in files]  # the in-process cache of compressed bytes
    labels = [int(x) for x in Path(args.labels_list).read_text().split()]
    gen = torch.Generator()
    dataset: Any = _CachedBytesDataset(blobs, labels, 224)  # a map-style dataset, duck-typed
    loader: DataLoader[Any] = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=2,
        worker_init_fn=_seed_worker,
        persistent_workers=True,  # forked once, in the warm-up pass
        generator=gen,
        timeout=args.limit,
    )

    def one_epoch(epoch: int) -> int:
        gen.manual_seed(args.seed * 1_000_003 + epoch)
        return sum(int(b["label"].shape[0]) for b in loader)

    _passes(args, one_epoch)


def trainer_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="One sharing-benchmark trainer (started by run()).")
    p.add_argument("--trainer", choices=("batchd", "dataloader"), required=True)
    p.add_argument("--index", type=int, required=True, help="this trainer's number")
    p.add_argument("--sync", required=True, help="directory of the ready/go/out files")
    p.add_argument("--epochs", type=lambda s: [int(x) for x in s.split(",")], required=True)
    p.add_argument("--url", default="")
    p.add_argument("--name", default="")
    p.add_argument("--files-list", default="")
    p.add_argument("--labels-list", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=float, default=600.0)
    args = p.parse_args(argv)
    if args.trainer == "batchd":
        _batchd_trainer(args)
    else:
        _dataloader_trainer(args)


# --- memory --------------------------------------------------------------------------


def _smaps(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:  # the process ended between listing and reading
        pass
    return out


def _shm_bytes(server_pid: int) -> int:
    """Bytes of the batch bodies a server keeps in /dev/shm (see server/batchd_server/shm.py)."""
    total = 0
    for path in Path("/dev/shm").glob(f"batchd-{server_pid}-*/*"):
        try:
            total += path.stat().st_size
        except OSError:  # unlinked between listing and stat: evicted, no longer memory
            continue
    return total


class _MemorySampler:
    """Peak over time of the summed anonymous PSS of a process tree plus the server's
    shared-memory files, and of the summed RSS."""

    def __init__(self, roots: list[int], interval: float = 0.5, server: int | None = None) -> None:
        self.roots, self.interval, self.server = roots, interval, server
        self.peak_pss = self.peak_rss = self.peak_server_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _pids(self) -> list[int]:
        pids: list[int] = []
        for root in self.roots:
            try:
                proc = psutil.Process(root)
                pids.append(root)
                pids.extend(c.pid for c in proc.children(recursive=True))
            except psutil.Error:
                continue
        return pids

    def sample(self) -> None:
        pss = rss = 0
        shm = _shm_bytes(self.server) if self.server else 0
        for pid in self._pids():
            m = _smaps(pid)
            mine = m.get("Pss_Anon", 0)
            pss += mine
            rss += m.get("Rss", 0)
            if pid == self.server:
                self.peak_server_pss = max(self.peak_server_pss, mine + shm)
        self.peak_pss = max(self.peak_pss, pss + shm)
        self.peak_rss = max(self.peak_rss, rss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> _MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- the harness side ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Job:
    mode: str
    trainers: int
    url: str
    name: str
    server_pid: int | None
    cache_paths: tuple[Path, ...]
    """Files whose page-cache residency counts towards the configuration's memory."""


def _trainer_cmd(
    job: _Job, t: int, epochs: list[int], cfg: BenchConfig, sync: Path, lists: tuple[Path, Path]
) -> list[str]:
    # Same job: one seed for all. Different seeds: one per trainer, never reused.
    seed = 0 if job.mode == "batchd_same" else 1 + t + 1000 * epochs[0]
    return [
        sys.executable, "-m", "benchmarks.bench_sharing",
        "--trainer", "dataloader" if job.mode == "dataloader_cache" else "batchd",
        "--index", str(t), "--sync", str(sync), "--epochs", ",".join(map(str, epochs)),
        "--url", job.url, "--name", job.name,
        "--files-list", str(lists[0]), "--labels-list", str(lists[1]),
        "--seed", str(seed), "--batch-size", str(cfg.batch_size),
        "--limit", str(cfg.pass_timeout_s),
    ]  # fmt: skip


def _wait_files(paths: list[Path], procs: list[subprocess.Popen[bytes]], limit_s: float) -> None:
    stop_at = time.monotonic() + limit_s
    while not all(p.exists() for p in paths):
        dead = [i for i, p in enumerate(procs) if p.poll() is not None and p.returncode != 0]
        if dead:
            raise BenchError(f"trainers {dead} failed (exit status {procs[dead[0]].returncode})")
        if time.monotonic() > stop_at:
            missing = [p.name for p in paths if not p.exists()]
            raise BenchError(f"trainers did not write {missing} within {limit_s:.0f} s")
        time.sleep(0.005)


def _config(
    job: _Job, epochs: list[int], cfg: BenchConfig, lists: tuple[Path, Path]
) -> list[dict[str, Any]]:
    """Run ``len(epochs)`` passes of one configuration; return each pass's figures."""
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="batchd-share-") as tmp_s:
        sync = Path(tmp_s)
        procs: list[subprocess.Popen[bytes]] = []
        root = Path(__file__).resolve().parent.parent
        try:
            for t in range(job.trainers):
                cmd = _trainer_cmd(job, t, epochs, cfg, sync, lists)
                procs.append(subprocess.Popen(cmd, cwd=root))
            server = psutil.Process(job.server_pid) if job.server_pid else None
            roots = [p.pid for p in procs] + ([job.server_pid] if job.server_pid else [])
            for j in range(len(epochs)):
                ready = [sync / f"ready-{t}-{j}" for t in range(job.trainers)]
                _wait_files(ready, procs, cfg.pass_timeout_s)
                cpu0 = sum(server.cpu_times()[:4]) if server else 0.0
                with _MemorySampler(roots, server=job.server_pid) as mem:
                    (sync / f"go-{j}").touch()
                    done = [sync / f"out-{t}-{j}.json" for t in range(job.trainers)]
                    _wait_files(done, procs, cfg.pass_timeout_s)
                    mem.sample()
                cpu1 = sum(server.cpu_times()[:4]) if server else 0.0
                results = [json.loads(p.read_text()) for p in done]
                images = sum(r["images"] for r in results)
                window = max(r["end"] for r in results) - min(r["start"] for r in results)
                resident, _ = page_cache_bytes(job.cache_paths)
                out.append(
                    {
                        "images": images,
                        "images_per_s": images / window,
                        "server_cpu_s_per_1k": (cpu1 - cpu0) / images * 1000 if server else None,
                        "trainer_cpu_s_per_1k": sum(r["cpu_s"] for r in results) / images * 1000,
                        "memory_bytes": mem.peak_pss + resident,
                        "process_pss_bytes": mem.peak_pss,
                        "server_pss_bytes": mem.peak_server_pss if server else None,
                        "page_cache_bytes": resident,
                        "rss_sum_bytes": mem.peak_rss,
                        "load_avg_1m": os.getloadavg()[0],
                    }
                )
            for p in procs:
                p.wait(timeout=cfg.pass_timeout_s)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    return out


def _summarise(job: _Job, passes: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "mode": job.mode,
        "label": MODES[job.mode],
        "trainers": job.trainers,
        "images_per_pass": passes[0]["images"],
        "load_avg_1m": [p["load_avg_1m"] for p in passes],
    }
    for key in (
        "images_per_s",
        "server_cpu_s_per_1k",
        "trainer_cpu_s_per_1k",
        "memory_bytes",
        "process_pss_bytes",
        "server_pss_bytes",
        "page_cache_bytes",
        "rss_sum_bytes",
    ):
        vals = [p[key] for p in passes if p[key] is not None]
        row[key] = stat(vals).as_dict() if vals else None
    return row


def run(images: ImageSet, cfg: BenchConfig) -> Iterator[dict[str, Any]]:
    """Yield one summary row per (mode, trainer count): a warm-up pass, then ``repeats``."""
    ensure_packs(images)
    next_epoch = 0

    def epochs() -> list[int]:
        # Fresh epoch numbers for every pass: no server cache can carry over between passes.
        nonlocal next_epoch
        next_epoch += cfg.repeats + 1
        return list(range(next_epoch - cfg.repeats - 1, next_epoch))

    def row(job: _Job, lists: tuple[Path, Path]) -> dict[str, Any]:
        passes = _config(job, epochs(), cfg, lists)
        return _summarise(job, passes[1:])  # pass 0 warms the page cache, server and workers

    with tempfile.TemporaryDirectory(prefix="batchd-share-lists-") as tmp_s:
        lists = (Path(tmp_s) / "files.txt", Path(tmp_s) / "labels.txt")
        lists[0].write_text("\n".join(str(f) for f in images.files))
        lists[1].write_text(" ".join(str(int(x)) for x in images.labels))
        with serve(images.data_dir, uds=True) as server:
            for mode in ("batchd_same", "batchd_seeds"):
                for k in cfg.sharing_trainers:
                    job = _Job(
                        mode=mode,
                        trainers=k,
                        url=server.url,
                        name=images.name,
                        server_pid=server.pid,
                        cache_paths=(images.pack_dir,),
                    )
                    yield row(job, lists)
        for k in cfg.sharing_baseline_trainers:
            job = _Job(
                mode="dataloader_cache",
                trainers=k,
                url="",
                name="",
                server_pid=None,
                cache_paths=(images.files_dir,),
            )
            yield row(job, lists)


if __name__ == "__main__":
    trainer_main()
