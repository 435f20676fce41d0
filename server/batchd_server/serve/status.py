"""What the shared server is doing: live jobs, their progress, rate, ETA and data stall.

:class:`JobBoard` keeps, per live job, what ``GET /v1/status`` (and the page at ``/``
and ``batchd top`` built on it) reports. A *job* is what several trainers can share:
(dataset, seed, batch size, shuffle, drop_last, split, pipeline, rank/world); its
epoch is a column, not part of its name. Everything here runs on the event loop, so
nothing is locked; memory is bounded by :data:`MAX_LIVE_JOBS` and the windows below.

The figures, for one job:

* ``images_per_s``: sample rows answered to its trainers in the last :data:`RATE_S`
  seconds (several trainers on one job count once each);
* ``progress``: the furthest batch asked for in its current epoch (prefetch included,
  so a few batches ahead of training); ETA is what is left of the epoch at the rate
  at which new batches of it were first asked for;
* ``stall``: the share of the last :data:`WINDOW_S` seconds in which its trainers
  waited for batches rather than trained. Each batchd client sends the seconds it has
  waited in all (``X-Batchd-Wait``, docs/protocol.md); a trainer's stall is how fast
  that grows against the server's clock between its requests, and a job's is the mean
  over its trainers. Requests of one trainer can arrive out of order (its prefetch
  threads race), so a value below the last one is ignored. Generic HTTP clients send
  nothing: their stall is unknown (null).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import re
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batchd import __version__

from ..format import DECODERS, ReadStats
from .metrics import resident_share

if TYPE_CHECKING:
    from ..shuffle import EpochPlan
    from .engine import Engine
    from .registry import Entry
    from .request import BatchRequest

__all__ = [
    "MAX_LIVE_JOBS",
    "RATE_S",
    "WINDOW_S",
    "ClientMark",
    "CpuMeter",
    "JobBoard",
    "Overview",
    "client_mark",
    "job_label",
]

#: A job is live (listed) while one of its trainers asked for a batch this recently.
WINDOW_S = 60.0
#: images/s is measured over this many seconds.
RATE_S = 10.0
#: The sparkline: images/s per finished bucket of this many seconds ...
SPARK_BUCKET_S = 5.0
#: ... over this many buckets (five minutes).
SPARK_BUCKETS = 60
#: Jobs tracked at most (the least recently asked-for one is forgotten first).
MAX_LIVE_JOBS = 64
_MAX_CLIENTS = 256  # trainers remembered per job
_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def job_label(dataset: str, job: tuple[Any, ...]) -> str:
    """A short, stable label for a job (all of a batch's key but its index): /metrics' ``job``."""
    digest = hashlib.blake2b(repr(job).encode(), digest_size=4).hexdigest()
    return f"{dataset}:{digest}"


@dataclass(frozen=True, slots=True)
class ClientMark:
    """Who asked (a client id, or ``host:<address>`` for a generic client) and its wait."""

    client: str
    wait: float | None


def client_mark(client: str | None, wait: str | None, peer: str | None) -> ClientMark:
    """The mark of a request from its optional headers; malformed ones are ignored.

    The headers are advice for the status page, so a bad value never fails a batch.
    """
    who = client if client is not None and _CLIENT_ID.fullmatch(client) else None
    if who is None:
        who = f"host:{peer or 'local'}"
    seconds: float | None = None
    if wait is not None:
        try:
            seconds = float(wait)
        except ValueError:
            seconds = None
        if seconds is not None and not (math.isfinite(seconds) and 0 <= seconds < 1e12):
            seconds = None
    return ClientMark(who, seconds)


@dataclass(slots=True)
class _Trainer:
    seen: float
    waits: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=4096))

    def note(self, now: float, wait: float | None) -> None:
        self.seen = now
        if wait is None:
            return
        if self.waits and wait < self.waits[-1][1]:
            return  # sent before the last one (prefetch threads race): nothing new
        self.waits.append((now, wait))
        while len(self.waits) > 2 and self.waits[1][0] <= now - WINDOW_S:
            self.waits.popleft()  # keep one sample at or before the window's start

    def stall(self) -> float | None:
        if len(self.waits) < 2:
            return None
        (t0, w0), (t1, w1) = self.waits[0], self.waits[-1]
        if t1 - t0 < 0.2:
            return None
        return min(1.0, max(0.0, (w1 - w0) / (t1 - t0)))


@dataclass(slots=True)
class _Job:
    about: dict[str, Any]
    metrics_job: str
    epoch: int
    batch: int
    num_batches: int
    batch_size: int
    first: float
    last: float
    epoch_seen: float  # when its current epoch was last asked for
    served: deque[tuple[float, int]] = field(default_factory=deque)  # (time, rows) answered
    advanced: deque[float] = field(default_factory=deque)  # times a batch was first asked for
    asked: set[int] = field(default_factory=set)  # batches of this epoch asked for
    spark: dict[int, int] = field(default_factory=dict)  # bucket -> rows answered
    trainers: OrderedDict[str, _Trainer] = field(default_factory=OrderedDict)


class JobBoard:
    """Live jobs and their figures; :meth:`record` each answered batch, :meth:`jobs` to read."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._jobs: OrderedDict[tuple[Any, ...], _Job] = OrderedDict()

    def served(
        self,
        req: BatchRequest,
        plan: EpochPlan,
        augment: str,
        job: tuple[Any, ...],
        label: str,
        mark: ClientMark | None,
    ) -> None:
        """Note the answer to ``req`` (of ``plan``; ``job`` is its cache key less ``k``,
        ``label`` its :func:`job_label`)."""
        self.record(
            (req.dataset, *job[:2], *job[3:]),  # the job, whatever its epoch
            {
                "dataset": req.dataset,
                "seed": req.seed,
                "batch_size": req.batch_size,
                "shuffle": req.shuffle,
                "drop_last": req.drop_last,
                "rank": req.rank,
                "world_size": req.world_size,
                "split": req.split,
                "augment": augment,
            },
            metrics_job=label,
            epoch=req.epoch,
            k=req.k,
            num_batches=plan.num_batches,
            batch_size=req.batch_size,
            rows=min(req.batch_size, plan.samples_per_rank - req.k * req.batch_size),
            mark=mark,
        )

    def record(
        self,
        key: tuple[Any, ...],
        about: dict[str, Any],
        *,
        metrics_job: str,
        epoch: int,
        k: int,
        num_batches: int,
        batch_size: int,
        rows: int,
        mark: ClientMark | None,
    ) -> None:
        """Note batch ``k`` of ``epoch`` (``rows`` samples) answered for job ``key``."""
        now = self._clock()
        job = self._jobs.get(key)
        if job is None:
            job = _Job(about, metrics_job, epoch, -1, num_batches, batch_size, now, now, now)
            self._jobs[key] = job
            while len(self._jobs) > MAX_LIVE_JOBS:
                self._jobs.popitem(last=False)
        self._jobs.move_to_end(key)
        job.last = now
        # A later epoch starts progress again; so does an earlier one once nobody has
        # asked for the current epoch in a while (a trainer restarted from epoch 0).
        if epoch > job.epoch or (epoch < job.epoch and now - job.epoch_seen > RATE_S):
            job.epoch, job.batch, job.asked = epoch, -1, set()
        if epoch == job.epoch:
            job.epoch_seen = now
            job.num_batches, job.metrics_job = num_batches, metrics_job
            if k not in job.asked:
                job.asked.add(k)
                job.advanced.append(now)
            job.batch = max(job.batch, k)
        job.served.append((now, rows))
        bucket = int(now // SPARK_BUCKET_S)
        job.spark[bucket] = job.spark.get(bucket, 0) + rows
        if mark is not None:
            trainer = job.trainers.get(mark.client)
            if trainer is None:
                trainer = job.trainers[mark.client] = _Trainer(now)
                while len(job.trainers) > _MAX_CLIENTS:
                    job.trainers.popitem(last=False)
            job.trainers.move_to_end(mark.client)
            trainer.note(now, mark.wait)
        self._trim(job, now)

    @staticmethod
    def _trim(job: _Job, now: float) -> None:
        while job.served and job.served[0][0] <= now - WINDOW_S:
            job.served.popleft()
        while job.advanced and job.advanced[0] <= now - WINDOW_S:
            job.advanced.popleft()
        oldest = int(now // SPARK_BUCKET_S) - SPARK_BUCKETS
        for b in [b for b in job.spark if b <= oldest]:
            del job.spark[b]
        for cid in [c for c, t in job.trainers.items() if t.seen <= now - WINDOW_S]:
            del job.trainers[cid]

    def jobs(self) -> list[dict[str, Any]]:
        """Every job asked for in the last :data:`WINDOW_S` seconds, most recent first."""
        now = self._clock()
        out = []
        for key in [k for k, j in self._jobs.items() if j.last <= now - WINDOW_S]:
            del self._jobs[key]
        for job in reversed(self._jobs.values()):
            self._trim(job, now)
            out.append(self._describe(job, now))
        return out

    @staticmethod
    def _describe(job: _Job, now: float) -> dict[str, Any]:
        span = max(1.0, min(RATE_S, now - job.first))
        recent = sum(rows for t, rows in job.served if t >= now - RATE_S)
        first_asks = sum(1 for t in job.advanced if t >= now - RATE_S)
        batches_per_s = first_asks / span
        left = max(0, job.num_batches - 1 - job.batch)
        stalls = [s for s in (t.stall() for t in job.trainers.values()) if s is not None]
        bucket = int(now // SPARK_BUCKET_S)
        spark = [
            round(job.spark.get(b, 0) / SPARK_BUCKET_S, 1)
            for b in range(bucket - SPARK_BUCKETS, bucket)  # whole buckets: not the current one
        ]
        return {
            **job.about,
            "metrics_job": job.metrics_job,
            "epoch": job.epoch,
            "batch": job.batch,
            "num_batches": job.num_batches,
            "images_per_s": round(recent / span, 1),
            "eta_s": None if batches_per_s == 0 else round(left / batches_per_s, 1),
            "trainers": len(job.trainers),
            "stall": None if not stalls else round(sum(stalls) / len(stalls), 4),
            "idle_s": round(now - job.last, 1),
            "sparkline": spark,
        }


class CpuMeter:
    """The server process's CPU use (100 = one core busy) over the last few seconds."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._first = (time.monotonic(), _cpu_seconds())
        self._samples: deque[tuple[float, float]] = deque([self._first])

    def percent(self) -> float:
        now, cpu = time.monotonic(), _cpu_seconds()
        self._samples.append((now, cpu))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()
        t0, c0 = self._samples[0]
        if now - t0 < 0.25:  # asked again at once: the average since the meter began
            t0, c0 = self._first
        return round(100 * (cpu - c0) / max(now - t0, 1e-9), 1)


def _read_figures(st: ReadStats) -> dict[str, Any]:
    hit = st.hit_rate()
    return {
        "read_hit_rate": None if hit is None else round(hit, 4),
        "read_wait_s": round(st.wait_s, 3),
    }


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class Overview:
    """Builds the ``GET /v1/status`` document of one engine (datasets, jobs, server)."""

    def __init__(self, engine: Engine, *, resident_ttl_s: float = 5.0) -> None:
        self.engine = engine
        self.started = time.time()
        self.cpu = CpuMeter()
        self.resident_ttl_s = resident_ttl_s
        self._resident: dict[str, tuple[float, str, float | None]] = {}

    async def document(self) -> dict[str, Any]:
        """The whole status; file I/O (the registry scan, mincore) runs off the event loop."""
        datasets = await asyncio.to_thread(self._datasets)
        m = self.engine.metrics
        hits, misses = m.total(m.cache_hits), m.total(m.cache_misses)
        load = self.engine.load()
        return {
            "version": __version__,
            "time": round(time.time(), 3),
            "datasets": datasets,
            "jobs": self.engine.board.jobs(),
            "server": {
                "uptime_s": round(time.time() - self.started, 1),
                "cpu_percent": self.cpu.percent(),
                "cores": os.cpu_count() or 1,
                **load,
                "batches_served": int(m.total(m.batches)),
                "cache_hits": int(hits),
                "cache_misses": int(misses),
                "cache_hit_rate": None if hits + misses == 0 else round(hits / (hits + misses), 4),
                "announced_bytes": int(m.total(m.announced_bytes)),
                "responses_4xx": int(m.total(m.responses, status="4xx")),
                "responses_5xx": int(m.total(m.responses, status="5xx")),
                "decoders": dict(DECODERS),
                "shm": None if self.engine.shm is None else self.engine.shm.stats(),
            },
        }

    def _datasets(self) -> list[dict[str, Any]]:
        return [self._dataset(e) for e in self.engine.registry.entries()]

    def _dataset(self, entry: Entry) -> dict[str, Any]:
        ds = entry.dataset
        if ds is None:
            error = entry.error or "not a pack"
            return {"name": entry.name, "available": False, "error": self._inside(error)}
        now = time.monotonic()
        cached = self._resident.get(ds.name)
        if cached is None or cached[1] != ds.fingerprint or now - cached[0] > self.resident_ttl_s:
            cached = (now, ds.fingerprint, resident_share(ds))
            self._resident[ds.name] = cached
        encoded = any(f.encoding != "raw" for f in ds.fields.values())
        return {
            "name": ds.name,
            "available": True,
            "count": ds.count,
            "bytes": ds.nbytes,
            "storage": "encoded" if encoded else "raw",
            "fingerprint": ds.fingerprint,
            "resident": None if cached[2] is None else round(cached[2], 4),
            "reads": self._inside(ds.reads),
            **_read_figures(ds.read_stats),
        }

    def _inside(self, text: str) -> str:
        """``text`` with paths under --data made relative and any other path hidden."""
        roots = [str(r) for r in self.engine.registry.roots]

        def redact(m: re.Match[str]) -> str:
            path = m.group(0)
            for root in roots:
                if path == root or path.startswith(root.rstrip("/") + "/"):
                    return path[len(root) :].lstrip("/") or "."
            return "<path outside --data>"

        return _PATH.sub(redact, text)


_PATH = re.compile(r"(?<![\w.])/[^\s'\",:;()]+")
