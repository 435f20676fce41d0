"""uvicorn's httptools protocol with a deadline and a size cap on request heads.

uvicorn arms its keep-alive timer only after a response, so a connection that sends
its request line and headers a byte a second (slowloris) is held open forever, and
httptools sets no limit on the size of a head. Either lets a few clients pin file
descriptors and memory. This subclass closes a connection whose head is not complete
``header_timeout`` seconds after the connection opened or its last response ended,
and answers 431 to a head over ``max_header_bytes``. Other connections are never
affected (each is its own protocol object on the event loop).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["GuardedHttpToolsProtocol", "guarded"]

log = logging.getLogger("batchd.http")

DEFAULT_HEADER_TIMEOUT = 10.0
# httptools already refuses a request line over ~64 KiB; this bounds the headers.
MAX_HEADER_BYTES = 256 * 1024


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """One connection; the class attributes are set per server by :func:`guarded`."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    max_header_bytes: int = MAX_HEADER_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _reading_head(self) -> bool:
        return self._head_timer is not None

    def _serving(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _head_timed_out(self) -> None:
        self._head_timer = None
        # Only a connection that is idle or still sending a head is dropped; one whose
        # request is being answered (a pipelined one included) is left alone.
        if not self._serving() and not self.transport.is_closing():
            log.info(
                "dropping %s: request head not complete in %gs", self.client, self.header_timeout
            )
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._reading_head():
            room = self.max_header_bytes - self._head_bytes
            self._head_bytes += len(data)
            if len(data) > room:
                # Parse up to the cap only: a head that ends within it is served, and the
                # bytes after it (a body, the next pipelined request) are not head bytes.
                if room > 0:
                    super().data_received(data[:room])
                if self.transport.is_closing():
                    return
                if self._reading_head():  # the head is still not complete
                    self._disarm_head_timer()
                    self._refuse_head()
                    return
                data = data[room:]
        super().data_received(data)

    def _refuse_head(self) -> None:
        body = json.dumps(
            {
                "error": "headers_too_large",
                "detail": f"the request line and headers exceed {self.max_header_bytes} bytes",
            }
        ).encode()
        head = (
            "HTTP/1.1 431 Request Header Fields Too Large\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        ).encode()
        if not self.transport.is_closing():
            self.transport.write(head + body)
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._serving():
            self._arm_head_timer()  # the next request's head gets the same deadline


def guarded(header_timeout: float) -> type[GuardedHttpToolsProtocol]:
    """A protocol class with this server's head deadline.

    A subclass of its own, so servers do not share it.
    """
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"header_timeout": float(header_timeout)},
    )
