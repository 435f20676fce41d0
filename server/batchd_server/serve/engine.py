"""Batch computation: request -> validated plan -> cached, single-flight, pooled gather.

A batch is a pure function of :class:`BatchRequest` and the dataset's fingerprint
(invariant 1), so finished bodies are cached and shared by key, and identical
concurrent requests are computed once (single-flight). Everything here runs on the
event loop except the CPU work, which goes to a :class:`~batchd_server.serve.pool.PriorityPool`:

* foreground work (a client is waiting) has priority 0 and submits all of a batch's
  row chunks at once, so one batch uses every thread (latency);
* read-ahead (batches k+1..k+d after a request for k) has priority 1 and submits one
  chunk at a time, so it only ever takes idle threads; if a client asks for a batch
  that is being read ahead, the rest of it is promoted to priority 0.

Chunks of rows are filled (:mod:`batchd_server.serve.fill`) straight into the response body
laid out by ``batchd.wire.layout`` in a recycled buffer, and the body is then sent
without another copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from batchd.buffers import Buffers
from batchd.wire import Layout, is_int

from ..augment import Pipeline
from ..errors import (
    BatchTooLarge,
    ConfigError,
    DatasetChanged,
    DatasetCorrupt,
    FormatError,
    InvalidPipeline,
    Overloaded,
    PipelineError,
    StaleError,
)
from ..format import Dataset
from ..shuffle import EpochPlan, permutation
from .cache import LRU, ByteLRU
from .fill import body_layout, filler, row_bytes, row_chunks, walks_alone
from .info import dataset_info
from .memory import MemoryPlan
from .memory import plan as memory_plan
from .metrics import Metrics, resident_share
from .peers import Peers
from .pool import ByteGate, PriorityPool
from .readahead import ReadAhead
from .registry import Registry
from .request import BatchRequest
from .shm import ShmArena
from .splits import SplitIds
from .status import ClientMark, JobBoard, job_label

__all__ = ["Engine", "EngineConfig", "Prepared", "Served"]

log = logging.getLogger("batchd.engine")

_FOREGROUND = 0
_READAHEAD = 1
_BODY_OVERHEAD = 64 * 1024  # msgpack headers and alignment pads of one body, generously
_ACTIVE_S = 10.0  # a job that asked for a batch this recently shares the read-ahead budget
_HOLD_S = 1.0  # the longest a trainer waits for its job's peers to catch up (peers.py)


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    """Server tuning; every value is validated here and named in the error."""

    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    cache_bytes: int = 512 << 20  # the page cache, not this, should hold the dataset
    readahead: int = 2
    max_batch_bytes: int = 512 << 20
    max_inflight: int = 64

    def __post_init__(self) -> None:
        for name, lo in (
            ("threads", 1),
            ("cache_bytes", 0),
            ("readahead", 0),
            ("max_batch_bytes", 1),
            ("max_inflight", 1),
        ):
            value = getattr(self, name)
            if not is_int(value) or value < lo:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be an int >= {lo}, got {value!r}"
                )


@dataclass(frozen=True, slots=True)
class Served:
    """A finished batch body and how it was obtained (cache ``hit``, ``miss``, ``join``)."""

    body: NDArray[np.uint8]
    source: Literal["hit", "miss", "join"]
    fingerprint: str
    num_batches: int
    cached: bool = False
    """The cache holds the body still, so it outlives this answer (a client may map it)."""


class _Flight:
    """One batch being computed; joiners await ``task``, promotion changes ``priority``."""

    __slots__ = ("priority", "task")

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.task: asyncio.Task[NDArray[np.uint8]]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated request: what to compute and under which key."""

    req: BatchRequest
    dataset: Dataset
    plan: EpochPlan
    pipeline: Pipeline
    out_fields: dict[str, tuple[np.dtype[Any], tuple[int, ...]]]
    key: tuple[Any, ...]
    job: tuple[Any, ...]
    split: NDArray[np.integer] | None = None
    """The split's pack ids; the plan's positions index it (None: the whole pack)."""


def _pack_ids(prep: Prepared, order: NDArray[np.integer] | None, k: int) -> NDArray[np.int64]:
    """Batch ``k``'s pack ids: the plan's positions index the split when there is one."""
    ids = prep.plan.batch_ids(order, k)
    return ids if prep.split is None else prep.split[ids].astype(np.int64)


class _Stale(Exception):
    """The pack changed on disk after it was looked up; look it up again."""


class Engine:
    """Validates batch requests and computes their bodies; one per server process."""

    def __init__(
        self,
        registry: Registry,
        config: EngineConfig | None = None,
        metrics: Metrics | None = None,
        *,
        shm: ShmArena | None = None,
        memory: MemoryPlan | None = None,
    ) -> None:
        self.registry = registry
        # Bodies in shared memory (a unix socket or loopback bind): the app may then
        # answer same-host clients with their path.
        self.shm = shm
        self.config = config or EngineConfig()
        self.metrics = metrics or Metrics(registry)
        self.memory = memory or memory_plan(self.config.cache_bytes)
        self._announcer = ReadAhead(resident_share, self.metrics.announced_bytes.inc)
        self._announced: LRU[tuple[Any, ...], int] = LRU(256)  # job -> last batch announced
        self._active: LRU[tuple[Any, ...], float] = LRU(256)  # job -> last request (monotonic)
        self._gate = ByteGate(self.memory.compute_bytes)
        for ds in registry.datasets():
            self.memory.place(ds)
        self._pool = PriorityPool(self.config.threads)
        self._cache: ByteLRU[tuple[Any, ...]] = ByteLRU(self.config.cache_bytes)
        # Bodies are laid out in recycled buffers: zeroing fresh pages for every
        # batch was a sixth of the server's CPU (clear_page in perf).
        self._bodies = Buffers(keep=64, idle_bytes=self.memory.idle_body_bytes)
        self._flights: dict[tuple[Any, ...], _Flight] = {}
        self._readahead_flights = 0
        self._pipelines: LRU[str, Pipeline] = LRU(256)
        self._out_fields: LRU[tuple[str, str], dict[str, tuple[np.dtype[Any], tuple[int, ...]]]]
        self._out_fields = LRU(256)
        self._orders: LRU[tuple[str, int, int, int], asyncio.Future[NDArray[np.integer]]]
        self._orders = LRU(8)
        self.split_ids = SplitIds(self._pool)
        self.board = JobBoard()  # live jobs for GET /v1/status
        self.peers = Peers()  # each trainer's place in its job, to keep them together
        self._taken = asyncio.Event()  # set (and replaced) whenever a batch is answered
        with contextlib.suppress(ImportError):  # one OpenCV thread per pool worker
            import cv2

            cv2.setNumThreads(1)

    def close(self) -> None:
        """Stop the workers and close the registry's datasets (the engine owns both)."""
        self._announcer.close()
        self._pool.shutdown()
        self.registry.close()
        if self.shm is not None:
            self.shm.close()

    @property
    def cache_bytes(self) -> int:
        return self._cache.nbytes

    # --- validation -------------------------------------------------------------

    def pipeline(self, text: str) -> Pipeline:
        """The parsed pipeline for ``text`` (cached by the raw text)."""
        found = self._pipelines.get(text)
        if found is None:
            try:
                found = Pipeline.parse(text)
            except PipelineError as exc:
                raise InvalidPipeline(exc) from None
            self._pipelines.put(text, found)
        return found

    def output_fields(
        self, ds: Dataset, pipeline: Pipeline
    ) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
        key = (ds.fingerprint, pipeline.canonical)
        found = self._out_fields.get(key)
        if found is None:
            try:
                raw = pipeline.output_fields(ds.fields)
            except PipelineError as exc:
                raise InvalidPipeline(exc) from None
            found = {
                n: (np.dtype(dt), tuple(int(s) for s in shape)) for n, (dt, shape) in raw.items()
            }
            self._out_fields.put(key, found)
        return found

    async def dataset(self, name: str) -> Dataset:
        # An open pack unchanged on disk is one scan of its folder, cheaper here than a
        # thread hop; a lookup that may rescan --data and open packs runs off the loop.
        ds = self.registry.current(name)
        if ds is None:
            ds = await asyncio.to_thread(self.registry.get, name)
        self.memory.place(ds)
        return ds

    def prepare(
        self, req: BatchRequest, ds: Dataset, split: NDArray[np.integer] | None = None
    ) -> Prepared:
        """``req`` checked against ``ds`` (pipeline, fields, body cap) and keyed; not its ``k``.

        ``split`` is the split's pack ids (None: the whole pack). A batch then checks
        ``req.k`` against the plan; ``GET /v1/datasets/{name}`` reports the plan.
        """
        pipeline = self.pipeline(req.augment)
        plan = req.plan(ds.count if split is None else len(split))
        out_fields = self.output_fields(ds, pipeline)
        per_sample = row_bytes(out_fields)
        cap = self.config.max_batch_bytes
        rows = min(req.batch_size, plan.samples_per_rank)  # a batch holds no more than that
        if _BODY_OVERHEAD + per_sample * rows > cap:
            fits = max(0, (cap - _BODY_OVERHEAD) // per_sample)
            raise BatchTooLarge(
                f"batch_size={req.batch_size} ({rows} samples) needs about {per_sample * rows} "
                "bytes per "
                f"body ({per_sample} per sample); this server caps a body at {cap} bytes "
                f"(--max-batch-bytes): use batch_size <= {fits}",
            )
        job = (
            ds.fingerprint,
            req.seed,
            req.epoch,
            req.shuffle,
            req.batch_size,
            req.drop_last,
            req.rank,
            req.world_size,
            pipeline.canonical,
            req.split_key,
        )
        return Prepared(req, ds, plan, pipeline, out_fields, (*job, req.k), job, split)

    # --- serving ----------------------------------------------------------------

    async def batch(self, req: BatchRequest, mark: ClientMark | None = None) -> Served:
        """The body of batch ``req.k``; raises a :class:`~batchd_server.errors.Rejected`.

        If the pack was replaced on disk under a computation, the request is answered
        from the re-opened pack (its fingerprint is in the body), never from a mix.
        ``mark`` (who asked, and how long it has waited) feeds :attr:`board`.
        """
        try:
            return await self._batch(req, mark)
        except _Stale:
            pass
        try:
            return await self._batch(req, mark)
        except _Stale as exc:
            raise DatasetChanged(
                f"dataset {req.dataset!r} keeps changing on disk ({exc}); retry when it is written",
            ) from None

    async def _batch(self, req: BatchRequest, mark: ClientMark | None) -> Served:
        ds = await self.dataset(req.dataset)
        prep = self.prepare(req, ds, await self.split_ids.ids(ds, req))
        req.check_k(prep.plan)
        label = job_label(req.dataset, prep.job)
        self.metrics.job_progress(label, req.k)
        client = None if mark is None else mark.client
        if client is not None and prep.key not in self._cache and prep.key not in self._flights:
            await self._keep_up(prep, client)
        source: Literal["hit", "miss", "join"]
        body = self._cache.get(prep.key)
        if body is not None:
            source = "hit"
            self.metrics.cache_hits.inc()
        else:
            self.metrics.cache_misses.inc()
            flight = self._flights.get(prep.key)
            if flight is not None:
                source = "join"
                self.metrics.singleflight_joins.inc()
                flight.priority = _FOREGROUND  # someone is waiting now: promote read-ahead
            else:
                source = "miss"
                # Distinct computations a client waits for (joiners and read-ahead are free).
                busy = sum(f.priority == _FOREGROUND for f in self._flights.values())
                if busy >= self.config.max_inflight:
                    raise Overloaded(
                        f"{busy} batches are computing (--max-inflight "
                        f"{self.config.max_inflight}); retry shortly"
                    )
                flight = self._start(prep, _FOREGROUND)
            # shield: a client that hangs up does not cancel work others may join.
            body = await asyncio.shield(flight.task)
        if client is not None:
            self.peers.served(prep.job, req.k, client, self._reach(prep))
            self._taken.set()
            self._taken = asyncio.Event()
        self._read_ahead(prep, client)
        await self._announce(prep)
        self.board.served(prep.req, prep.plan, prep.pipeline.canonical, prep.job, label, mark)
        cached = prep.key in self._cache
        return Served(body, source, ds.fingerprint, prep.plan.num_batches, cached)

    def _reach(self, prep: Prepared) -> int:
        """How many of ``prep``'s bodies the cache holds at once (at least one)."""
        return max(1, self._cache.capacity // max(1, self._body_bytes(prep)))

    async def _keep_up(self, prep: Prepared, client: str) -> None:
        """Hold ``client`` while its batch would push out bodies its job's peers still need.

        Only for a pack that does not fit the memory budget: there a body made again is
        read from disk again. The wait is at most :data:`_HOLD_S`; peers still behind
        then are let go (:class:`~.peers.Peers`).
        """
        if self._cache.capacity == 0 or self.memory.fits(prep.dataset.nbytes):
            return
        reach, start, held = self._reach(prep), time.monotonic(), False
        while behind := self.peers.behind(prep.job, prep.req.k, client, reach):
            held = True
            left = start + _HOLD_S - time.monotonic()
            if left <= 0:
                self.peers.let_go(prep.job, behind)
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._taken.wait(), left)
            if prep.key in self._cache or prep.key in self._flights:
                break  # a peer asked for it meanwhile: join it
        if held:
            self.metrics.peer_holds.inc()
            self.metrics.peer_hold_seconds.inc(time.monotonic() - start)

    def _wanted(self, key: tuple[Any, ...], body: NDArray[np.uint8]) -> bool:
        """Whether a trainer close behind in ``key``'s job has yet to take this body."""
        return self.peers.wanted(key[:-1], key[-1], max(1, self._cache.capacity // body.nbytes))

    def load(self) -> dict[str, int]:
        """How busy the engine is now: queued work, batches computing, cache and read-ahead."""
        return {
            "queued": self._pool.queued,
            "inflight": sum(f.priority == _FOREGROUND for f in self._flights.values()),
            "readahead_running": self._readahead_flights,
            "readahead_depth": self.config.readahead,
            "cache_bytes": self._cache.nbytes,
            "cache_capacity": self._cache.capacity,
            "threads": self.config.threads,
        }

    def _start(self, prep: Prepared, priority: int) -> _Flight:
        flight = _Flight(priority)
        flight.task = asyncio.get_running_loop().create_task(self._compute_into_cache(prep, flight))
        self._flights[prep.key] = flight
        flight.task.add_done_callback(lambda _t: self._flights.pop(prep.key, None))
        return flight

    async def _compute_into_cache(self, prep: Prepared, flight: _Flight) -> NDArray[np.uint8]:
        body = await self._compute(prep, flight)
        self._cache.put(prep.key, body, self._wanted)
        self.metrics.cache_bytes.set(self._cache.nbytes)
        return body

    async def _order(
        self, ds: Dataset, req: BatchRequest, count: int
    ) -> NDArray[np.integer] | None:
        if not req.shuffle:
            return None
        key = (ds.fingerprint, req.seed, req.epoch, count)  # count: of the split, or the pack
        fut = self._orders.get(key)
        if fut is None:
            # Computed once per (dataset, seed, epoch) and shared; the future itself is
            # cached so concurrent first requests wait for one computation.
            fut = self._pool.submit(_FOREGROUND, permutation, count, req.seed, req.epoch)
            self._orders.put(key, fut)
        try:
            return await asyncio.shield(fut)
        except Exception:
            self._orders.pop(key)  # never cache a failure
            raise

    async def _compute(self, prep: Prepared, flight: _Flight) -> NDArray[np.uint8]:
        # Under a small memory budget, a trainer's prefetch must not make the server
        # hold more bodies than it may: further computations wait their turn.
        async with self._gate.hold(self._body_bytes(prep)):
            return await self._compute_body(prep, flight)

    async def _compute_body(self, prep: Prepared, flight: _Flight) -> NDArray[np.uint8]:
        # Each hand-off to the pool and back costs ~120 µs of CPU on 2 cores (two thread
        # wake-ups): a batch in one chunk takes two, check + layout and fill + seal.
        req, ds = prep.req, prep.dataset
        order = await self._order(ds, req, prep.plan.count)
        ids = _pack_ids(prep, order, req.k)
        submit = functools.partial(self._pool.submit, flight.priority)
        if self._announcer.needed(ds) and self._last_announced(prep.job) < req.k:
            # Not announced ahead (the first batch of a job, or it jumped): every read
            # of this batch queued at once, not two at a time by the gather threads.
            await submit(self._announce_now, ds, ids)
        try:
            lay: Layout = await submit(self._lay_out, prep, ids)
        except FormatError as exc:
            self.registry.invalidate(req.dataset)
            raise _Stale(str(exc)) from None
        fill = filler(ds, prep.pipeline, ids, req.seed, req.epoch, lay.fields)
        parts = 1 if walks_alone(ds, prep.pipeline) else self.config.threads
        chunks = row_chunks(len(ids), parts)
        last: tuple[int, int] | None = chunks[-1]
        try:
            if flight.priority == _FOREGROUND and len(chunks) > 1:  # all at once, then seal
                await asyncio.gather(*(submit(fill, a, b) for a, b in chunks))
                last = None
            else:  # one chunk at a time: background work never holds every thread
                for a, b in chunks[:-1]:
                    await submit(fill, a, b)
            body: NDArray[np.uint8] = await submit(self._finish, ds, ids, fill, last, lay)
            return body
        except PipelineError as exc:  # per-sample: e.g. an encoded image smaller than a crop
            raise InvalidPipeline(exc) from None
        except StaleError as exc:
            # A short read: the pack was truncated or rewritten under us after check().
            # Re-open it and retry once (batch()), never serve a partial body (issue 7).
            self.registry.invalidate(req.dataset)
            raise _Stale(str(exc)) from None
        except FormatError as exc:
            raise DatasetCorrupt(
                f"dataset {req.dataset!r} cannot be read: {exc.problem}; run `batchd verify` "
                "on the server and repack it",
            ) from None

    def _lay_out(self, prep: Prepared, ids: NDArray[np.int64]) -> Layout:
        """The body of ``prep``'s batch laid out (ids written), once the pack is checked."""
        prep.dataset.check()  # FormatError if it changed on disk: nothing allocated yet
        alloc = self.shm.allocate if self.shm is not None else self._bodies.take
        lay = body_layout(prep.req, prep.dataset.fingerprint, len(ids), prep.out_fields, alloc)
        lay.index[:] = ids
        return lay

    def _finish(
        self,
        ds: Dataset,
        ids: NDArray[np.int64],
        fill: Callable[[int, int], None],
        rows: tuple[int, int] | None,
        lay: Layout,
    ) -> NDArray[np.uint8]:
        """The last rows of a batch (if any left), then its body as served (sealed)."""
        if rows is not None:
            fill(*rows)
        if not self.memory.fits(ds.nbytes) and ds.buffered:  # drop behind: room to read ahead
            ds.dontneed(ids)
        if self.shm is not None:  # into its shared-memory file; the scratch is recycled
            return self.shm.seal(lay.body)
        return lay.body

    def _read_ahead(self, prep: Prepared, client: str | None) -> None:
        limit = max(1, self.config.readahead) * max(1, self.config.threads)
        # A body computed ahead waits in the cache: more of them than it holds would be
        # evicted before their request, and each costs a body of memory while computing.
        limit = min(limit, self._reach(prep))
        for j in range(
            prep.req.k + 1, min(prep.req.k + 1 + self.config.readahead, prep.plan.num_batches)
        ):
            key = (*prep.job, j)
            if key in self._cache or key in self._flights:
                continue
            if self._readahead_flights >= limit or self._cache.capacity == 0:
                return
            if (
                client is not None
                and not self.memory.fits(prep.dataset.nbytes)
                and self.peers.behind(prep.job, j, client, self._reach(prep))
            ):
                return  # it would push out what the job's slower trainers still need
            nxt = Prepared(
                dataclasses.replace(prep.req, k=j),
                prep.dataset,
                prep.plan,
                prep.pipeline,
                prep.out_fields,
                key,
                prep.job,
                prep.split,
            )
            self._readahead_flights += 1
            self.metrics.readahead.inc()
            flight = self._start(nxt, _READAHEAD)
            flight.task.add_done_callback(self._readahead_done)

    def _last_announced(self, job: tuple[Any, ...]) -> int:
        got = self._announced.get(job)
        return -1 if got is None else got

    def _announce_now(self, ds: Dataset, ids: NDArray[np.int64]) -> None:
        self.metrics.announced_bytes.inc(ds.willneed(ids))

    async def _announce(self, prep: Prepared) -> None:
        """Announce the samples of the job's next batches, within the read-ahead budget."""
        ds, req = prep.dataset, prep.req
        if not self._announcer.needed(ds):
            return
        per_batch = max(1, ds.nbytes // max(1, ds.count) * req.batch_size)
        now = time.monotonic()
        self._active.put(prep.job, now)
        jobs = sum(1 for seen in self._active.values() if now - seen < _ACTIVE_S)
        depth = max(1, self.memory.readahead_bytes // max(1, jobs) // per_batch)
        last = min(req.k + depth, prep.plan.num_batches - 1)
        start = max(req.k + 1, self._last_announced(prep.job) + 1)
        if start > last:
            return
        order = await self._order(ds, req, prep.plan.count)
        for j in range(start, last + 1):
            self._announcer.submit(ds, j - req.k, _pack_ids(prep, order, j))
        self._announced.put(prep.job, last)

    @staticmethod
    def _body_bytes(prep: Prepared) -> int:
        return row_bytes(prep.out_fields) * prep.req.batch_size

    def _readahead_done(self, task: asyncio.Task[Any]) -> None:
        self._readahead_flights -= 1
        if not task.cancelled() and task.exception() is not None:
            log.warning("read-ahead failed: %s", task.exception())

    # --- info -------------------------------------------------------------------

    async def list(self) -> list[dict[str, Any]]:
        entries = await asyncio.to_thread(self.registry.entries)
        for e in entries:
            if e.dataset is not None:
                self.memory.place(e.dataset)
        return [e.describe() for e in entries]

    async def info(self, name: str, **plan: Any) -> dict[str, Any]:
        """Dataset facts, and with parameters its epoch plan (:func:`.info.dataset_info`)."""
        return await dataset_info(self, name, **plan)
