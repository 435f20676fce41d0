"""The transport: URL parsing, error mapping, retries, fail-over, cancellation, buffers."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from batchd import (
    AuthError,
    NotFoundError,
    RequestError,
    TooLargeError,
    TransportError,
    UnavailableError,
)
from batchd._transport import Cancel, Cancelled, Transport, parse_url
from stubserver import StubServer, serve_stub

BATCH = "/v1/datasets/toy/batches/0"
Q = {"batch_size": "8"}


def _tx(
    *urls: str, deadline: float = 5.0, timeout: float = 5.0, token: str | None = None
) -> Transport:
    return Transport(list(urls), token=token, timeout=timeout, retry_deadline=deadline)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "prefix", "unix"),
    [
        ("http://127.0.0.1:8000", "http", "127.0.0.1", 8000, "", None),
        ("http://box:9/api/", "http", "box", 9, "/api", None),
        ("https://box", "https", "box", None, "", None),
        ("unix:///run/batchd.sock", "unix", "localhost", None, "", "/run/batchd.sock"),
    ],
)
def test_parse_url(
    url: str, scheme: str, host: str, port: int | None, prefix: str, unix: str | None
) -> None:
    ep = parse_url(url)
    assert (ep.scheme, ep.host, ep.port, ep.prefix, ep.unix_path) == (
        scheme,
        host,
        port,
        prefix,
        unix,
    )


@pytest.mark.parametrize(
    "url", ["", "ftp://x", "127.0.0.1:8000", "unix://rel.sock", "http://h:99999"]
)
def test_parse_url_refuses(url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        parse_url(url)


def test_get_json_and_batch() -> None:
    with serve_stub() as stub:
        tx = _tx(stub.url)
        assert tx.get("/v1/datasets").json()["datasets"][0]["name"] == "toy"
        body = tx.get(BATCH, Q).body
        assert body.dtype == np.uint8 and body.flags.writeable and len(body) > 100
        tx.close()


def test_unix_socket(tmp_path: pytest.TempPathFactory) -> None:
    with serve_stub(unix_path=str(tmp_path / "b.sock")) as stub:  # type: ignore[operator]
        assert stub.url.startswith("unix:///")
        assert _tx(stub.url).get(BATCH, Q).status == 200


def test_4xx_map_to_errors_with_the_servers_message() -> None:
    with serve_stub(token="s3cret") as stub:
        with pytest.raises(AuthError) as auth:
            _tx(stub.url).get(BATCH, Q)
        assert auth.value.status == 401 and "token" in str(auth.value)
        tx = _tx(stub.url, token="s3cret")
        with pytest.raises(NotFoundError, match=r"served: \['toy'\]") as nf:
            tx.get("/v1/datasets/nope")
        assert nf.value.error == "unknown_dataset" and stub.url in nf.value.url
        with pytest.raises(RequestError, match="batch_size is required") as bad:
            tx.get(BATCH)
        assert bad.value.status == 400 and type(bad.value) is RequestError
        stub.inject(("status", 413, None))
        before = len(stub.requests)
        with pytest.raises(TooLargeError):
            tx.get(BATCH, Q)
        assert len(stub.requests) == before + 1  # a 4xx is never retried


@pytest.mark.parametrize("code", [502, 503, 504])
def test_unavailable_is_retried_honouring_retry_after(code: int) -> None:
    with serve_stub() as stub:
        stub.inject(("status", code, 0.3), ("status", code, None))
        t0 = time.monotonic()
        assert _tx(stub.url).get(BATCH, Q).status == 200
        assert time.monotonic() - t0 >= 0.3
        assert stub.batch_requests() == [0, 0, 0]


def test_unavailable_past_the_deadline_is_an_error() -> None:
    with serve_stub() as stub:
        stub.inject(*[("status", 503, 0.1)] * 100)
        with pytest.raises(UnavailableError, match=r"503.*retry_deadline") as err:
            _tx(stub.url, deadline=0.5).get(BATCH, Q)
        assert err.value.status == 503 and stub.url in str(err.value)


@pytest.mark.parametrize("fault", ["reset", "truncate", ("slow", 1.0)])
def test_broken_answers_are_retried(fault: object) -> None:
    with serve_stub() as stub:
        good = _tx(stub.url).get(BATCH, Q).body.copy()
        stub.inject(fault, fault)
        got = _tx(stub.url, timeout=0.3).get(BATCH, Q).body
        np.testing.assert_array_equal(got, good)
        assert stub.batch_requests() == [0, 0, 0, 0]


def test_nobody_listening_names_the_url_and_cause() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TransportError, match=r"127\.0\.0\.1.*ConnectionRefused") as err:
        _tx(url, deadline=0.4).get("/v1/datasets")
    assert 0.3 < time.monotonic() - t0 < 3
    assert "Is the server running" in str(err.value)


def test_requests_spread_over_urls_and_skip_a_dead_one() -> None:
    with serve_stub() as a, serve_stub() as b:
        dead = f"http://127.0.0.1:{_free_port()}"
        tx = _tx(a.url, dead, b.url, deadline=2.0)
        t0 = time.monotonic()
        for _ in range(10):
            assert tx.get(BATCH, Q).status == 200
        assert time.monotonic() - t0 < 2  # the dead URL costs no backoff while others live
        assert len(a.batch_requests()) >= 3 and len(b.batch_requests()) >= 3


def test_restart_is_ridden_out() -> None:
    stub = StubServer().start()
    url = stub.url
    tx = _tx(url, deadline=10)
    assert tx.get(BATCH, Q).status == 200
    stub.stop()
    threading.Timer(0.5, stub.start).start()  # same port: the "restarted" server
    try:
        assert tx.get(BATCH, Q).status == 200
    finally:
        time.sleep(0.6)
        stub.stop()


def test_cancel_wakes_a_blocked_read() -> None:
    with serve_stub() as stub:
        stub.inject(("slow", 3.0))
        cancel = Cancel()
        threading.Timer(0.2, cancel.cancel).start()
        t0 = time.monotonic()
        with pytest.raises(Cancelled):
            _tx(stub.url, timeout=10).get(BATCH, Q, cancel=cancel)
        assert time.monotonic() - t0 < 2
