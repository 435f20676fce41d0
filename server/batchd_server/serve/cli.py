"""``batchd serve``: run the HTTP server over every pack under ``--data``.

Every option can also come from the environment as ``BATCHD_<OPTION>``
(``BATCHD_TOKEN``, ``BATCHD_PORT``, ...). uvicorn runs with uvloop and httptools;
SIGTERM (``docker stop``) drains in-flight requests for up to 10 s before exiting.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import re
import signal
from pathlib import Path
from typing import Any

import click

from batchd.wire import is_loopback_host

from ..errors import ConfigError

__all__ = ["parse_bytes", "serve"]

log = logging.getLogger("batchd.serve")

_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_IUNITS = {"ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)
_GRACEFUL_S = 10
_WARN_AT_MOST = 10  # folders that are not packs, one line each; then "and N more"


def parse_bytes(text: str | int) -> int:
    """``"512MiB"`` -> 536870912; plain integers are bytes. ValueError otherwise."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 1073741824, 512MiB, 2GiB, 500MB)")
    unit = (m.group(2) or "").lower()
    scale = _IUNITS.get(unit) or _UNITS[unit]
    return int(float(m.group(1)) * scale)


class _Bytes(click.ParamType):  # type: ignore[type-arg]
    name = "bytes"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return parse_bytes(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _config_with_guard(header_timeout: float) -> type[Any]:
    """uvicorn.Config whose httptools protocol bounds request heads (see protocol.py).

    A subclass rather than ``http=<class>`` keeps ``http="httptools"`` in the config:
    the protocol is swapped only where uvicorn resolved that name to its class.
    """
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from .guard import guarded

    class _Config(uvicorn.Config):
        def load(self) -> None:
            super().load()
            if self.http_protocol_class is HttpToolsProtocol:
                self.http_protocol_class = guarded(header_timeout)

    return _Config


def check_exposure(
    host: str, uds: Path | None, token: str | None, allow_unauthenticated: bool
) -> None:
    """Refuse to listen on a network without a token unless told to."""
    if uds is None and token is None and not allow_unauthenticated and not is_loopback_host(host):
        raise ConfigError(
            f"binding {host} without --token exposes every dataset under --data to the network; "
            "pass --token (or set BATCHD_TOKEN) or --allow-unauthenticated"
        )


@click.command("serve")
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    envvar="BATCHD_DATA",
    help="Folder whose subfolders are packs; each is served under its folder name.",
)
@click.option("--host", default="127.0.0.1", show_default=True, envvar="BATCHD_HOST")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8470, show_default=True, envvar="BATCHD_PORT"
)
@click.option(
    "--uds",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar="BATCHD_UDS",
    help="Listen on this unix socket instead of host:port.",
)
@click.option(
    "--shm/--no-shm",
    default=None,
    envvar="BATCHD_SHM",
    help="Hand batch bodies to clients on this host in /dev/shm instead of the socket  "
    "[default: on with --uds or a loopback --host; a --shm that other hosts could "
    "reach is an error]",
)
@click.option(
    "--shm-min-bytes",
    type=_Bytes(),
    default="1MiB",
    show_default=True,
    envvar="BATCHD_SHM_MIN_BYTES",
    help="Smaller bodies are sent over the socket even with --shm: for them a file and a "
    "mapping cost more than the copy they save.",
)
@click.option(
    "--token",
    default=None,
    envvar="BATCHD_TOKEN",
    help="Bearer token required on every route but /healthz.",
)
@click.option(
    "--allow-unauthenticated",
    is_flag=True,
    envvar="BATCHD_ALLOW_UNAUTHENTICATED",
    help="Allow a non-loopback --host without a token.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    envvar="BATCHD_THREADS",
    help="Worker threads for gathering and augmenting  [default: CPU count]",
)
@click.option(
    "--cache-bytes",
    type=_Bytes(),
    default=None,
    envvar="BATCHD_CACHE_BYTES",
    help="Finished batch bodies kept for other jobs and read-ahead  [default: 1/8 of the "
    "memory budget (the cgroup limit, else RAM), at most 512MiB: 13 batches of "
    "256x224x224x3; jobs that drift further apart recompute]",
)
@click.option(
    "--memory-budget",
    type=_Bytes(),
    default=None,
    envvar="BATCHD_MEMORY_BUDGET",
    help="Memory the server may count on, page cache of the packs included; sizes the "
    "caches and picks each pack's read path  [default: the cgroup memory limit, else RAM]",
)
@click.option(
    "--direct-reads/--no-direct-reads",
    default=True,
    envvar="BATCHD_DIRECT_READS",
    show_default=True,
    help="Read packs bigger than 3/4 of the memory budget past the page cache "
    "(O_DIRECT + native AIO: a batch's reads in flight at once, no page cache to fill "
    "and reclaim); --no-direct-reads reads them with preadv, announced ahead",
)
@click.option(
    "--readahead",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    envvar="BATCHD_READAHEAD",
    help="Batches computed ahead of each job's last request.",
)
@click.option(
    "--max-batch-bytes",
    type=_Bytes(),
    default="512MiB",
    show_default=True,
    envvar="BATCHD_MAX_BATCH_BYTES",
    help="Largest response body; bigger batches get 413.",
)
@click.option(
    "--max-inflight",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    envvar="BATCHD_MAX_INFLIGHT",
    help="Batches computing at once before new ones get 503 + Retry-After.",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    envvar="BATCHD_HEADER_TIMEOUT",
    help="Seconds a connection may take to send a request's headers (slowloris guard).",
)
@click.option(
    "--leases/--no-leases",
    default=True,
    show_default=True,
    envvar="BATCHD_LEASES",
    help="Read packs through their memory maps under a read lease, which keeps other "
    "processes from truncating them; where no lease is had, or with --no-leases, read "
    "with preadv (safe, slower; see docs/reliability.md).",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
    envvar="BATCHD_LOG_LEVEL",
)
@click.option(
    "--demo-if-empty",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar="BATCHD_DEMO_IF_EMPTY",
    help="If --data holds no pack at start, make the demo pack in this folder and serve it.",
)
def serve(
    data: Path,
    host: str,
    port: int,
    uds: Path | None,
    shm: bool | None,
    shm_min_bytes: int,
    token: str | None,
    allow_unauthenticated: bool,
    threads: int | None,
    cache_bytes: int | None,
    memory_budget: int | None,
    direct_reads: bool,
    readahead: int,
    max_batch_bytes: int,
    max_inflight: int,
    header_timeout: float,
    leases: bool,
    log_level: str,
    demo_if_empty: Path | None,
) -> None:
    """Serve shuffled, augmented batches of every pack under --data over HTTP."""
    import uvicorn

    from .app import create_app
    from .engine import Engine, EngineConfig
    from .memory import CGROUP
    from .memory import plan as memory_plan
    from .registry import Registry, check_root

    token = token or None  # BATCHD_TOKEN="" (an unset compose variable) means no token
    check_exposure(host, uds, token, allow_unauthenticated)
    check_root(data)  # a missing --data, or a pack given for its parent: before any log line
    same_host = uds is not None or is_loopback_host(host)
    if shm and not same_host:
        raise ConfigError(
            f"--shm with --host {host}: shared-memory bodies are for clients on this host, "
            "which only a unix socket (--uds PATH) or a loopback address (127.0.0.1, ::1) "
            "guarantees; drop --shm or bind one of those"
        )
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    memory = memory_plan(cache_bytes, memory_budget, direct_reads=direct_reads)
    log.info(
        "memory budget %d MiB (%s): batch cache %d MiB%s, idle body buffers %d MiB, "
        "read-ahead %d MiB per job; packs over 3/4 of the budget are read %s",
        memory.budget >> 20,
        memory.source,
        memory.cache_bytes >> 20,
        "" if cache_bytes is not None else " (auto; --cache-bytes to set)",
        memory.idle_body_bytes >> 20,
        memory.readahead_bytes >> 20,
        "past the page cache (O_DIRECT) where they can be" if direct_reads else "with preadv",
    )
    config = EngineConfig(
        threads=threads or os.cpu_count() or 1,
        cache_bytes=memory.cache_bytes,
        readahead=readahead,
        max_batch_bytes=max_batch_bytes,
        max_inflight=max_inflight,
    )
    # `kill -USR1 <pid>` prints every thread's stack to stderr: what a stuck server is doing.
    # No dump where stderr is not a file (serve run in-process, as the CLI tests do).
    with contextlib.suppress(AttributeError, OSError, ValueError):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    if leases:
        from ..format import lease

        lease.install()  # before any dataset opens: SIGIO's default action kills
    roots = [data]
    registry = Registry(data)
    if demo_if_empty is not None and not registry.datasets():
        from ..demo import ensure_demo_pack

        log.info("no pack under %s: making the demo pack in %s", data, demo_if_empty)
        ensure_demo_pack(demo_if_empty)
        roots.append(demo_if_empty)
        registry = Registry(*roots)
    entries = registry.entries()
    for entry in entries:
        if entry.pack and entry.dataset is None:
            log.warning("dataset %s unavailable: %s", entry.name, entry.error)
    not_packs = [e for e in entries if not e.pack]
    for entry in not_packs[:_WARN_AT_MOST]:
        log.warning("not serving %s: %s", entry.path, entry.error)
    if len(not_packs) > _WARN_AT_MOST:
        log.warning(
            "and %d more folders under --data that are not packs",
            len(not_packs) - _WARN_AT_MOST,
        )
    where = f"unix:{uds}" if uds else f"http://{host}:{port}"
    log.info(
        "batchd serving %d datasets from %s at %s (%d threads, auth %s)",
        len(registry.datasets()),
        ", ".join(map(str, roots)),
        where,
        config.threads,
        "on" if token else "off",
    )
    arena = None
    if same_host and shm is None and memory.source == CGROUP:
        shm = False
        log.info(
            "batch bodies go over the socket: in /dev/shm they would be charged to this "
            "cgroup's %d MiB and kept there while trainers map them (--shm to override)",
            memory.budget >> 20,
        )
    if same_host and shm is not False:
        from .shm import ShmArena

        arena = ShmArena(idle_bytes=memory.idle_body_bytes, min_bytes=shm_min_bytes)
        log.info(
            "batch bodies of %d bytes and more in shared memory under %s, at most %d files "
            "(--no-shm to turn off)",
            arena.min_bytes,
            arena.dir,
            arena.max_files,
        )
    engine = Engine(registry, config, shm=arena, memory=memory)
    app = create_app(engine, token=token)
    server = uvicorn.Server(
        _config_with_guard(header_timeout)(
            app,
            host=host,
            port=port,
            uds=str(uds) if uds else None,
            loop="uvloop",
            http="httptools",
            timeout_graceful_shutdown=_GRACEFUL_S,
            # One log format for the process (the basicConfig above): uvicorn's own
            # dictConfig would also close every handler other libraries installed.
            log_config=None,
            log_level=log_level,
            access_log=log_level == "debug",
            server_header=False,
        )
    )
    try:
        server.run()
    finally:
        if arena is not None:  # the lifespan closed it already unless start-up failed
            arena.close()
