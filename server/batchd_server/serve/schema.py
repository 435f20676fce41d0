"""The ``GET /v1/status`` document, as OpenAPI declares it (built by :mod:`.status`)."""

from __future__ import annotations

from pydantic import BaseModel, Field

__all__ = ["DatasetStatus", "JobStatus", "ServerStatus", "ShmStatus", "Status"]


class DatasetStatus(BaseModel):
    """A folder under --data: a pack and its figures, or why it cannot be served."""

    name: str
    available: bool
    error: str | None = Field(None, description="why it is unavailable (paths relative to --data)")
    count: int | None = Field(None, description="samples in the pack")
    bytes: int | None = Field(None, description="bytes of its data files")
    storage: str | None = Field(None, description="raw, or encoded if any field is")
    fingerprint: str | None = None
    resident: float | None = Field(
        None, description="share of its data files in the page cache (mincore), 0..1"
    )
    reads: str | None = Field(None, description="mapped (read lease) or preadv (why)")
    read_hit_rate: float | None = Field(
        None,
        description="share of the bytes read with preadv that were already in the page cache "
        "(read ahead in time), 0..1; null before any preadv read",
    )
    read_wait_s: float | None = Field(
        None, description="seconds gather threads spent blocked on storage reads, summed"
    )


class JobStatus(BaseModel):
    """A job asked for in the last minute; several trainers may share it."""

    dataset: str
    seed: int
    batch_size: int
    shuffle: bool
    drop_last: bool
    rank: int
    world_size: int
    split: str | None
    augment: str = Field(description="the pipeline, canonical JSON")
    metrics_job: str = Field(description="its label in /metrics (batchd_job_last_batch)")
    epoch: int = Field(description="the latest epoch asked for")
    batch: int = Field(description="the furthest batch of that epoch asked for, 0-based")
    num_batches: int
    images_per_s: float = Field(description="rows answered to its trainers, last 10 s")
    eta_s: float | None = Field(description="seconds to the end of the epoch at the current rate")
    trainers: int = Field(description="distinct clients in the last minute")
    stall: float | None = Field(
        description="share of the last minute its trainers waited for batches, 0..1; "
        "null when no client sent X-Batchd-Wait"
    )
    idle_s: float = Field(description="seconds since its last request")
    sparkline: list[float] = Field(description="images/s per 5 s over the last 5 minutes")


class ShmStatus(BaseModel):
    """Shared-memory body files (docs/protocol.md, "Shared-memory bodies")."""

    files: int = Field(description="body files now, free ones included")
    free: int = Field(description="files waiting to be recycled")
    lent: int = Field(description="answers naming a file whose client has not released it")
    new: int = Field(description="bodies written to a new file so far")
    recycled: int = Field(description="bodies gathered straight into a recycled file so far")


class ServerStatus(BaseModel):
    """The process: load, cache, read-ahead and answers."""

    uptime_s: float
    cpu_percent: float = Field(description="CPU use over the last seconds, 100 = one core")
    cores: int
    threads: int
    queued: int = Field(description="work items waiting for a thread")
    inflight: int = Field(description="batches computing that a client waits for")
    readahead_running: int
    readahead_depth: int
    cache_bytes: int
    cache_capacity: int
    batches_served: int
    cache_hits: int
    cache_misses: int
    cache_hit_rate: float | None
    announced_bytes: int = Field(description="pack bytes announced to the kernel ahead")
    responses_4xx: int
    responses_5xx: int
    decoders: dict[str, str] = Field(
        description="the library (and version) decoding encoded images: jpeg, other"
    )
    shm: ShmStatus | None = Field(description="null where bodies are not in shared memory")


class Status(BaseModel):
    """What the server is doing: the page at / and `batchd top` show exactly this."""

    version: str
    time: float = Field(description="server time, seconds since the epoch")
    datasets: list[DatasetStatus]
    jobs: list[JobStatus]
    server: ServerStatus
