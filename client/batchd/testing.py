"""Test a program that uses :class:`batchd.Client` without a server or a socket.

:class:`MockTransport` answers each HTTP exchange with a function of yours, the idea
of httpx's ``MockTransport``. Everything above the exchange runs as it does against a
real server: the URL and query a batch asks for, retries with backoff on 502/503/504
and on network errors, failover between URLs, error mapping, fingerprint checks, the
epoch walk and resume::

    from batchd import Client
    from batchd.testing import MockRequest, MockResponse, MockTransport

    def handler(req: MockRequest) -> MockResponse:
        if req.path == "/v1/datasets/toy":
            return MockResponse.json({...})
        return MockResponse(503)  # retried until retry_deadline

    client = Client("http://batchd.test", "toy", transport=MockTransport(handler))

A handler may raise ``OSError`` (for example ``ConnectionResetError``) to play a
network failure. Batch bodies are built with :func:`batchd.wire.layout`.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._connection import Cancel
from ._transport import Response, Transport

__all__ = ["MockRequest", "MockResponse", "MockTransport"]


@dataclass(frozen=True, slots=True)
class MockRequest:
    """One GET as the client sends it."""

    url: str
    """The endpoint it went to (one of the client's URLs)."""
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class MockResponse:
    """What the handler answers: a status, a body and headers (names in any case)."""

    status: int = 200
    body: bytes | bytearray | memoryview | np.ndarray[Any, Any] = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(
        cls, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> MockResponse:
        """A JSON answer, as the server's info, list and error bodies are."""
        return cls(status, json.dumps(payload).encode(), dict(headers or {}))


class MockTransport(Transport):
    """A :class:`Transport` whose exchanges ``handler(request)`` answers.

    Pass it as ``Client(..., transport=MockTransport(handler))``. ``urls`` are the
    endpoints it pretends to reach (the handler sees which one each request went to);
    ``requests`` records every request in order.
    """

    def __init__(
        self,
        handler: Callable[[MockRequest], MockResponse],
        urls: Sequence[str] = ("http://batchd.test",),
        *,
        token: str | None = None,
        retry_deadline: float = 1.0,
        cooldown: float = 5.0,
    ) -> None:
        super().__init__(
            urls, token=token, timeout=1.0, retry_deadline=retry_deadline, cooldown=cooldown
        )
        self.handler = handler
        self.requests: list[MockRequest] = []

    def _exchange(
        self, i: int, target: str, headers: Mapping[str, str], cancel: Cancel | None
    ) -> Response:
        ep = self.endpoints[i]
        parts = urllib.parse.urlsplit(target)
        path = parts.path.removeprefix(ep.prefix) or "/"
        request = MockRequest(
            url=ep.url,
            path=urllib.parse.unquote(path),
            query=dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True)),
            headers=dict(headers),
        )
        self.requests.append(request)
        answer = self.handler(request)
        body = np.frombuffer(bytearray(answer.body), dtype=np.uint8)  # fresh and writable
        return Response(
            status=answer.status,
            headers={k.lower(): v for k, v in answer.headers.items()},
            body=body,
            url=ep.url,
        )
