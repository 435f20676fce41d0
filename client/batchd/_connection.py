"""Connections: server URLs, sockets (TCP, TLS, unix) and cancelling blocked reads."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import urllib.parse
from dataclasses import dataclass

from .wire import is_loopback_host

__all__ = ["Cancel", "Cancelled", "Endpoint", "connect", "parse_url"]


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


def connect(ep: Endpoint, timeout: float) -> http.client.HTTPConnection:
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
