"""HTTP/1.1 over persistent connections, reading bodies straight into numpy buffers.

One transport for every request (JSON and batches). ``http.client`` with
``HTTPResponse.readinto`` fills a numpy buffer in place, so a 38 MB body is never
copied after the socket read. Faulting in fresh memory costs about a third of the
receive time on loopback, so large bodies land in buffers that are recycled once
nothing views them any more (:class:`~batchd._buffers.Buffers`): a batch the caller still holds is
never overwritten. ``benchmarks/bench_receive.py`` has the measurements.

Failure model::

    connect error, reset, truncated body, timeout  ─┐
    502 / 503 / 504 (Retry-After honoured)          ─┴─▶ retry: exponential backoff with full
                                                         jitter, another URL first when one is
                                                         healthy, until ``retry_deadline``;
                                                         then TransportError / UnavailableError
    401/403, 404, 413, other 4xx                      ──▶ AuthError, NotFoundError, TooLargeError,
                                                         RequestError at once (retrying cannot help)

A URL that fails is skipped for ``cooldown`` seconds while another one is healthy.

Same-host fast path: to a server on this host (a ``unix://`` endpoint, or ``http://``
to ``localhost``, 127.0.0.0/8 or ``[::1]``) a batch request carries ``X-Batchd-Shm: 1``,
and a server that keeps its bodies in shared memory (``--shm``, its default on a unix
socket or a loopback address) answers ``application/x-batchd-shm+json`` naming the
shared-memory file that holds the finished body instead of sending it. The file is
mapped copy-on-write (``MAP_PRIVATE``): no byte crosses the socket, pages are shared
with the server and the other trainers, and the arrays stay writable (a write copies
that page only).
A file the server dropped meanwhile (``ENOENT``) or of the wrong size is asked for
again without the header, once; a path outside /dev/shm, a symlink, a non-regular
file or one not owned by the server's user (:func:`batchd._peer.peer_uid`) is refused
(:class:`WireError`); where that user cannot be found, no body is mapped.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import mmap
import os
import random
import socket
import stat
import threading
import time
import urllib.parse
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._buffers import Buffers
from ._exceptions import (
    AuthError,
    NotFoundError,
    RequestError,
    ServerError,
    TooLargeError,
    TransportError,
    UnavailableError,
    WireError,
)
from ._peer import is_loopback_host, peer_uid

__all__ = [
    "SHM_MEDIA",
    "Cancel",
    "Cancelled",
    "Endpoint",
    "Response",
    "Transport",
    "map_shm_body",
    "parse_url",
]

_RETRY_STATUSES = frozenset({502, 503, 504})
_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 2.0
_USER_AGENT = "batchd-client/1"
#: What a dropped, reset, truncated or timed-out exchange raises; all of it is retried.
_NETWORK_ERRORS = (OSError, http.client.HTTPException)
SHM_MEDIA = "application/x-batchd-shm+json"
_SHM_ROOT = "/dev/shm/"
_SHM_HEADER = "X-Batchd-Shm"


@dataclass(frozen=True, kw_only=True, slots=True)
class Endpoint:
    """One server address: ``http://host:port[/prefix]``, ``https://...`` or ``unix:///path``."""

    url: str
    scheme: str
    host: str
    port: int | None
    prefix: str
    unix_path: str | None = None
    same_host: bool = False
    """A unix socket or plain HTTP to a loopback address: shared-memory bodies may be asked for."""


def parse_url(url: str) -> Endpoint:
    """Parse a server URL, or ValueError naming what is wrong with it."""
    if not isinstance(url, str) or not url:
        raise ValueError(
            f"server URL {url!r} must be a non-empty string like http://127.0.0.1:8000"
        )
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        path = urllib.parse.unquote(parts.path)
        if parts.netloc or not path.startswith("/"):
            raise ValueError(
                f"unix socket URL {url!r} must be absolute with three slashes: unix:///path/to.sock"
            )
        return Endpoint(
            url=url,
            scheme="unix",
            host="localhost",
            port=None,
            prefix="",
            unix_path=path,
            same_host=True,
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"server URL {url!r} is not supported: use http://host:port, https://host:port "
            "or unix:///path/to.sock"
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"server URL {url!r} has an invalid port") from exc
    if parts.query or parts.fragment:
        raise ValueError(f"server URL {url!r} must not carry a query or fragment")
    return Endpoint(
        url=url,
        scheme=parts.scheme,
        host=parts.hostname,
        port=port,
        prefix=parts.path.rstrip("/"),
        same_host=parts.scheme == "http" and is_loopback_host(parts.hostname),
    )


class _UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a unix domain socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _connect(ep: Endpoint, timeout: float) -> http.client.HTTPConnection:
    conn: http.client.HTTPConnection
    if ep.unix_path is not None:
        conn = _UnixConnection(ep.unix_path, timeout)
    elif ep.scheme == "https":
        conn = http.client.HTTPSConnection(ep.host, ep.port, timeout=timeout)
    else:
        conn = http.client.HTTPConnection(ep.host, ep.port, timeout=timeout)
    conn.connect()
    if ep.unix_path is None:
        # Requests are small and answered at once: Nagle would only add latency.
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


class Cancelled(Exception):
    """Raised inside a worker whose :class:`Cancel` fired; never reaches the caller."""


class Cancel:
    """Cancels the requests that registered with it, including reads already blocked.

    ``cancel()`` sets the flag and shuts down every registered socket, so a thread
    blocked in ``recv`` wakes up at once instead of waiting out its timeout.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)

    def register(self, sock: socket.socket) -> None:
        with self._lock:
            if self._event.is_set():
                raise Cancelled
            self._socks.add(sock)

    def unregister(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.discard(sock)

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            socks, self._socks = self._socks, set()
        for sock in socks:
            with contextlib.suppress(OSError):  # already closed by its owner: nothing to wake
                sock.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True, slots=True)
class Response:
    """A complete response; ``body`` is a fresh, writable buffer owned by the caller."""

    status: int
    headers: Mapping[str, str]
    body: NDArray[np.uint8]
    url: str

    def json(self) -> Any:
        try:
            return json.loads(self.body.tobytes())
        except ValueError as exc:
            raise TransportError(f"{self.url}: answered {self.status} with invalid JSON") from exc


def _read_body(resp: http.client.HTTPResponse, buffers: Buffers) -> NDArray[np.uint8]:
    length = resp.length
    if length is None:
        # Chunked or close-delimited: rare for batchd (it always sends Content-Length).
        data = resp.read()
        return np.frombuffer(bytearray(data), dtype=np.uint8)
    buf = buffers.take(length)
    view = buf.data  # a memoryview of the numpy buffer
    pos = 0
    while pos < length:
        n = resp.readinto(view[pos:])
        if not n:
            raise http.client.IncompleteRead(b"", length - pos)
        pos += n
    return buf


class _ShmGone(Exception):
    """The announced body file is gone or changed (evicted meanwhile): ask for the bytes."""


def map_shm_body(payload: Any, url: str, owner: int) -> NDArray[np.uint8]:
    """Map the body an ``application/x-batchd-shm+json`` answer names, copy-on-write.

    ``owner``: the uid the file must belong to (the server's user, :func:`peer_uid`).
    Raises :class:`_ShmGone` when the file is missing or not ``length`` bytes (the
    server dropped it: ask again for the bytes), :class:`WireError` for an answer that
    must never be mapped. The returned array keeps the mapping alive; no fd stays open.
    """
    if not isinstance(payload, dict):
        raise WireError(f"{url}: shared-memory answer {payload!r:.200} is not a JSON object")
    path, length = payload.get("path"), payload.get("length")
    if not isinstance(path, str) or not isinstance(length, int) or isinstance(length, bool):
        raise WireError(f"{url}: shared-memory answer {payload!r:.200} lacks path or length")
    if length <= 0 or not path.startswith(_SHM_ROOT) or os.path.realpath(path) != path:
        raise WireError(
            f"{url}: refusing to map {path!r} ({length} bytes): a body must be a plain path "
            f"under {_SHM_ROOT}; is this a batchd server?"
        )
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _ShmGone(path) from None
    except PermissionError:
        raise  # the caller stops asking for shared memory
    except OSError as exc:  # ELOOP: a symlink; anything else we will not follow either
        raise WireError(f"{url}: refusing to map {path!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != owner:
            raise WireError(
                f"{url}: refusing to map {path!r}: not a regular file owned by the server "
                f"(uid {owner})"
            )
        if st.st_size != length:
            raise _ShmGone(path)
        try:
            # MAP_PRIVATE over a read-only fd: the server's pages, shared until written.
            mm = mmap.mmap(
                fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError:
            raise _ShmGone(path) from None  # out of address space or the like: the bytes
    finally:
        os.close(fd)
    return np.frombuffer(mm, dtype=np.uint8)


def _retry_after(headers: Mapping[str, str]) -> float:
    value = headers.get("retry-after", "")
    try:
        return max(0.0, min(float(value), 60.0))
    except ValueError:
        return 0.0  # an HTTP date or garbage: fall back to our own backoff


def _error_for(status: int, body: NDArray[np.uint8], url: str) -> ServerError:
    error, detail = "error", ""
    try:
        payload = json.loads(body.tobytes())
        if isinstance(payload, dict):
            error = str(payload.get("error", error))
            detail = str(payload.get("detail", ""))
    except ValueError:
        detail = body[:200].tobytes().decode("utf-8", "replace")
    if status in (401, 403):
        return AuthError(
            status, error, detail or "pass token= or set BATCHD_TOKEN to the server's token", url
        )
    if status == 404:
        return NotFoundError(status, error, detail, url)
    if status == 413:
        return TooLargeError(status, error, detail, url)
    if 400 <= status < 500:
        return RequestError(status, error, detail, url)
    if status in _RETRY_STATUSES:
        return UnavailableError(status, error, detail, url)
    return ServerError(status, error, detail, url)


@dataclass(kw_only=True, slots=True)
class _Health:
    down_until: float = 0.0
    pool: list[http.client.HTTPConnection] = field(default_factory=list)


def _close_pools(lock: threading.Lock, health: list[_Health], pid: int) -> None:
    with lock:
        pools = [h.pool for h in health]
        for h in health:
            h.pool = []
    if os.getpid() != pid:
        return  # inherited over fork: the sockets belong to the parent
    for pool in pools:
        for conn in pool:
            conn.close()


class Transport:
    """A thread-safe pool of persistent connections to one or more equivalent servers."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        token: str | None,
        timeout: float,
        retry_deadline: float,
        cooldown: float = 5.0,
        keep_buffers: int = 8,
    ) -> None:
        if not urls:
            raise ValueError("at least one server URL is required")
        self.endpoints = tuple(parse_url(u) for u in urls)
        self.timeout = timeout
        self.retry_deadline = retry_deadline
        self.cooldown = cooldown
        self._headers = {
            "User-Agent": _USER_AGENT,
            "Accept": "application/msgpack, application/json",
        }
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._lock = threading.Lock()
        self._health = [_Health() for _ in self.endpoints]
        self._turn = 0
        self._pid = os.getpid()
        self._buffers = Buffers(keep_buffers)
        self._shm = True  # off for good once this user may not open the server's files
        # The server's uid per connection (read once: on TCP it is a /proc/net/tcp lookup).
        self._owners: weakref.WeakKeyDictionary[socket.socket, int | None]
        self._owners = weakref.WeakKeyDictionary()
        # Idle sockets close when the transport is dropped, without ResourceWarnings.
        self._finalizer = weakref.finalize(self, _close_pools, self._lock, self._health, self._pid)

    # -- endpoint choice -------------------------------------------------------------

    def _pick(self) -> tuple[int, bool]:
        """Next endpoint round-robin, preferring healthy ones; (index, healthy)."""
        now = time.monotonic()
        with self._lock:
            n = len(self.endpoints)
            for step in range(n):
                i = (self._turn + step) % n
                if self._health[i].down_until <= now:
                    self._turn = i + 1
                    return i, True
            # All cooling down: the one that comes back soonest.
            i = min(range(n), key=lambda j: self._health[j].down_until)
            self._turn = i + 1
            return i, False

    def _mark(self, i: int, ok: bool) -> None:
        with self._lock:
            self._health[i].down_until = 0.0 if ok else time.monotonic() + self.cooldown

    def _any_healthy(self) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(h.down_until <= now for h in self._health)

    # -- connections ------------------------------------------------------------------

    def _checkout(self, i: int) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            pool = self._health[i].pool
            if pool:
                return pool.pop(), True
        return _connect(self.endpoints[i], self.timeout), False

    def _checkin(self, i: int, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._health[i].pool.append(conn)

    def _owner(self, sock: socket.socket) -> int | None:
        with self._lock:
            if sock in self._owners:
                return self._owners[sock]
        uid = peer_uid(sock)
        with self._lock:
            self._owners[sock] = uid
        return uid

    def close(self) -> None:
        """Close every idle connection (in-flight ones close when their request ends)."""
        self._finalizer()
        self._buffers.clear()

    # -- requests ---------------------------------------------------------------------

    def _once(self, i: int, target: str, cancel: Cancel | None, shm: bool = False) -> Response:
        ep = self.endpoints[i]
        shm = shm and self._shm and ep.same_host
        headers = {**self._headers, _SHM_HEADER: "1"} if shm else self._headers
        conn, reused = self._checkout(i)
        sock = conn.sock
        if cancel is not None:
            try:
                cancel.register(sock)
            except Cancelled:
                conn.close()
                raise
        try:
            try:
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if not reused or (cancel is not None and cancel.is_set()):
                    raise
                # The server closed an idle keep-alive connection: a fresh one, no backoff.
                conn.close()
                if cancel is not None:
                    cancel.unregister(sock)
                conn = _connect(self.endpoints[i], self.timeout)
                sock = conn.sock
                if cancel is not None:
                    cancel.register(sock)
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
            body = _read_body(resp, self._buffers)
            is_shm = shm and resp.status == 200 and resp.getheader("content-type") == SHM_MEDIA
            owner = self._owner(conn.sock) if is_shm else None
        except BaseException:
            conn.close()
            raise
        finally:
            if cancel is not None:
                cancel.unregister(sock)
        got = {k.lower(): v for k, v in resp.getheaders()}
        if resp.will_close:
            conn.close()
        else:
            self._checkin(i, conn)
        if is_shm:
            result = Response(status=resp.status, headers=got, body=body, url=ep.url)
            if owner is None:  # whose files these are cannot be told: never map them
                self._shm = False
                return self._once(i, target, cancel)
            try:
                body = map_shm_body(result.json(), ep.url, owner)
            except _ShmGone:
                return self._once(i, target, cancel)  # evicted meanwhile: the bytes, once
            except PermissionError:
                self._shm = False  # another user's server: its files will stay closed to us
                return self._once(i, target, cancel)
        return Response(status=resp.status, headers=got, body=body, url=ep.url)

    def get(
        self,
        path: str,
        params: Mapping[str, str] | None = None,
        *,
        cancel: Cancel | None = None,
        shm: bool = False,
    ) -> Response:
        """GET ``path`` (with ``params``) from any endpoint, retrying until the deadline.

        ``shm``: on a same-host endpoint (unix socket, loopback HTTP), accept a batch
        body in shared memory (the returned ``body`` then maps it, copy-on-write).

        Returns a 2xx response; raises the mapped :class:`ServerError` for 4xx (and
        other non-retryable statuses), :class:`UnavailableError` when 502/503/504
        outlasted the deadline, :class:`TransportError` when no server answered.
        """
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        deadline = time.monotonic() + self.retry_deadline
        attempt = 0
        last_cause = ""
        last_status: Response | None = None
        tried: list[str] = []
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled
            i, _ = self._pick()
            ep = self.endpoints[i]
            if ep.url not in tried:
                tried.append(ep.url)
            wait = 0.0
            try:
                result = self._once(i, ep.prefix + path + query, cancel, shm)
            except Cancelled:
                raise
            except _NETWORK_ERRORS as exc:
                if cancel is not None and cancel.is_set():
                    raise Cancelled from exc
                self._mark(i, False)
                last_cause = f"{ep.url}{path}: {type(exc).__name__}: {exc}".rstrip(": ")
                last_status = None
            else:
                if result.status < 300:
                    self._mark(i, True)
                    return result
                if result.status not in _RETRY_STATUSES:
                    raise _error_for(result.status, result.body, f"{ep.url}{path}")
                self._mark(i, False)
                last_status = result
                last_cause = f"{ep.url}{path}: HTTP {result.status}"
                wait = _retry_after(result.headers)
            attempt += 1
            if not self._any_healthy() or wait:
                # Full jitter: spreads the retries of many clients after a restart.
                backoff = random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))
                wait = max(wait, backoff)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            wait = min(wait, remaining)  # one last try at the deadline
            if wait:
                if cancel is not None:
                    if cancel.wait(wait):
                        raise Cancelled
                else:
                    time.sleep(wait)
        where = ", ".join(tried)
        hint = (
            f"gave up after {attempt} attempts in {self.retry_deadline:g} s (retry_deadline) "
            f"against {where}; last cause: {last_cause}. Is the server running and reachable?"
        )
        if last_status is not None:
            err = _error_for(last_status.status, last_status.body, last_status.url + path)
            raise UnavailableError(err.status, err.error, f"{err.detail} ({hint})".strip(), "")
        raise TransportError(hint)
