"""Timing, servers and the environment record shared by every contender.

A measurement is one warm-up pass (it fills the page cache and starts worker pools;
its time is recorded but not used) followed by ``repeats`` timed passes; the report
shows the median with min and max. Every pass is a whole epoch of a fresh epoch
number, so a server cannot answer a repeat from the batches of the previous one.

Servers started here bind loopback only and always stop: :func:`serve` is a context
manager that terminates the process (then kills it) however the block exits.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchd_server.serve.metrics import resident_bytes

__all__ = [
    "BenchConfig",
    "BenchError",
    "Measurement",
    "Server",
    "Stat",
    "deadline",
    "environment",
    "free_port",
    "measure",
    "page_cache_bytes",
    "serve",
    "stat",
]


class BenchError(RuntimeError):
    """A benchmark that could not run (missing piece, timeout, failed subprocess)."""


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """Sizes and limits of one run; :data:`QUICK` and :data:`FULL` in ``__main__``."""

    mode: str
    n256: int
    """Images in the 256x256 set (random crop 224 + flip workload)."""
    n64: int
    """Images in the 64x64 set (flip-only workload)."""
    batch_size: int = 256
    repeats: int = 3
    workers: int = 2
    sharing_trainers: tuple[int, ...] = (1, 2, 4)
    sharing_baseline_trainers: tuple[int, ...] = (4,)
    """Trainer counts for the no-server baseline (4 independent DataLoaders)."""
    pass_timeout_s: float = 600.0
    """A single pass taking longer than this is a failure, not a slow result."""
    work_dir: Path = Path(__file__).parent / "_work"
    results_dir: Path = Path(__file__).parent / "results"

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.n256 < 1 or self.n64 < 1 or self.batch_size < 1:
            raise ValueError(f"BenchConfig: sizes and repeats must be >= 1, got {self}")


@dataclass(frozen=True, kw_only=True)
class Stat:
    """Median, min and max of repeated values."""

    median: float
    min: float
    max: float
    values: tuple[float, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "values": list(self.values),
        }


def stat(values: Iterable[float]) -> Stat:
    vals = tuple(float(v) for v in values)
    if not vals:
        raise BenchError("no values to summarise")
    return Stat(median=statistics.median(vals), min=min(vals), max=max(vals), values=vals)


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """Throughput of one contender on one workload."""

    contender: str
    workload: str
    label: str
    images_per_s: Stat
    images_per_pass: int
    warmup_s: float
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "contender": self.contender,
            "workload": self.workload,
            "label": self.label,
            "unit": "images/s",
            "images_per_s": self.images_per_s.as_dict(),
            "images_per_pass": self.images_per_pass,
            "warmup_s": self.warmup_s,
            "page_cache": "warm (one untimed warm-up pass first)",
            "notes": self.notes,
            **({"extra": self.extra} if self.extra else {}),
        }


def measure(
    *,
    contender: str,
    workload: str,
    label: str,
    run_pass: Callable[[int], int],
    repeats: int,
    notes: str = "",
) -> Measurement:
    """Time ``run_pass(epoch)`` (returns images delivered): one warm-up, then ``repeats``.

    The 1-minute load average before and after goes into ``extra``: on a shared machine
    it says how much the figures were disturbed by other work.
    """
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    warm_images = run_pass(0)
    warmup_s = time.perf_counter() - t0
    rates: list[float] = []
    for epoch in range(1, repeats + 1):
        t0 = time.perf_counter()
        images = run_pass(epoch)
        elapsed = time.perf_counter() - t0
        if images != warm_images:
            raise BenchError(
                f"{contender}/{workload}: pass {epoch} delivered {images} images, "
                f"the warm-up {warm_images}: the loader is not reading whole epochs"
            )
        rates.append(images / elapsed)
    return Measurement(
        contender=contender,
        workload=workload,
        label=label,
        images_per_s=stat(rates),
        images_per_pass=warm_images,
        warmup_s=warmup_s,
        notes=notes,
        extra={"load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0]},
    )


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`BenchError` in the main thread if the block runs past ``seconds``."""

    def _expired(signum: int, frame: Any) -> None:
        raise BenchError(f"{what} ran past its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- servers -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, kw_only=True)
class Server:
    url: str
    pid: int


def _batchd_command() -> list[str]:
    script = Path(sys.executable).with_name("batchd")
    if script.exists():
        return [str(script)]
    found = shutil.which("batchd")
    if found:
        return [found]
    return [sys.executable, "-c", "from batchd_server.cli import main; main()"]


def _healthy(url: str, timeout: float) -> bool:
    """True when ``GET /healthz`` answers 200 (http://host:port or unix:///path)."""
    import http.client
    import socket
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "localhost", parts.port, timeout=timeout)
    try:
        if parts.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.sock = sock  # owned by conn from here: conn.close() closes it
            sock.settimeout(timeout)
            sock.connect(parts.path)
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):  # not listening yet, refused, reset, timed out
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def serve(
    data_dir: Path, *, uds: bool = False, args: Sequence[str] = (), startup_s: float = 60.0
) -> Iterator[Server]:
    """Run ``batchd serve --data DIR ARGS`` for a block.

    On a free loopback port, or on a unix socket with ``uds``.
    """
    with contextlib.ExitStack() as stack:
        if uds:
            sock_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="batchd-")))
            path = sock_dir / "batchd.sock"
            where = ["--uds", str(path)]
            url = f"unix://{path}"
        else:
            port = free_port()
            where = ["--host", "127.0.0.1", "--port", str(port)]
            url = f"http://127.0.0.1:{port}"
        log = stack.enter_context(tempfile.TemporaryFile(prefix="batchd-serve-"))
        proc = subprocess.Popen(
            [*_batchd_command(), "serve", "--data", str(data_dir), *where, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            stop_at = time.monotonic() + startup_s
            while not _healthy(url, timeout=1.0):
                if proc.poll() is not None or time.monotonic() > stop_at:
                    log.seek(0)
                    tail = log.read()[-2000:].decode("utf-8", "replace")
                    state = "exited" if proc.poll() is not None else "did not answer /healthz"
                    raise BenchError(f"batchd serve {state} ({url}); its output:\n{tail}")
                time.sleep(0.1)
            yield Server(url=url, pid=proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


# --- page cache --------------------------------------------------------------------------


def _files(paths: Iterable[Path]) -> Iterator[Path]:
    for p in paths:
        if p.is_dir():
            yield from (q for q in sorted(p.rglob("*")) if q.is_file())
        elif p.is_file():
            yield p


def page_cache_bytes(paths: Iterable[Path]) -> tuple[int, int]:
    """(resident bytes, total bytes) of every file under ``paths``."""
    resident = total = 0
    for f in _files(paths):
        total += f.stat().st_size
        got = resident_bytes(f)  # the server's own /metrics measurement (mincore)
        if got is None:
            raise OSError(f"cannot measure the page-cache residency of {f} (mincore)")
        resident += got
    return resident, total


# --- environment -------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # an optional contender's library: absent is a fact to record
        return None
    return str(getattr(mod, "__version__", "unknown"))


def environment() -> dict[str, Any]:
    """Versions, CPU count, memory and load: the facts a reader needs to weigh the numbers."""
    import psutil  # type: ignore[import-untyped]  # dev extra, no stubs installed

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "memory_bytes": psutil.virtual_memory().total,
        "load_avg_at_start": list(os.getloadavg()),
        "versions": {
            name: _version(name)
            for name in ("numpy", "torch", "cv2", "keras", "batchd", "httpx", "matplotlib")
        },
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    env["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return env
