"""A tiny fake batchd server for client unit and fault tests.

A stdlib ``ThreadingHTTPServer`` (HTTP/1.1 keep-alive) on 127.0.0.1 or a unix socket,
serving the routes of docs/protocol.md from an in-memory dataset built with
``batchd.wire.layout``. It shards like ``DistributedSampler`` (pad by wrapping, or
drop the tail with ``drop_last``) from a ``(seed, epoch)`` permutation, so batches are
pure functions of the request, as on the real server.

By default sample ``i`` has ``image = full((4, 4), i % 251)`` and ``label = i % classes``,
so a test can check that labels and images stay aligned and which samples it got;
``arrays={"name": array, ...}`` serves any arrays instead (first axis = samples).

Faults are queued with :meth:`StubServer.inject` and consumed one per batch request:
``("status", code, retry_after)``, ``"reset"`` (RST after half the body), ``"truncate"``
(half the body, then a clean close), ``("slow", seconds)`` (delay the first byte).
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import struct
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from batchd.wire import layout

Fault = str | tuple[Any, ...]


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class StubServer:
    """An in-memory batchd server; ``url`` is where it listens once started."""

    def __init__(
        self,
        *,
        name: str = "toy",
        count: int = 40,
        classes: int = 4,
        token: str | None = None,
        unix_path: str | None = None,
        arrays: dict[str, np.ndarray] | None = None,
    ) -> None:
        if arrays is None:
            ids = np.arange(count)
            arrays = {
                "image": np.repeat((ids % 251).astype(np.uint8), 16).reshape(count, 4, 4),
                "label": (ids % classes).astype("<i8"),
            }
        self.arrays = arrays
        self.name = name
        self.count = len(next(iter(arrays.values())))
        self.classes = classes
        self.token = token
        self.unix_path = unix_path
        self.fingerprint = "f" * 16
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._faults: deque[Fault] = deque()
        self._lock = threading.Lock()
        self._server: socketserver.BaseServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.unix_path is not None:
            return f"unix://{self.unix_path}"
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> StubServer:
        handler = _make_handler(self)
        server: socketserver.BaseServer
        if self.unix_path is not None:
            if os.path.exists(self.unix_path):
                os.unlink(self.unix_path)
            server = _UnixHTTPServer(self.unix_path, handler)
        else:
            server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
            server.daemon_threads = True
            self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection, like a killed process."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        assert self._thread is not None
        self._thread.join()
        with self._lock:
            conns = list(_OPEN.get(id(self), ()))
        for conn in conns:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def inject(self, *faults: Fault) -> None:
        """Queue faults; each batch request consumes the next one."""
        with self._lock:
            self._faults.extend(faults)

    def take_fault(self) -> Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def batch_requests(self) -> list[int]:
        with self._lock:
            return [int(p.rsplit("/", 1)[1]) for p, _ in self.requests if "/batches/" in p]

    # -- the dataset -----------------------------------------------------------------

    def rank_ids(
        self, *, seed: int, epoch: int, shuffle: bool, drop_last: bool, rank: int, world_size: int
    ) -> np.ndarray:
        n = self.count
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        if drop_last:
            order = order[: n // world_size * world_size]
        else:
            total = -(-n // world_size) * world_size
            order = np.concatenate([order, order[: total - n]])
        return order[rank::world_size]

    def n_batches(self, samples: int, batch_size: int, drop_last: bool) -> int:
        return samples // batch_size if drop_last else -(-samples // batch_size)

    def info(self, q: dict[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "count": self.count,
            "fingerprint": self.fingerprint,
            "fields": {
                k: {
                    "dtype": a.dtype.str,
                    "shape": list(a.shape[1:]),
                    "role": None,
                    "encoding": "raw",
                }
                for k, a in self.arrays.items()
            },
            "classes": [f"c{i}" for i in range(self.classes)],
        }
        if "batch_size" in q:
            ids = self.rank_ids(seed=0, epoch=0, shuffle=False, **_shard(q))
            bs = int(q["batch_size"])
            out["plan"] = {  # as docs/protocol.md documents it
                "num_batches": self.n_batches(len(ids), bs, q.get("drop_last") == "true"),
                "samples_per_rank": len(ids),
            }
        return out

    def batch_body(self, k: int, q: dict[str, str]) -> np.ndarray | None:
        ids = self.rank_ids(
            seed=int(q.get("seed", 0)),
            epoch=int(q.get("epoch", 0)),
            shuffle=q.get("shuffle", "true") == "true",
            **_shard(q),
        )
        bs = int(q["batch_size"])
        if not 0 <= k < self.n_batches(len(ids), bs, q.get("drop_last") == "true"):
            return None
        rows = ids[k * bs : (k + 1) * bs]
        out = layout(
            dataset=self.name,
            fingerprint=self.fingerprint,
            epoch=int(q.get("epoch", 0)),
            batch=k,
            rows=len(rows),
            fields={k: (a.dtype, a.shape[1:]) for k, a in self.arrays.items()},
        )
        out.index[:] = rows
        for k, a in self.arrays.items():
            out.fields[k][:] = a[rows]
        return out.body


def _shard(q: dict[str, str]) -> dict[str, Any]:
    return {
        "drop_last": q.get("drop_last") == "true",
        "rank": int(q.get("rank", 0)),
        "world_size": int(q.get("world_size", 1)),
    }


_OPEN: dict[int, set[socket.socket]] = {}


def _make_handler(stub: StubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with stub._lock:
                _OPEN.setdefault(id(stub), set()).add(self.connection)

        def finish(self) -> None:
            with stub._lock:
                _OPEN.get(id(stub), set()).discard(self.connection)
            with suppress(OSError):
                super().finish()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean

        def _send(
            self,
            status: int,
            body: bytes | np.ndarray,
            ctype: str,
            headers: dict[str, str] | None = None,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(memoryview(body).cast("B"))

        def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json", headers)

        def do_GET(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            q = dict(urllib.parse.parse_qsl(parts.query))
            with stub._lock:
                stub.requests.append((parts.path, q))
            if stub.token and self.headers.get("Authorization") != f"Bearer {stub.token}":
                self._json(401, {"error": "unauthorized", "detail": "wrong or missing token"})
                return
            segs = parts.path.strip("/").split("/")
            if segs == ["v1", "datasets"]:
                self._json(
                    200,
                    {
                        "datasets": [
                            {
                                "name": stub.name,
                                "count": stub.count,
                                "fingerprint": stub.fingerprint,
                            }
                        ]
                    },
                )
                return
            if len(segs) < 3 or segs[:2] != ["v1", "datasets"] or segs[2] != stub.name:
                self._json(
                    404,
                    {
                        "error": "unknown_dataset",
                        "detail": f"no dataset {segs[2:3]}; served: ['{stub.name}']",
                    },
                )
                return
            if len(segs) == 3:
                self._json(200, stub.info(q))
                return
            if len(segs) == 5 and segs[3] == "batches":
                self._batch(int(segs[4]), q)
                return
            self._json(404, {"error": "not_found", "detail": parts.path})

        def _batch(self, k: int, q: dict[str, str]) -> None:
            if "batch_size" not in q:
                self._json(400, {"error": "bad_request", "detail": "batch_size is required"})
                return
            body = stub.batch_body(k, q)
            if body is None:
                self._json(404, {"error": "batch_out_of_range", "detail": f"batch {k}"})
                return
            fault = stub.take_fault()
            if fault is None:
                self._send(200, body, "application/msgpack")
                return
            kind = fault if isinstance(fault, str) else fault[0]
            if kind == "status":
                _, code, retry_after = fault
                headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
                self._json(code, {"error": "unavailable", "detail": "injected"}, headers)
            elif kind == "slow":
                time.sleep(fault[1])
                self._send(200, body, "application/msgpack")
            elif kind in ("reset", "truncate"):
                self.send_response(200)
                self.send_header("Content-Type", "application/msgpack")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(memoryview(body)[: len(body) // 2].tobytes())
                self.wfile.flush()
                if kind == "reset":
                    # SO_LINGER 0: close() sends RST instead of FIN.
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                self.close_connection = True
            else:
                raise AssertionError(f"unknown fault {fault!r}")

    return Handler


@contextmanager
def serve_stub(**kwargs: Any) -> Iterator[StubServer]:
    """A started :class:`StubServer`, always stopped afterwards."""
    stub = StubServer(**kwargs).start()
    try:
        yield stub
    finally:
        stub.stop()
