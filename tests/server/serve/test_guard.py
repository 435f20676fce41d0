"""serve/guard.py: the head deadline and size cap, over a real loopback socket.

Each test runs uvicorn in a thread with the guarded protocol and a tiny ASGI app, so
what is measured is the protocol alone (not batchd's app). The whole-server view, with
the default 256 KiB cap and many slow clients at once, is in
tests/reliability/test_bad_input.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from batchd_server.serve.guard import (
    DEFAULT_HEADER_TIMEOUT,
    MAX_HEADER_BYTES,
    GuardedHttpToolsProtocol,
    guarded,
)
from serverproc import free_port

DEADLINE = 0.5  # seconds; short, so a dropped connection is seen quickly
CAP = 2048  # bytes of request head; small, so a refused head is cheap to send
SLOW = 1.5  # how long /slow takes to answer: longer than DEADLINE
GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    if scope["path"] == "/slow":
        await asyncio.sleep(SLOW)
    body = b"ok " + scope["path"].encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    protocol = type("Capped", (guarded(DEADLINE),), {"max_header_bytes": CAP})
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=free_port(),
        http=protocol,
        loop="asyncio",
        lifespan="off",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield config.port
    server.should_exit = True
    thread.join(10)


@contextlib.contextmanager
def connect(port: int) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        yield s


def answer(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    resp = http.client.HTTPResponse(s)
    resp.begin()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def closed_after(s: socket.socket) -> float:
    """Seconds until the server closes ``s`` (reads until EOF; fails on any data)."""
    t0 = time.monotonic()
    try:
        data = s.recv(1)
    except ConnectionResetError:
        data = b""
    assert data == b"", f"the server answered {data!r} instead of closing"
    return time.monotonic() - t0


def test_a_normal_request_passes_and_keep_alive_survives_the_deadline(port: int) -> None:
    with connect(port) as s:
        s.sendall(GET)
        status, _, body = answer(s)
        assert (status, body) == (200, b"ok /")
        # Idle, but for less than the deadline: the connection is still served.
        time.sleep(DEADLINE / 2)
        s.sendall(b"GET /again HTTP/1.1\r\nHost: t\r\n\r\n")
        assert answer(s)[2] == b"ok /again"


def test_a_head_sent_in_pieces_within_the_deadline_passes(port: int) -> None:
    with connect(port) as s:
        for i in range(len(GET)):
            s.sendall(GET[i : i + 1])
        assert answer(s)[0] == 200


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nHost: t\r\n"], ids=["idle", "partial"])
def test_a_head_that_does_not_arrive_in_time_is_dropped(port: int, sent: bytes) -> None:
    with connect(port) as s:
        t0 = time.monotonic()
        s.sendall(sent)
        closed_after(s)
        waited = time.monotonic() - t0
    # Dropped at the deadline, without an answer: not before it, and not much later.
    assert DEADLINE * 0.8 <= waited < DEADLINE + 2, waited


def test_the_deadline_restarts_after_each_response(port: int) -> None:
    with connect(port) as s:
        time.sleep(DEADLINE * 0.6)
        s.sendall(GET)
        assert answer(s)[0] == 200
        t0 = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\n")  # the second head stalls
        closed_after(s)
        waited = time.monotonic() - t0
    # Timed from the end of the first response, not from when the connection opened.
    assert DEADLINE * 0.8 <= waited < DEADLINE + 2, waited


def test_a_request_being_answered_is_not_dropped(port: int) -> None:
    with connect(port) as s:
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        t0 = time.monotonic()
        assert answer(s)[2] == b"ok /slow"
        assert time.monotonic() - t0 >= SLOW * 0.9  # the answer did outlast the deadline


def test_an_oversized_head_gets_the_json_431(port: int) -> None:
    head = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * CAP + b"\r\n\r\n"
    with connect(port) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(head)
        status, headers, body = answer(s)
        assert status == 431
        assert headers["content-type"] == "application/json"
        assert headers["connection"] == "close"
        assert json.loads(body) == {
            "error": "headers_too_large",
            "detail": f"the request line and headers exceed {CAP} bytes",
        }
        assert closed_after(s) < 2
    with connect(port) as s:  # the refusal touched no other connection
        s.sendall(GET)
        assert answer(s)[0] == 200


def test_a_head_just_under_the_cap_passes(port: int) -> None:
    start = b"GET / HTTP/1.1\r\nHost: t\r\nX-Pad: "
    head = start + b"a" * (CAP - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == CAP
    with connect(port) as s:
        s.sendall(head)
        assert answer(s)[0] == 200


def test_bytes_after_a_small_head_do_not_count_as_head(port: int) -> None:
    body = b"x" * (CAP * 2)
    post = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body)
    with connect(port) as s:
        s.sendall(post + body)  # one send: the body may arrive in the head's read
        assert answer(s)[0] == 200
    n = CAP // len(GET) + 2  # pipelined requests, together over the cap
    last = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    with connect(port) as s:
        s.sendall(GET * n + last)
        got = b"".join(iter(lambda: s.recv(1 << 16), b""))
    assert got.count(b"HTTP/1.1 200 OK\r\n") == n + 1 and b" 431 " not in got


def test_guarded_makes_a_class_per_server() -> None:
    a, b = guarded(3), guarded(7.5)
    assert issubclass(a, GuardedHttpToolsProtocol) and a is not b
    assert (a.header_timeout, b.header_timeout) == (3.0, 7.5)
    assert isinstance(a.header_timeout, float)
    assert a.max_header_bytes == MAX_HEADER_BYTES == 256 * 1024
    assert GuardedHttpToolsProtocol.header_timeout == DEFAULT_HEADER_TIMEOUT  # base untouched
