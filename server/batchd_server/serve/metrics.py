"""Prometheus metrics of one server process (``GET /metrics``).

Each :class:`Metrics` has its own ``CollectorRegistry`` so several engines can live in
one process (tests) without clashing. Label cardinality is bounded: datasets are
whatever is under ``--data``, and per-job progress keeps only the most recent
:data:`MAX_JOBS` jobs (older labels are removed).

Resident bytes are measured with ``mincore(2)`` at scrape time: each data file is
mapped afresh (read-only, never touched) and the kernel reports which of its pages
sit in the page cache. Page-cache residency belongs to the file, not the mapping, so
this is what the server's own mappings would find. Where ``mincore`` is unavailable
(not Linux), the metric is left out.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from ..format import Dataset
    from .registry import Registry

__all__ = [
    "MAX_JOBS",
    "Metrics",
    "dataset_resident_bytes",
    "disk_read_bytes",
    "resident_bytes",
    "resident_share",
]

#: Jobs (dataset, seed, epoch, batch parameters, pipeline) whose progress is exported.
MAX_JOBS = 64

_PAGE = mmap.PAGESIZE
_libc: Any = None
with contextlib.suppress(OSError, AttributeError):
    _lib = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _lib.mmap.restype = ctypes.c_void_p
    _lib.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    _lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    _libc = _lib


def resident_bytes(path: str | Path) -> int | None:
    """Bytes of ``path`` in the page cache, or None if it cannot be measured here."""
    if _libc is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = (size + _PAGE - 1) // _PAGE
            vec = ctypes.create_string_buffer(pages)
            if _libc.mincore(addr, size, vec) != 0:
                return None
            resident = int(np.count_nonzero(np.frombuffer(memoryview(vec), np.uint8, pages) & 1))
        finally:
            _libc.munmap(addr, size)
        return min(resident * _PAGE, size)
    finally:
        os.close(fd)


class _ResidentCollector:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fam = GaugeMetricFamily(
            "batchd_dataset_resident_bytes",
            "Bytes of the dataset's files in the OS page cache (mincore)",
            labels=["dataset"],
        )
        for ds in self.registry.datasets():
            got = dataset_resident_bytes(ds)
            if got is not None:
                fam.add_metric([ds.name], float(got))
        yield fam

    def describe(self) -> list[Any]:
        return []


def dataset_resident_bytes(ds: Dataset) -> int | None:
    """Bytes of ``ds``'s data files in the page cache, or None if it cannot be told."""
    total = 0
    for fname in ds.header["files"]:
        got = resident_bytes(ds.path / fname)
        if got is None:
            return None
        total += got
    return total


def resident_share(ds: Dataset) -> float | None:
    """The share of ``ds``'s data files in the page cache, or None if it cannot be told."""
    got = dataset_resident_bytes(ds)
    if got is None:
        return None
    return got / ds.nbytes if ds.nbytes else 1.0


def disk_read_bytes() -> int | None:
    """Bytes this process caused to be read from storage (``read_bytes`` of /proc/self/io)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


class _ReadStatsCollector:
    """What each pack's ``preadv`` reads found ready in the page cache or waited for."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[CounterMetricFamily]:
        ready = CounterMetricFamily(
            "batchd_read_ready_bytes",
            "Bytes read with preadv that were already in the page cache (read ahead in time)",
            labels=["dataset"],
        )
        waited = CounterMetricFamily(
            "batchd_read_waited_bytes",
            "Bytes read with preadv that a gather thread had to wait on storage for",
            labels=["dataset"],
        )
        wait = CounterMetricFamily(
            "batchd_read_wait_seconds",
            "Time gather threads spent blocked on storage reads (summed over threads)",
            labels=["dataset"],
        )
        for ds in self.registry.datasets():
            st = ds.read_stats
            ready.add_metric([ds.name], float(st.ready_bytes))
            waited.add_metric([ds.name], float(st.waited_bytes))
            wait.add_metric([ds.name], st.wait_s)
        yield ready
        yield waited
        yield wait

    def describe(self) -> list[Any]:
        return []


class _DiskReadCollector:
    def collect(self) -> Iterator[CounterMetricFamily]:
        got = disk_read_bytes()
        if got is not None:
            fam = CounterMetricFamily(
                "batchd_disk_read_bytes",
                "Bytes the server read from storage, read-ahead included (/proc/self/io); "
                "per epoch, compare with the pack's size (1.0 is every byte read once)",
            )
            fam.add_metric([], float(got))
            yield fam

    def describe(self) -> list[Any]:
        return []


class Metrics:
    """Counters the engine and the app update; :meth:`render` gives the Prometheus text."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.batches = Counter("batchd_batches_served", "Batches answered", ["dataset"], registry=r)
        self.bytes = Counter(
            "batchd_bytes_served", "Batch body bytes answered", ["dataset"], registry=r
        )
        self.latency = Histogram(
            "batchd_batch_latency_seconds",
            "Time from request to body ready, per batch",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.cache_hits = Counter(
            "batchd_cache_hits", "Batches answered from the cache", registry=r
        )
        self.cache_misses = Counter(
            "batchd_cache_misses", "Batches not in the cache (computed or joined)", registry=r
        )
        self.singleflight_joins = Counter(
            "batchd_singleflight_joins",
            "Requests that waited for an identical batch already computing",
            registry=r,
        )
        self.readahead = Counter(
            "batchd_readahead_started", "Batches computed ahead of their request", registry=r
        )
        self.announced_bytes = Counter(
            "batchd_readahead_announced_bytes",
            "Pack bytes announced to the kernel ahead of need (posix_fadvise WILLNEED)",
            registry=r,
        )
        self.peer_holds = Counter(
            "batchd_peer_holds",
            "Requests held so that a job's slower trainers take the bodies it would push out",
            registry=r,
        )
        self.peer_hold_seconds = Counter(
            "batchd_peer_hold_seconds",
            "Seconds requests were held for their job's slower trainers",
            registry=r,
        )
        self.cache_bytes = Gauge(
            "batchd_cache_bytes", "Bytes of finished batch bodies held in the cache", registry=r
        )
        self.rejected = Counter(
            "batchd_requests_rejected", "Requests answered with an error", ["error"], registry=r
        )
        self.responses = Counter(
            "batchd_http_responses",
            "HTTP answers by status class (2xx, 3xx, 4xx, 5xx)",
            ["status"],
            registry=r,
        )
        self.progress = Gauge(
            "batchd_job_last_batch",
            f"Furthest batch index requested per job (the {MAX_JOBS} most recent jobs)",
            ["job"],
            registry=r,
        )
        self._jobs: OrderedDict[str, int] = OrderedDict()  # job -> furthest batch
        self._jobs_lock = threading.Lock()
        if registry is not None:
            r.register(_ResidentCollector(registry))
            r.register(_ReadStatsCollector(registry))
        r.register(_DiskReadCollector())

    def job_progress(self, job: str, k: int) -> None:
        """Note batch ``k`` asked for by ``job``. The gauge keeps the furthest: a client's
        prefetched requests may reach the server out of order."""
        with self._jobs_lock:
            k = max(k, self._jobs.get(job, -1))
            self._jobs[job] = k
            self._jobs.move_to_end(job)
            while len(self._jobs) > MAX_JOBS:
                old, _ = self._jobs.popitem(last=False)
                with contextlib.suppress(KeyError):
                    self.progress.remove(old)
            self.progress.labels(job).set(k)

    @staticmethod
    def total(counter: Counter, **labels: str) -> float:
        """``counter``'s ``_total`` as /metrics shows it, summed over the labels not given.

        Read from the counter itself: the registry's collectors would also run mincore.
        """
        return float(
            sum(
                sample.value
                for family in counter.collect()
                for sample in family.samples
                if sample.name.endswith("_total")
                and all(sample.labels.get(k) == v for k, v in labels.items())
            )
        )

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
