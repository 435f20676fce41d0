"""HTTP/1.1 over persistent connections, reading bodies straight into numpy buffers.

One transport for every request (JSON and batches). ``http.client`` with
``HTTPResponse.readinto`` fills a numpy buffer in place, so a 38 MB body is never
copied after the socket read. Faulting in fresh memory costs about a third of the
receive time on loopback, so large bodies land in buffers that are recycled once
nothing views them any more (:class:`~batchd.buffers.Buffers`): a batch the caller still holds is
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
that page only). Once every array over a mapping is gone, the answer's ``release``
token goes back with the next batch request to that server (``X-Batchd-Shm-Release``),
and the server may then recycle the file.
A file the server dropped meanwhile (``ENOENT``) or of the wrong size is asked for
again without the header, once. A first body that is missing (a server in a container
with its own /dev/shm), or three in a row, turn the header off for that endpoint: one
wasted round trip, not two requests per batch. A path outside /dev/shm, a symlink, a
non-regular file or one not owned by the server's user (:func:`batchd._peer.peer_uid`)
is refused (:class:`WireError`); where that user cannot be found, no body is mapped.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.parse
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._connection import Cancel, Cancelled, Endpoint, connect, parse_url
from ._exceptions import (
    AuthError,
    NotFoundError,
    RequestError,
    ServerError,
    TooLargeError,
    TransportError,
    UnavailableError,
)
from ._peer import peer_uid
from ._shm import ShmGone, give_back_when_unmapped, map_shm_body
from .buffers import Buffers
from .wire import MAX_SHM_RELEASES, SHM_HEADER, SHM_MEDIA, SHM_RELEASE_HEADER

__all__ = [
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
# Announced shared-memory bodies missing in a row (after one mapped) before an endpoint is
# asked for bytes only: a cache under pressure evicts one now and then, not three running.
_SHM_GONE_LIMIT = 3
#: What a dropped, reset, truncated or timed-out exchange raises; all of it is retried.
_NETWORK_ERRORS = (OSError, http.client.HTTPException)


@dataclass(frozen=True, slots=True)
class Response:
    """A complete response; ``body`` is a fresh, writable buffer owned by the caller."""

    status: int
    headers: Mapping[str, str]
    """Lower-case names."""
    body: NDArray[np.uint8]
    url: str
    owner: int | None = None
    """For a shared-memory answer: the uid of the server's user (the files' owner)."""

    @property
    def is_shm(self) -> bool:
        return self.status == 200 and self.headers.get("content-type") == SHM_MEDIA

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
    shm_mapped: bool = False  # a shared-memory body of this endpoint has mapped
    shm_gone: int = 0  # announced bodies found missing in a row
    # release tokens of bodies no longer mapped, to send with the next batch request
    shm_unmapped: deque[str] = field(default_factory=lambda: deque(maxlen=4096))


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
        return connect(self.endpoints[i], self.timeout), False

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

    def _once(
        self,
        i: int,
        target: str,
        cancel: Cancel | None,
        shm: bool,
        extra: Mapping[str, str] | None = None,
    ) -> Response:
        """One answer from endpoint ``i``; a shared-memory one comes back mapped.

        A body file the server dropped meanwhile, or one this user may not open, is
        asked for again as bytes (once, on the same endpoint).
        """
        ep, health = self.endpoints[i], self._health[i]
        headers = {**self._headers, **extra} if extra else self._headers
        if not (shm and self._shm and ep.same_host and health.shm_gone < _SHM_GONE_LIMIT):
            return self._exchange(i, target, headers, cancel)
        ask = {**headers, SHM_HEADER: "1"}
        unmapped = health.shm_unmapped
        if unmapped and os.getpid() == self._pid:
            tokens = [unmapped.popleft() for _ in range(min(len(unmapped), MAX_SHM_RELEASES))]
            ask[SHM_RELEASE_HEADER] = " ".join(tokens)  # lost if this fails: merely unlinked
        resp = self._exchange(i, target, ask, cancel)
        if not resp.is_shm:
            return resp
        if resp.owner is None:  # whose files these are cannot be told: never map them
            self._shm = False
        else:
            try:
                payload = resp.json()
                body = map_shm_body(payload, ep.url, resp.owner)
            except ShmGone:
                # Evicted meanwhile, or never there: a server in a container with its own
                # /dev/shm (another mount namespace) names files this process cannot see.
                # One miss before any body mapped, or a few in a row, and this endpoint
                # gets asked for bytes only.
                health.shm_gone = health.shm_gone + 1 if health.shm_mapped else _SHM_GONE_LIMIT
            except PermissionError:
                self._shm = False  # another user's server: its files stay closed to us
            else:
                health.shm_mapped, health.shm_gone = True, 0
                give_back_when_unmapped(body, payload, unmapped)
                return dataclasses.replace(resp, body=body)
        return self._exchange(i, target, headers, cancel)

    def _exchange(
        self, i: int, target: str, headers: Mapping[str, str], cancel: Cancel | None
    ) -> Response:
        """One request and its whole response over a pooled connection to endpoint ``i``.

        The seam for tests: :class:`batchd.testing.MockTransport` overrides this, so
        retries, failover and shared-memory fallbacks above it run unchanged.
        """
        conn, reused = self._checkout(i)
        try:
            resp, body = self._send(conn, target, headers, cancel)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            if not reused or (cancel is not None and cancel.is_set()):
                raise
            # The server closed an idle keep-alive connection: a fresh one, no backoff.
            conn = connect(self.endpoints[i], self.timeout)
            resp, body = self._send(conn, target, headers, cancel)
        got = {k.lower(): v for k, v in resp.getheaders()}
        answer = Response(status=resp.status, headers=got, body=body, url=self.endpoints[i].url)
        if answer.is_shm:
            answer = dataclasses.replace(answer, owner=self._owner(conn.sock))
        if resp.will_close:
            conn.close()
        else:
            self._checkin(i, conn)
        return answer

    def _send(
        self,
        conn: http.client.HTTPConnection,
        target: str,
        headers: Mapping[str, str],
        cancel: Cancel | None,
    ) -> tuple[http.client.HTTPResponse, NDArray[np.uint8]]:
        """GET ``target`` on ``conn`` and read the body; ``conn`` is closed on any error."""
        sock = conn.sock
        try:
            if cancel is not None:
                cancel.register(sock)
            try:
                conn.request("GET", target, headers=dict(headers))
                resp = conn.getresponse()
                return resp, _read_body(resp, self._buffers)
            finally:
                if cancel is not None:
                    cancel.unregister(sock)
        except BaseException:
            conn.close()
            raise

    def get(
        self,
        path: str,
        params: Mapping[str, str] | None = None,
        *,
        cancel: Cancel | None = None,
        shm: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """GET ``path`` (with ``params``) from any endpoint, retrying until the deadline.

        ``shm``: on a same-host endpoint (unix socket, loopback HTTP), accept a batch
        body in shared memory (the returned ``body`` then maps it, copy-on-write).
        ``headers`` are sent besides the transport's own (the token).

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
                result = self._once(i, ep.prefix + path + query, cancel, shm, headers)
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
